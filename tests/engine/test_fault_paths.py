"""Failure paths of issue 26: a hung actor under drop, runs where every client fails, the driver
actor's own failures and Tune's snapshots. Real Ray (the session's), real signals; no mocks."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import ray

from raysim.engine import failures

from helpers import load_config, make_driver, tiny_overrides


def _gone(pid: int, within: float = 20.0) -> bool:
    """The process has ended (or is a zombie awaiting its parent) within `within` seconds."""
    until = time.monotonic() + within
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        if time.monotonic() >= until:
            return False
        time.sleep(0.2)


def _kill(pids: list[int]) -> None:
    for pid in pids:  # whatever Ray did with it, a stopped process must not linger
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.exclusive  # its deadline is timed
def test_a_hung_actor_under_drop_is_killed_and_left_out_of_later_calls(ray_session, oph_root: Path, tmp_path: Path) -> None:
    """Issue 26.2: the actor hosting site1 stops (SIGSTOP) after round 1. It costs one deadline in
    round 2, is killed (its process goes), and neither round 3 nor its checkpoint waits for it;
    the round that waited for it does not raise the deadline. Issue 26.6: then the two others stop
    too, and a recovery's probe finds all three silent within one deadline, not one each."""
    lines: list[str] = []
    limits = {"federation.rounds": 3, "resources.actors": 3, "fault.on_client_loss": "drop", "fault.min_timeout_s": 8, "fault.timeout_factor": 1}  # 8 s: room for a loaded CI machine
    driver = make_driver(oph_root, tmp_path / "hung", lines, **limits)
    stopped: list[int] = []
    timed: dict[int, float] = {}
    try:
        driver.start()
        pids = {cid: int(ray.get(driver.pool.actor_of(cid).describe.remote())["_pid"]) for cid in driver.specs}
        pid = pids["site1"]
        for round_, part in driver.advance(3):
            if part != "done":
                continue
            timed[round_] = time.perf_counter()
            if round_ == 1:
                deadline = driver.deadline()
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
        killed = _gone(pid)
        for cid in ("site2", "site3"):
            os.kill(pids[cid], signal.SIGSTOP)
            stopped.append(pids[cid])
        probe = time.perf_counter()
        silent = failures.silent(driver.pool, [0, 1, 2], driver.deadline())
        probe = time.perf_counter() - probe
    finally:
        driver.shutdown()
        _kill(stopped)
    gone = driver.pool.clients_of("site1")
    assert any(f"no answer within {deadline:.0f} s); fault.on_client_loss=drop" in line for line in lines), lines
    assert killed, "the hung actor's process is still there"
    assert timed[3] - timed[2] < deadline, (timed, deadline)  # round 3 and its checkpoint never wait for it
    assert driver.slowest_round < deadline, (driver.slowest_round, deadline)  # the wait is not a round's time
    assert sorted(driver.dead) == sorted(gone)
    assert silent == {0, 1, 2} and probe < 1.5 * driver.deadline(), (silent, probe, driver.deadline())


def test_a_run_whose_every_client_fails_stops_resumable_with_exit_1(ray_session, oph_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 26.4: a learning rate that sends every update to Inf / NaN fails every sampled client
    every round; after fault.max_empty_rounds=2 such rounds the CLI stops with exit 1 and one
    line naming the round and the last reason, and that round's checkpoint resumes."""
    from raysim import run
    from raysim.engine import checkpoints

    run_dir = tmp_path / "empty"
    code = run.main(["--out", str(run_dir), *tiny_overrides(oph_root, **{"federation.rounds": 4, "federation.lr": 1e30, "fault.max_empty_rounds": 2, "resources.actors": 1})])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1, err
    assert len(err) == 1 and err[0].startswith("error: round 2: every sampled client failed in 2 consecutive rounds (fault.max_empty_rounds=2); last: "), err
    assert err[0].endswith(f"--resume {run_dir} continues from round_0002"), err
    assert checkpoints.usable(run_dir)[0].name == "round_0002"


@pytest.mark.exclusive  # its deadline is timed
def test_a_silent_driver_actor_is_killed_and_the_run_resumed(ray_session, oph_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 26.6: the driver actor stops (SIGSTOP) after its first checkpoint, holding the run
    lock. Its heartbeats stop; after fault.driver_timeout_s the CLI kills it (else the next
    driver could not take the lock) and resumes the run in a new one, which ends it."""
    from raysim import run
    from raysim.engine import checkpoints

    run_dir = tmp_path / "silent"
    stopped: list[int] = []
    finished = threading.Event()

    def stop_after_round_1() -> None:
        while not checkpoints.latest(run_dir) and not finished.wait(0.1):
            pass
        if not finished.is_set():
            pid = json.loads((run_dir / "provenance.json").read_text())["driver"]["pid"]
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)

    codes: list[int] = []
    overrides = tiny_overrides(oph_root, **{"federation.rounds": 3, "resources.actors": 1, "fault.driver_timeout_s": 6, "fault.max_restarts": 2})
    cli = threading.Thread(target=lambda: codes.append(run.main(["--out", str(run_dir), *overrides])), daemon=True)
    stopper = threading.Thread(target=stop_after_round_1, daemon=True)
    stopper.start()
    cli.start()
    cli.join(timeout=240)
    hung = cli.is_alive()
    finished.set()
    gone = bool(stopped) and _gone(stopped[0], within=0)
    _kill(stopped)  # lets a CLI that waits for ever go on
    cli.join(timeout=120)
    out = capsys.readouterr().out.splitlines()
    assert not hung and stopped and gone, out[-20:]
    assert codes == [0], out[-20:]
    assert any(line.startswith("driver actor lost (no event within fault.driver_timeout_s=6 s); resuming from round_000") for line in out), out
    assert sorted(pd.read_parquet(run_dir / "metrics.parquet")["round"].unique()) == [1, 2, 3]


def test_a_tune_checkpoint_is_a_snapshot_of_its_round_not_the_live_run(ray_session, oph_root: Path, tmp_path: Path) -> None:
    """Issue 26.8: Tune copies the directory a trial reports after the report, while the driver
    actor goes on. Here that copy is slow: it starts once round 2's checkpoint has replaced
    round 1's (checkpoint.keep=1). The directory reported for round 1 must still hold round 1:
    its checkpoint, usable, and metrics up to round 1 only."""
    import shutil

    from raysim import config
    from raysim.engine import checkpoints, driver_actor

    cfg = load_config(None, tiny_overrides(oph_root, **{"federation.rounds": 3, "checkpoint.keep": 1, "resources.actors": 1, "eval.bootstrap": 0}))
    run_dir = tmp_path / "trial" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config.dump(cfg))
    actor = driver_actor.start(cfg, run_dir)
    try:
        driver_actor.wait_started(actor, cfg)
        for event in driver_actor.stream(actor, snapshots=str(tmp_path / "trial" / "snapshots")):
            if event.evaluated is not None:
                reported = Path(getattr(event, "snapshot", None) or run_dir)  # what raysim.engine.tune.run_trial reports
                while checkpoints.latest(run_dir).name != "round_0002":  # Tune's copy starts late
                    time.sleep(0.1)
                copied = Path(shutil.copytree(reported, tmp_path / "tune-checkpoint", ignore=shutil.ignore_patterns(".lock")))
                break
    finally:
        driver_actor.stop(actor, str(run_dir))
    assert event.round == 1
    assert checkpoints.usable(copied)[0].name == "round_0001"
    assert sorted(pd.read_parquet(copied / "metrics.parquet")["round"].unique()) == [1]
