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


RAY_ALLOWED = {"raysim/engine", "raysim/run.py", "raysim/tune.py"}
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
