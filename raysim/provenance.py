"""provenance.json: what produced a run (versions, code commit, data fingerprint, resources)."""

from __future__ import annotations

import datetime as dt
import json
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

PACKAGES = ("raysim", "ray", "torch", "torchvision", "timm", "numpy", "pandas", "pyarrow", "scikit-learn", "fairlearn")


def package_versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def git_commit() -> str | None:
    """The commit of the raysim source tree, when it runs from a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def write(run_dir: Path, *, data: dict[str, Any], resources: dict[str, Any], argv: list[str]) -> dict[str, Any]:
    record = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": argv,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "git_commit": git_commit(),
        "data": data,
        "resources": resources,
    }
    (run_dir / "provenance.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record
