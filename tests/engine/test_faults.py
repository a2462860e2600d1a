"""Failures cost time, never results: lost, hung and killed actors through real Ray (no mocks)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray

from raysim.engine import checkpoints

from helpers import load_config, make_driver, tiny_overrides

ROUNDS = {"federation.rounds": 3}


_UNINTERRUPTED: dict[Path, pd.DataFrame] = {}  # one run per session, also for the modules that import the fixture


@pytest.fixture(scope="module")
def uninterrupted(ray_session, oph_root: Path, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    if oph_root not in _UNINTERRUPTED:
        _UNINTERRUPTED[oph_root] = make_driver(oph_root, tmp_path_factory.mktemp("full") / "run", **ROUNDS).run()
    return _UNINTERRUPTED[oph_root].copy()


def run_with_fault(driver, fault, at: tuple[int, str] = (2, "round")) -> pd.DataFrame:
    """Run every round; when the driver reaches `at` (round, part: round 2's training is folded,
    its evaluation and checkpoint are next), `fault(pids)` runs (client id -> its actor's pid,
    read while the actors were idle). Synchronous, so the fault lands at the same point on a
    fast or a slow machine."""
    try:
        driver.start()
        pids = {cid: int(ray.get(driver.pool.actor_of(cid).describe.remote())["_pid"]) for cid in driver.specs}
        for round_, part in driver.advance(driver.cfg.federation.rounds):
            if (round_, part) == at and pids:  # once: the replayed round passes `at` again
                fault(pids)
                pids = {}
    finally:
        driver.shutdown()
    return driver.recorder.metrics


def test_a_killed_client_actor_is_replaced_and_the_rounds_replayed_exactly(uninterrupted, oph_root: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    driver = make_driver(oph_root, tmp_path / "killed", lines, **ROUNDS)

    metrics = run_with_fault(driver, lambda pids: os.kill(pids["site2"], signal.SIGKILL))
    assert any("lost (actor died); started new actors for site2" in line and "replaying from checkpoint round_0001" in line for line in lines), lines
    pd.testing.assert_frame_equal(metrics, uninterrupted, check_exact=True)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "killed" / "metrics.parquet"), uninterrupted, check_exact=True)


@pytest.mark.exclusive  # its deadline is timed
def test_a_hung_client_actor_misses_its_deadline_and_is_replaced(uninterrupted, oph_root: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    driver = make_driver(oph_root, tmp_path / "hung", lines, **ROUNDS, **{"fault.min_timeout_s": 8, "fault.timeout_factor": 1})
    stopped: list[int] = []

    def hang(pids: dict[str, int]) -> None:
        stopped.append(pids["site1"])
        os.kill(pids["site1"], signal.SIGSTOP)

    try:
        metrics = run_with_fault(driver, hang)
    finally:
        for pid in stopped:  # whatever Ray did with it, the stopped process must not linger
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert any("no answer within" in line and "started new actors for site1" in line for line in lines), lines
    pd.testing.assert_frame_equal(metrics, uninterrupted, check_exact=True)


def test_recoveries_are_bounded_and_then_the_run_stops_resumable(ray_session, oph_root: Path, tmp_path: Path) -> None:
    from raysim.engine.driver import RunFailed

    driver = make_driver(oph_root, tmp_path / "bounded", **ROUNDS, **{"fault.max_restarts": 0})
    with pytest.raises(RunFailed, match=r"more actor losses than fault.max_restarts=0; --resume .* continues from round_0001"):
        run_with_fault(driver, lambda pids: os.kill(pids["site3"], signal.SIGKILL))


def test_drop_records_the_missing_client_every_later_round(ray_session, oph_root: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    driver = make_driver(oph_root, tmp_path / "drop", lines, **{"federation.rounds": 2, "fault.on_client_loss": "drop"})
    try:
        driver.start()
        driver.step(1)
        ray.kill(driver.pool.actor_of("site2"))
        driver.step(2)
    finally:
        driver.shutdown()
    assert any("client actor of site2 lost (actor died); fault.on_client_loss=drop" in line for line in lines)
    assert any("round   2/2 | clients 2 |" in line and "failed: site2" in line for line in lines)
    assert "means over 2 of 3 clients; dropped: site2" in lines
    assert all(np.isfinite(t.numpy()).all() for t in driver.state["weights"].values() if t.is_floating_point())
    metrics = driver.recorder.metrics
    last = metrics[(metrics["round"] == 2) & (metrics["split"] != "train")]
    assert set(last["client"]) == {"site1", "site3", "mean"}
    train = metrics[(metrics["round"] == 2) & (metrics["split"] == "train")]
    assert train[train["metric"] == "missing"][["client", "value"]].values.tolist() == [["site2", 1.0]]
    assert train[train["metric"] == "n_clients"][["client", "value"]].values.tolist() == [["mean", 2.0]]
    assert metrics[(metrics["round"] == 1) & (metrics["metric"] == "missing")].empty


def test_a_failed_client_save_leaves_no_complete_marker_and_the_previous_checkpoint(uninterrupted, oph_root: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    run_dir = tmp_path / "disk"
    blocked = checkpoints.folder(run_dir, 2)
    blocked.mkdir(parents=True)
    (blocked / checkpoints.CLIENTS).write_text("a file where the clients' folder goes: every save there fails\n")
    make_driver(oph_root, run_dir, lines, **ROUNDS).run(until=2)
    assert any("round 2: checkpoint incomplete" in line for line in lines)
    assert not (blocked / checkpoints.COMPLETE).exists()
    assert checkpoints.usable(run_dir)[0].name == "round_0001"
    (blocked / checkpoints.CLIENTS).unlink()
    from raysim.engine.driver import Driver

    resumed = Driver(load_config(run_dir / "config.yaml"), run_dir, echo=lambda _: None).run(resume=True)
    pd.testing.assert_frame_equal(resumed, uninterrupted, check_exact=True)


def test_a_killed_driver_actor_resumes_from_its_checkpoint(uninterrupted, oph_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI's main: the driver actor's process killed after round 1; it is started again from
    round_0001. In this process, on the session's Ray (`python -m raysim.run` as a subprocess,
    with a Ray of its own, is tests/engine/test_engine.py's), and with one client actor (the
    uninterrupted run has three): each start of the pool is one process importing torch."""
    from raysim import run

    run_dir = tmp_path / "cli"
    killed: list[int] = []
    finished = threading.Event()

    def kill_after_round_1() -> None:
        while not checkpoints.latest(run_dir) and not finished.wait(0.1):
            pass
        if finished.is_set():
            return
        pid = json.loads((run_dir / "provenance.json").read_text())["driver"]["pid"]  # this run's, not another on the machine
        assert "DriverActor" in Path(f"/proc/{pid}/cmdline").read_text(), pid
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_after_round_1, daemon=True)
    killer.start()
    try:
        code = run.main(["--out", str(run_dir), *tiny_overrides(oph_root, **ROUNDS, **{"resources.actors": 1})])
    finally:
        finished.set()
        killer.join(timeout=30)
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and killed, out[-30:]
    assert any(line.startswith("driver actor lost") and "resuming from round_000" in line for line in out), out
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "metrics.parquet"), uninterrupted, check_exact=True)


def test_a_lost_node_costs_its_actors_not_the_results(uninterrupted, oph_root: Path, tmp_path: Path) -> None:
    """`ray.cluster_utils.Cluster` in a subprocess: the worker node hosting some client actors is
    removed mid-run; every one of its actors is replaced and the metrics equal the uninterrupted
    run's (this module's, on one node and 0.25-CPU actors: placement never changes a bit)."""
    overrides = json.dumps(tiny_overrides(oph_root, **ROUNDS, **{"resources.num_cpus": 0.5}))
    script = Path(__file__).with_name("cluster_node_loss.py")
    ray_tmp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # its own Ray temp dir (short: socket paths), never the machine's
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run([sys.executable, str(script), str(oph_root), str(tmp_path / "runs"), overrides], capture_output=True, text=True, timeout=420, env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-4000:]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "runs" / "cut" / "metrics.parquet"), uninterrupted, check_exact=True)
    removed = next(line for line in out.splitlines() if line.startswith("removing node hosting"))
    # every actor of the node is replaced: at once, or in a second recovery when one of them
    # still answered while the node was going down
    recovered = " ".join(line for line in out.splitlines() if "started new actors for" in line)
    assert all(cid in recovered for cid in json.loads(removed.split("hosting ", 1)[1].replace("'", '"'))), out[-3000:]


def test_a_run_at_a_uri_checkpoints_there_and_resumes_from_it(uninterrupted, oph_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--out` as a pyarrow.fs URI (a local `file://` one stands in for S3): checkpoints and
    outputs land there; a resume from the URI alone (the staging copy gone with its node)
    ends with the uninterrupted metrics, and pruning reaches the URI."""
    from raysim import config
    from raysim.engine.driver import Driver
    from raysim.outputs import storage

    monkeypatch.setenv("RAYSIM_STAGING", str(tmp_path / "staging"))
    cfg = load_config(None, tiny_overrides(oph_root, **ROUNDS))

    uri = f"file://{tmp_path}/bucket/run"
    storage.RunMirror(uri).write_text("config.yaml", config.dump(cfg))
    first = Driver(cfg, uri, echo=lambda _: None)
    assert first.run_dir.parent == storage.staging_root() and str(tmp_path / "staging") in str(first.run_dir)
    first.run(until=2)
    remote = tmp_path / "bucket" / "run"
    assert (remote / "checkpoints/round_0002/COMPLETE").exists() and (remote / "metrics.parquet").exists()
    assert (remote / "provenance.json").exists() and (remote / "config.yaml").read_text() == config.dump(cfg)

    first.run_dir.rename(tmp_path / "staging-of-a-lost-node")  # the resume must come from the URI alone
    resumed = Driver(cfg, uri, echo=lambda _: None).run(resume=True)
    pd.testing.assert_frame_equal(resumed, uninterrupted, check_exact=True)
    pd.testing.assert_frame_equal(pd.read_parquet(remote / "metrics.parquet"), uninterrupted, check_exact=True)
    assert sorted(os.listdir(remote / "checkpoints")) == ["round_0002", "round_0003"]  # checkpoint.keep=2, pruned at the URI too


def test_actors_that_do_not_start_in_time_stop_the_run_with_a_clear_error(ray_session, oph_root: Path, tmp_path: Path) -> None:
    """`fault.start_timeout_s`: no actor loads its shards in a millisecond; the run stops naming the
    limit and what Ray has, instead of waiting for ever (as for an infeasible request on a cluster)."""
    from raysim.engine.driver import RunFailed

    with pytest.raises(RunFailed, match=r"client actors not started within fault.start_timeout_s=0.001 s: Ray may lack what each asks for \(0.25 CPU, 0 GPU; the cluster has"):
        make_driver(oph_root, tmp_path / "run", **{"fault.start_timeout_s": 0.001}).run()


def test_each_kind_of_wait_has_its_own_limit(oph_root: Path, tmp_path: Path) -> None:
    """Before a round is timed: fault.first_round_timeout_s; then max(min, factor x slowest round);
    evaluations: fault.eval_timeout_s when set; actor starts: fault.start_timeout_s."""
    limits = {"fault.start_timeout_s": 50, "fault.first_round_timeout_s": 40, "fault.min_timeout_s": 3, "fault.timeout_factor": 2}
    driver = make_driver(oph_root, tmp_path / "run", **limits)  # no Ray needed to build a driver
    assert (driver.deadline(), driver.deadline("eval"), driver.deadline("start")) == (40, 40, 50)
    driver.slowest_round = 1.0
    assert (driver.deadline(), driver.deadline("eval")) == (3, 3)
    driver.slowest_round = 10.0
    assert (driver.deadline(), driver.deadline("eval"), driver.deadline("start")) == (20, 20, 50)
    assert make_driver(oph_root, tmp_path / "eval", **limits, **{"fault.eval_timeout_s": 7}).deadline("eval") == 7


def test_an_actor_reported_unavailable_is_asked_again_not_replaced(uninterrupted, oph_root: Path, tmp_path: Path) -> None:
    """`ActorUnavailableError` (the call may or may not have run; the actor lives) is transient:
    Ray's RPC chaos hook loses the response to the run's first actor call, in a subprocess with
    its own Ray; it is asked again, no actor is replaced or recovery spent, and the metrics
    equal the uninterrupted run's."""
    overrides = json.dumps(tiny_overrides(oph_root, **ROUNDS))
    ray_tmp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")
    chaos = {"CoreWorkerService.grpc_client.PushTask": {"num_failures": 1, "req_failure_prob": 0, "resp_failure_prob": 100}}
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_testing_rpc_failure": json.dumps(chaos), "RAY_testing_rpc_failure_avoid_intra_node_failures": "0"}
    env.pop("RAY_ADDRESS", None)
    script = Path(__file__).with_name("transient_unavailable.py")
    try:
        proc = subprocess.run([sys.executable, str(script), str(oph_root), str(tmp_path / "run"), overrides], capture_output=True, text=True, timeout=300, env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("OK"), (proc.stdout + proc.stderr)[-4000:]
    assert "recovery" not in proc.stdout and "lost" not in proc.stdout, proc.stdout
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "run" / "returned.parquet"), uninterrupted, check_exact=True)
