"""provenance.json: what produced a run (versions, code commit, data fingerprint, resources)."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
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


def cpu_info() -> dict[str, Any]:
    """The CPU model and instruction-set flags (Linux /proc/cpuinfo; the platform's name elsewhere)."""
    info: dict[str, Any] = {"model": platform.processor() or platform.machine(), "flags": None}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for key, field in (("model name", "model"), ("flags", "flags")):
        found = re.search(rf"^{key}\s*:\s*(.*)$", text, re.MULTILINE)
        if found:
            info[field] = found.group(1).strip()
    return info


def math_libraries() -> dict[str, Any]:
    """What decides which CPU kernels torch runs, and so the rounding of every result.

    ATen dispatches its own kernels by instruction set (`cpu_capability`; capped by the
    ATEN_CPU_CAPABILITY variable); oneDNN and MKL dispatch theirs separately. Two machines
    whose entries here differ may give different (each self-consistent) numbers.
    """
    import torch

    from raysim import determinism

    config = torch.__config__.show()
    mkl = re.search(r"Math Kernel Library Version ([^\s]+)", config)
    onednn = re.search(r"MKL-DNN (v[^\s]+)", config)
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"),
        "mkl": mkl.group(1) if mkl else None,
        "onednn": onednn.group(1) if onednn else None,
        "cpu_count": os.cpu_count(),
        "torch_settings": determinism.settings(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }


def machine(device: str = "cpu") -> dict[str, Any]:
    """What one process computes on: its CPU, math libraries and, on CUDA, the GPU's name."""
    import torch

    facts = {"host": platform.node(), "cpu_model": cpu_info()["model"], **math_libraries()}
    if device.startswith("cuda"):
        facts["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return facts


def add(run_dir: Path, key: str, value: Any) -> None:
    """Add one entry to an existing provenance.json (e.g. the client actors' machines, known once they run)."""
    path = run_dir / "provenance.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    record[key] = value
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")


def write(run_dir: Path, *, data: dict[str, Any], resources: dict[str, Any], argv: list[str], attribute: str | None = None) -> dict[str, Any]:
    """`attribute`: the target sensitive attribute the run reports on (data.attribute, or the
    source's default when that is null), which reports and `raysim.compare` read back."""
    record = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": argv,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_info(),
        "math": math_libraries(),
        "packages": package_versions(),
        "git_commit": git_commit(),
        "data": data,
        "attribute": attribute,
        "resources": resources,
    }
    (run_dir / "provenance.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record
