"""A local run starts its own private Ray (`connect_ray`, which `raysim.run` and `raysim.tune`
call): a stale cluster address file in Ray's temp dir (a `ray start --head` killed, not
stopped) and a live local head beside it change nothing. Subprocesses with their own
RAY_TMPDIR: never the machine's Ray temp dir."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts its own Ray head(s)

CONNECT = """
import json, ray
from raysim.engine.driver import connect_ray
connect_ray(num_cpus=2, object_store_gb=0.1)
print(json.dumps({"cpus": ray.cluster_resources()["CPU"], "gcs": ray.get_runtime_context().gcs_address, "ok": ray.get(ray.remote(lambda: 1).remote())}))
"""
PROBE_HEAD = """
import json, ray
ray.init(address="auto")
print(json.dumps({"cpus": ray.cluster_resources()["CPU"], "gcs": ray.get_runtime_context().gcs_address}))
"""


@pytest.fixture
def ray_env() -> dict[str, str]:
    path = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, "RAY_TMPDIR": path}
    env.pop("RAY_ADDRESS", None)
    yield env
    shutil.rmtree(path, ignore_errors=True)


def python(code: str, env: dict[str, str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_stale_cluster_address_file_is_ignored(ray_env: dict[str, str]) -> None:
    stale = Path(ray_env["RAY_TMPDIR"]) / "ray" / "ray_current_cluster"
    stale.parent.mkdir()
    stale.write_text("127.0.0.1:6399\n")  # nothing listens there; joining it used to fail with a traceback
    got = python(CONNECT, ray_env)
    assert got["ok"] == 1 and got["cpus"] == 2.0 and not got["gcs"].endswith(":6399")


def test_a_live_local_head_beside_the_run_is_left_alone(ray_env: dict[str, str]) -> None:
    """`ray start --head --block` in its own session, stopped by signalling it (never `ray stop`,
    which stops every Ray on the machine, this test session's and anyone else's)."""
    head_cli = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"]
    # The group's SIGTERM stops the head's GCS too: Ray 2.60's drain on SIGTERM would wait 30 s
    # for that GCS before shutting down. An idle head has nothing to drain.
    head_env = ray_env | {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    head = subprocess.Popen(head_cli, env=head_env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        address_file = Path(ray_env["RAY_TMPDIR"]) / "ray" / "ray_current_cluster"
        deadline = time.monotonic() + 120
        while not address_file.exists() and time.monotonic() < deadline and head.poll() is None:
            time.sleep(0.2)
        assert address_file.exists(), "the local head did not start"
        before = python(PROBE_HEAD, ray_env)
        ours = python(CONNECT, ray_env)
        assert ours["ok"] == 1 and ours["cpus"] == 2.0 and ours["gcs"] != before["gcs"]  # a cluster of its own
        assert python(PROBE_HEAD, ray_env) == before  # the head is still there, unchanged
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops its own processes on exit
        head.wait(timeout=120)
