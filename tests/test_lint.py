"""The code base stays lint-clean (ruff, configured in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.fail("ruff is part of the test extra: pip install -e '.[test]'")
    proc = subprocess.run([ruff, "check", "raysim", "algorithms", "datasets", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


RAY_ALLOWED = {"raysim/engine", "raysim/run.py", "raysim/tune.py", "raysim/doctor.py"}
PLAIN = ("algorithms", "datasets", "raysim")  # everything outside the engine and the entry points


def _imports(path: Path) -> set[str]:
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_ray_only_in_the_engine_and_the_entry_points() -> None:
    """Algorithms, datasets, models, metrics: plain Python; none of them imports Ray or the engine."""
    offenders = []
    for top in PLAIN:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if any(rel == allowed or rel.startswith(allowed + "/") for allowed in RAY_ALLOWED):
                continue
            bad = sorted(n for n in _imports(path) if n == "ray" or n.startswith(("ray.", "raysim.engine")))
            if bad:
                offenders.append(f"{rel}: {', '.join(bad)}")
    assert not offenders, "Ray / engine imported outside raysim/engine and the entry points:\n" + "\n".join(offenders)


# The layers of DESIGN.md, bottom to top: a module imports only from its own layer and the ones
# below it, lazy (function-level) and `if TYPE_CHECKING:` imports included. The equivalent of an
# import-linter `layers` contract: import-linter reads packages from their folder, and
# raysim.algorithms / raysim.datasets install from algorithms/ and datasets/ (setup.cfg package_dir).
LAYERS = (
    ("raysim.config", "raysim.registry", "raysim.types", "raysim.seeding", "raysim.determinism", "raysim.provenance", "raysim.console", "raysim.secrets", "raysim.cli", "raysim.durable", "raysim.moved"),
    ("raysim.metrics",),
    ("raysim.datasets",),
    ("raysim.models",),
    ("raysim.client",),
    ("raysim.algorithms", "raysim.systems"),
    ("raysim.outputs",),
    ("raysim.reports",),
    ("raysim.engine",),
    ("raysim.run", "raysim.tune", "raysim.compare", "raysim.report", "raysim.pretrain", "raysim.doctor"),  # entry points: parse, call below
)
FOLDERS = {"raysim": "raysim", "algorithms": "raysim.algorithms", "datasets": "raysim.datasets"}
MAX_LINES = 600


def package_modules() -> dict[str, Path]:
    """Every module of the installed package by dotted name (the root `raysim/__init__.py` aside)."""
    modules = {}
    for folder, prefix in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((prefix, *parts)).removesuffix(".__init__")
            if name != "raysim":
                modules[name] = path
    return modules


def layer_of(module: str) -> int:
    matches = [(len(prefix), i) for i, layer in enumerate(LAYERS) for prefix in layer if module == prefix or module.startswith(prefix + ".")]
    if not matches:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_lint.py and to DESIGN.md")
    return max(matches)[1]


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports anywhere in its file (relative imports resolved)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join([*parts, base] if base else parts)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_every_module_imports_only_from_the_layers_below_it() -> None:
    modules = package_modules()
    known = set(modules)
    violations = []
    for name, path in modules.items():
        for target in sorted(imported_modules(name, path, known)):
            if layer_of(target) > layer_of(name):
                violations.append(f"{path.relative_to(ROOT)} (layer {layer_of(name) + 1}) imports {target} (layer {layer_of(target) + 1})")
    assert not violations, "imports upward through the layers (DESIGN.md):\n" + "\n".join(violations)


def test_the_layer_check_sees_lazy_imports(tmp_path: Path) -> None:
    """The check itself: an upward import inside a function is found."""
    module = tmp_path / "probe.py"
    module.write_text("def late():\n    from raysim.engine import driver\n    from ..reports import figures\n")
    known = set(package_modules())
    assert {"raysim.engine.driver", "raysim.reports.figures"} <= imported_modules("raysim.metrics.probe", module, known)
    assert layer_of("raysim.engine.driver") > layer_of("raysim.metrics.probe")


def test_no_module_is_longer_than_600_lines_without_saying_why() -> None:
    """STYLE aims at ~400 lines; a module over 600 names its reason in its docstring
    ("Longer than 600 lines: ...")."""
    import ast

    long = []
    for path in package_modules().values():
        lines = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and "Longer than 600 lines:" not in doc:
            long.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not long, "modules over 600 lines without a stated reason (split by what changes together):\n" + "\n".join(long)
