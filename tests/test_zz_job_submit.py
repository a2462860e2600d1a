"""`cluster/submit.sh run ...` (the README's cluster command) against a real local Ray head.

Named to run last: it starts its own head on 127.0.0.1 (own ports, own temp dir, own auth
token) with `ray start --head --block`, and stops exactly that head by ending the process.

The head's Python is a thin venv that sees this interpreter's packages (a `.pth` line), as a
cluster image's Python has its packages installed. Ray builds the job's pip environment
(cluster/runtime_env.yaml: the wheel, pip-installed) by cloning the head's venv when its Python
runs in one: the test venv itself was copied whole (6.6 GB here, torch included) and deleted
again, a minute of the test's two.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow  # starts its own Ray head(s)

from helpers import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
PORT_FLAGS = ("--port", "--dashboard-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--ray-client-server-port", "--node-manager-port", "--object-manager-port", "--metrics-export-port", "--runtime-env-agent-port")


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _wait_for_dashboard(url: str, head: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start --head exited with {head.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=5):
                return
        except OSError as err:
            if "401" in str(err) or "403" in str(err):  # up, and asking for the token
                return
            time.sleep(1)
    pytest.fail(f"dashboard at {url} did not come up in {timeout:.0f} s")


def _thin_venv(path: Path) -> Path:
    """A venv (no pip of its own) that sees this interpreter's packages; its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(path), "platbase": str(path)}))
    here = dict.fromkeys(sysconfig.get_path(kind) for kind in ("purelib", "platlib"))
    (site / "zz_test_venv.pth").write_text("".join(f"{p}\n" for p in here))  # plain paths: its own .pth files (the editable raysim) stay out
    return path / "bin" / "python"


@pytest.mark.timeout(420)
def test_job_submit_run_on_local_head(oph_root: Path, tmp_path: Path) -> None:
    ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS))))
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length limit
    head_python = _thin_venv(tmp_path / "head-venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAYSIM_CACHE": os.environ["RAYSIM_CACHE"], "PYTHON": sys.executable}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    # Stopped by signalling its process group, the head's GCS goes with it; Ray 2.60's drain on
    # SIGTERM would then wait 30 s for that GCS to answer before shutting down. Nothing to drain.
    head_env = env | {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    head = subprocess.Popen(
        [str(head_python), "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
         "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp_dir}", *(f"{flag}={port}" for flag, port in ports.items())],
        env=head_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        _wait_for_dashboard(address, head)
        out = tmp_path / "run"
        job = subprocess.run(
            ["cluster/submit.sh", "run", "--out", str(out), *tiny_overrides(oph_root, **{"eval.bootstrap": 0, "resources.actors": 1})],  # one client actor process to start
            cwd=ROOT, env=env | {"RAY_ADDRESS": address}, capture_output=True, text=True, timeout=360,
        )  # fmt: skip
        log = job.stdout[-4000:] + job.stderr[-4000:]
        assert job.returncode == 0, log
        submission = re.search(r"raysubmit_\w+", log)
        assert submission, log
        ask = f"from ray.job_submission import JobSubmissionClient; print(JobSubmissionClient({address!r}).get_job_status({submission.group(0)!r}).value)"
        status = subprocess.run([sys.executable, "-c", ask], env=env, capture_output=True, text=True, timeout=60)
        assert status.stdout.strip().splitlines()[-1:] == ["SUCCEEDED"], status.stdout + status.stderr
        metrics = pd.read_parquet(out / "metrics.parquet")
        assert set(metrics["round"]) >= {1, 2}
        auc = metrics[(metrics["split"] == "test") & (metrics["client"] == "mean") & (metrics["metric"] == "auc") & (metrics["attribute"] == "")]
        assert len(auc) == 2 and auc["value"].between(0, 1).all()
        provenance = json.loads((out / "provenance.json").read_text())
        assert provenance  # written by the job's driver, on the cluster side
        # without the token the job API refuses the request
        with pytest.raises(OSError, match="401|403|Unauthorized"):
            urllib.request.urlopen(f"{address}/api/jobs/", timeout=10)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
