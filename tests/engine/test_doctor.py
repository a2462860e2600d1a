"""`python -m raysim.doctor` (issue 30) on a CPU node, as CI runs it: every check a line, the
GPU-only ones skipped, exit 0; a check that breaks is one FAIL line and exit 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raysim import doctor


@pytest.mark.slow  # a fresh interpreter with its own private Ray
def test_the_doctor_passes_on_a_cpu_node_and_skips_the_gpu_checks(tmp_path: Path) -> None:
    report = tmp_path / "doctor.json"
    env = {**os.environ, "RAYSIM_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "raysim.doctor", "--out", str(tmp_path / "runs"), "--json", str(report)], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    statuses = {r["name"]: r["status"] for r in json.loads(report.read_text())["results"]}
    assert statuses == {
        "ray": "ok",
        "actors share a device": "ok",
        "memory cap": "skip",
        "client actors on the device": "ok",
        "bit-identical": "ok",
        "mixed precision": "skip",
        "GPU fold": "skip",
    }
    assert lines[-1] == "raysim doctor: 7 checks: 4 ok, 3 skipped, 0 failed"
    assert sum(line.lstrip().startswith(("ok ", "skip ")) for line in lines) == 7
    kept = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "runs").rglob("metrics.parquet"))
    assert kept == ["runs/fp32-a/metrics.parquet", "runs/fp32-b/metrics.parquet"], kept


def test_a_check_that_breaks_is_one_fail_line_and_the_rest_still_run(ray_session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def broken(node: doctor.Node) -> doctor.Result:
        raise RuntimeError("no such device\nsecond line")

    monkeypatch.setattr(doctor, "CHECKS", [("broken", broken), ("ray", doctor.check_ray)])
    assert doctor.main(["--out", str(tmp_path / "runs")]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].startswith("FAIL  broken: RuntimeError: no such device second line (")
    assert lines[2].startswith("  ok  ray: a private Ray sees") and lines[-1] == "raysim doctor: 2 checks: 1 ok, 0 skipped, 1 failed"


def test_no_op_warns_under_deterministic_mode_on_the_cpu(ray_session, tmp_path: Path) -> None:
    """What the bit-identity check names when two runs differ: on the CPU, nothing."""
    assert doctor.nondeterministic_ops(doctor.Node(engine=None, gpus=0, share=0.25, out=tmp_path)) == []
