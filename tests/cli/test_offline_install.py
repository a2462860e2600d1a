"""The README's offline install on a node whose admins installed torch and Ray (Offline GPU nodes):
raysim's own wheel, `pip install --no-index --find-links DIR --no-deps raysim` into a venv that
sees the node's packages, then `pip check`. Nothing is downloaded: pip reads no index and no
configuration file, only the folder the wheel is built into.

The "node's packages" are this test environment's (torch, Ray, ...). The wheel's files, not the
source tree's, must be what imports: the source tree maps `algorithms/` and `datasets/` onto
`raysim.algorithms` and `raysim.datasets` (setup.cfg package_dir), which only a built package
has in place.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds a wheel, makes a venv and runs pip in subprocesses

ROOT = Path(__file__).resolve().parents[2]
CHECK = """
import importlib.metadata, json, raysim, raysim.algorithms, raysim.datasets
dist = importlib.metadata.distribution("raysim")
print(json.dumps({"version": raysim.__version__, "metadata": dist.version, "dist": str(dist.locate_file("")),
                  "files": [m.__file__ for m in (raysim, raysim.algorithms, raysim.datasets)]}))
"""


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def _source_copy(dest: Path) -> Path:
    """The files `pip wheel .` reads: the top-level files and the folders of setup.cfg's package_dir.

    Built from a copy, not the checkout: setuptools writes build/ into the folder it builds
    (cluster/submit.sh builds there, and tests/test_zz_job_submit.py runs it, maybe at the same
    time on the other pytest-xdist worker), and a module left in an old build/lib would go into
    the wheel too.
    """
    dest.mkdir()
    for path in ROOT.iterdir():
        if path.is_file():
            shutil.copy2(path, dest / path.name)
    package_dir = _setup_cfg()["options"]["package_dir"]
    folders = {line.split("=")[1].strip().split("/")[0] for line in package_dir.splitlines() if "=" in line}
    for folder in sorted(folders):
        shutil.copytree(ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    return dest


def _venv_over_this_env(path: Path) -> tuple[Path, Path]:
    """A venv that sees this test environment's packages after its own; its python and site-packages.

    `venv --system-site-packages`, as the README's node venv is made, would add the base
    interpreter's site-packages, not this test venv's, where torch and Ray are: a .pth line in
    the new venv's site-packages appends this environment's instead (after the venv's own, as
    system site-packages come after a venv's). The paths go in as plain paths, so the .pth files
    in them are not run: the editable raysim's import hook (`pip install -e`) stays out, and
    `raysim` imports from the new venv or not at all. No pip of its own: this environment's pip
    runs with the new venv's prefix.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(path), "platbase": str(path)}))
    here = dict.fromkeys(sysconfig.get_path(kind) for kind in ("purelib", "platlib"))
    (site / "zz_parent_env.pth").write_text("".join(f"{p}\n" for p in here))
    return path / "bin" / "python", site


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_wheel_installs_offline_over_the_node_packages(tmp_path: Path) -> None:
    version = _setup_cfg()["metadata"]["version"]
    # No pip configuration (index, find-links, constraints) and no PYTHONPATH from this machine:
    # pip sees the wheel folder only, python the venv only.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k not in ("PYTHONPATH", "PYTHONHOME")}
    env |= {"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    wheels = tmp_path / "wheels"
    source = _source_copy(tmp_path / "src")
    _run([sys.executable, "-m", "pip", "wheel", str(source), "-w", str(wheels), "--no-deps", "--no-build-isolation", "-q"], tmp_path, env)
    assert [p.name for p in wheels.iterdir()] == [f"raysim-{version}-py3-none-any.whl"]

    python, site = _venv_over_this_env(tmp_path / "venv")
    # --ignore-installed: this environment's editable raysim is visible through the .pth, and pip
    # would call it installed already; the new venv gets its own raysim, the wheel's.
    install = _run([str(python), "-m", "pip", "install", "--no-index", "--find-links", str(wheels), "--no-deps", "--ignore-installed", f"raysim=={version}"], tmp_path, env)
    assert f"Successfully installed raysim-{version}" in install.stdout, install.stdout
    _run([str(python), "-m", "pip", "check"], tmp_path, env)

    outside = tmp_path / "elsewhere"  # not the checkout: its raysim/ folder would shadow the install
    outside.mkdir()
    found = json.loads(_run([str(python), "-c", CHECK], outside, env).stdout.strip().splitlines()[-1])
    assert found["version"] == found["metadata"] == version, found
    assert Path(found["dist"]) == site, f"importlib.metadata finds raysim at {found['dist']}, not the new venv's {site}"
    for file in found["files"]:
        assert Path(file).is_relative_to(site / "raysim"), f"{file} is not the wheel's (under {site / 'raysim'})"
