"""A Tune trial whose process is killed is retried from its checkpoint and ends with the
results of an uninterrupted trial (real Ray Tune, a real SIGKILL; no mocks)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from raysim import config
from raysim.tune import Study, load_study, trial_statuses, tuner

from conftest import tiny_overrides

TRIAL_PROCESS = "ray::ImplicitFunc"  # a Tune function trial's actor (Ray 2.x): run_trial runs there
ROUNDS = 3


def _study(oph_root: Path, tmp_path: Path, **extra: object) -> Study:
    """One trial (a choice of one value, FIFO), 3 rounds, evaluated and checkpointed every round."""
    base = tmp_path / "base.yaml"
    overrides = {"federation.rounds": ROUNDS, "eval.every": 1, "checkpoint.every": 1, "eval.bootstrap": 0, "resources.num_cpus": 0.2} | extra
    base.write_text(config.dump(config.load(None, tiny_overrides(oph_root, **overrides))))
    path = tmp_path / "study.yaml"
    body = {"base": "base.yaml", "search_space": {"federation.lr": {"choice": [0.01]}}, "objective": "auc - 0.5*eod", "num_samples": 1, "scheduler": "fifo"}
    path.write_text(yaml.safe_dump(body))
    return load_study(path)


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])  # ppid, after the (comm) that may hold spaces


def _ours(pid: int, experiment: Path) -> bool:
    """A process of this session's Ray (the raylet that spawns the workers is a child of this
    pytest process) working in a trial directory of `experiment`: never another session's."""
    me, seen = os.getpid(), pid
    try:
        while seen > 1 and seen != me:
            seen = _parent(seen)
        cwd = Path(f"/proc/{pid}/cwd").resolve()
    except OSError:
        return False
    return seen == me and experiment.name in cwd.parts


def _trial_processes(experiment: Path) -> list[int]:
    found = subprocess.run(["pgrep", "-f", TRIAL_PROCESS], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found if _ours(int(pid), experiment)]


def _reported(experiment: Path) -> int:
    """Results in the trial's result.json. The Tune controller writes one when it takes a report,
    whose checkpoint the trial process has saved to the study directory before sending it."""
    files = list(experiment.glob("*/result.json"))
    return sum(1 for line in files[0].read_text().splitlines() if line.strip()) if files else 0


def _kill_after_first_report(experiment: Path, killed: dict[str, object], done: threading.Event) -> None:
    """SIGKILL the trial's process once round 1 is reported; its driver actor and client actors
    (owned by it) go with it."""
    while not done.is_set():
        if _reported(experiment) >= 1:
            pids = _trial_processes(experiment)
            killed["reported"] = _reported(experiment)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            killed["pids"] = pids
            return
        time.sleep(0.02)


def _fit(study: Study, experiment: Path, *, kill: bool) -> tuple[object, dict[str, object]]:
    killed: dict[str, object] = {}
    done = threading.Event()
    killer = threading.Thread(target=_kill_after_first_report, args=(experiment, killed, done), daemon=True)
    if kill:
        killer.start()
    try:
        results = tuner(study, str(experiment), resume=False).fit()
    finally:
        done.set()
        if kill:
            killer.join(timeout=30)
    return results, killed


@pytest.mark.timeout(360)
def test_a_killed_trial_process_is_retried_from_its_checkpoint(ray_session, oph_root: Path, tmp_path: Path) -> None:
    from ray.tune import ExperimentAnalysis

    study = _study(oph_root, tmp_path)
    assert study.config().fault.max_restarts >= 1  # Tune's max_failures: with 0 the trial would end in ERROR
    full, _ = _fit(study, tmp_path / "full", kill=False)
    results, killed = _fit(study, tmp_path / "killed", kill=True)

    # exactly one process, the trial's, killed after round 1 of 3 was reported and checkpointed
    assert len(killed.get("pids", [])) == 1 and 1 <= killed["reported"] < ROUNDS, killed
    experiment = tmp_path / "killed"
    assert trial_statuses(results, str(experiment)) == ["TERMINATED"], [r.error for r in results]
    (trial,) = ExperimentAnalysis(str(experiment)).trials
    assert trial.num_failures == 1
    (error,) = experiment.glob("*/error.txt")
    assert f"pid: {killed['pids'][0]}" in error.read_text() and "Failure # 1" in error.read_text()

    # restarted from the checkpoint of the reported round, not from round 1
    history = results[0].metrics_dataframe
    done_before = killed["reported"]
    assert history["round"].tolist() == list(range(1, ROUNDS + 1))
    assert history["training_iteration"].tolist() == list(range(1, ROUNDS + 1))
    assert history["iterations_since_restore"].tolist() == list(range(1, done_before + 1)) + list(range(1, ROUNDS - done_before + 1))

    # the same reported results and the same metrics.parquet as the uninterrupted trial
    assert trial_statuses(full, str(tmp_path / "full")) == ["TERMINATED"]
    reported = ["round", "objective", *(c for c in history if c.startswith(("val_", "test_")))]
    pd.testing.assert_frame_equal(history[reported], full[0].metrics_dataframe[reported], check_exact=True)
    expected = pd.read_parquet(Path(full[0].checkpoint.path) / "metrics.parquet")
    assert sorted(expected["round"].unique()) == list(range(1, ROUNDS + 1))
    pd.testing.assert_frame_equal(pd.read_parquet(Path(results[0].checkpoint.path) / "metrics.parquet"), expected, check_exact=True)


@pytest.mark.timeout(240)
def test_a_killed_trial_with_no_retries_left_ends_in_error(ray_session, oph_root: Path, tmp_path: Path) -> None:
    """fault.max_restarts=0 (Tune's max_failures): the same kill fails the trial, and the study
    reports it as ERROR, not as an unfinished trial that --resume would continue."""
    from raysim.tune import trials_table, unfinished

    study = _study(oph_root, tmp_path, **{"fault.max_restarts": 0})
    experiment = tmp_path / "killed"
    results, killed = _fit(study, experiment, kill=True)
    assert len(killed.get("pids", [])) == 1 and 1 <= killed["reported"] < ROUNDS, killed
    assert results[0].error is not None and "ActorDied" in type(results[0].error).__name__, results[0].error
    table = trials_table(results, study, str(experiment))
    assert table["status"].tolist() == ["ERROR"] and unfinished(table) == 0
    assert table["rounds_done"].tolist() == [killed["reported"]]
