"""A Tune trial whose process is killed is retried from its checkpoint and ends with the
results of an uninterrupted trial (real Ray Tune, a real SIGKILL; no mocks). The study whose
trial has no retries left is a segmentation one: its trial reports the Dice metrics and an
objective over them (raysim.tune's segmentation path through a real trial, at no extra study)."""

from __future__ import annotations

import json
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
from raysim.engine.driver import Driver
from raysim.engine.study import Study, load_study, report_row, task_of
from raysim.engine.tune import trial_statuses, tuner

from helpers import load_config, tiny_overrides

TRIAL_PROCESS = "ray::ImplicitFunc"  # a Tune function trial's actor (Ray 2.x): run_trial runs there
ROUNDS = 3


LR = 0.01  # the study's one value
SEGMENTATION = {"data.name": "synthetic", "model.name": "unet:test_resnet"}  # disc / cup masks of the same tiny set


def _study(oph_root: Path, tmp_path: Path, objective: str = "auc - 0.5*eod", **extra: object) -> Study:
    """One trial (a choice of one value, FIFO), 3 rounds, evaluated and checkpointed every round;
    one client actor (a trial's start and restart each start one process, not three)."""
    base = tmp_path / "base.yaml"
    overrides = {"federation.rounds": ROUNDS, "eval.every": 1, "checkpoint.every": 1, "eval.bootstrap": 0, "resources.num_cpus": 0.2, "resources.actors": 1} | extra
    base.write_text(config.dump(load_config(None, tiny_overrides(oph_root, **overrides))))
    path = tmp_path / "study.yaml"
    body = {"base": "base.yaml", "search_space": {"federation.lr": {"choice": [LR]}}, "objective": objective, "num_samples": 1, "scheduler": "fifo"}
    path.write_text(yaml.safe_dump(body))
    return load_study(path)


def _uninterrupted(study: Study, run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """What an uninterrupted trial reports (one report_row per evaluated round) and writes
    (metrics.parquet): its config run by an in-process driver on the session's Ray, instead of a
    second Tune study (results never depend on where the rounds run: tests/engine/test_engine.py)."""
    cfg = study.config({"federation.lr": LR, "report.html": False})
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config.dump(cfg))
    driver = Driver(cfg, run_dir, echo=lambda _: None)
    metrics = driver.run()
    rounds = sorted(metrics.loc[metrics["split"] == "val", "round"].unique())
    reported = pd.DataFrame([report_row(metrics, int(r), driver.source.attribute, study.objective, task_of(cfg)) for r in rounds])
    return reported, pd.read_parquet(run_dir / "metrics.parquet")


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


def _fit_killed(study: Study, experiment: Path) -> tuple[object, dict[str, object]]:
    """The study, its trial's process killed once round 1 is reported."""
    killed: dict[str, object] = {}
    done = threading.Event()
    killer = threading.Thread(target=_kill_after_first_report, args=(experiment, killed, done), daemon=True)
    killer.start()
    try:
        results = tuner(study, str(experiment), resume=False).fit()
    finally:
        done.set()
        killer.join(timeout=30)
    return results, killed


@pytest.mark.timeout(360)
def test_a_killed_trial_process_is_retried_from_its_checkpoint(ray_session, oph_root: Path, tmp_path: Path) -> None:
    from ray.tune import ExperimentAnalysis

    study = _study(oph_root, tmp_path)
    assert study.config().fault.max_restarts >= 1  # Tune's max_failures: with 0 the trial would end in ERROR
    results, killed = _fit_killed(study, tmp_path / "killed")

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

    # the same reported results and the same metrics.parquet as an uninterrupted trial
    full, expected = _uninterrupted(study, tmp_path / "full")
    assert {"round", "objective", *(c for c in history if c.startswith(("val_", "test_")))} == set(full.columns)
    pd.testing.assert_frame_equal(history[list(full.columns)], full, check_exact=True)
    assert sorted(expected["round"].unique()) == list(range(1, ROUNDS + 1))
    pd.testing.assert_frame_equal(pd.read_parquet(Path(results[0].checkpoint.path) / "metrics.parquet"), expected, check_exact=True)


@pytest.mark.timeout(240)
def test_a_killed_trial_with_no_retries_left_ends_in_error(ray_session, oph_root: Path, tmp_path: Path) -> None:
    """fault.max_restarts=0 (Tune's max_failures): the same kill fails the trial, and the study
    reports it as ERROR, not as an unfinished trial that --resume would continue. A segmentation
    study: what its trial reported before the kill is the segmentation metrics."""
    from raysim.engine.study import OBJECTIVE_METRICS
    from raysim.engine.tune import trials_table, unfinished

    study = _study(oph_root, tmp_path, "dice - 0.5*dice_gap", **{"fault.max_restarts": 0, **SEGMENTATION})
    assert study.task == "segmentation"
    experiment = tmp_path / "killed"
    results, killed = _fit_killed(study, experiment)
    assert len(killed.get("pids", [])) == 1 and 1 <= killed["reported"] < ROUNDS, killed
    assert results[0].error is not None and "ActorDied" in type(results[0].error).__name__, results[0].error
    table = trials_table(results, study, str(experiment))
    assert table["status"].tolist() == ["ERROR"] and unfinished(table) == 0
    assert table["rounds_done"].tolist() == [killed["reported"]]
    reported = {c.removeprefix("val_") for c in table if c.startswith("val_")}
    assert reported == set(OBJECTIVE_METRICS["segmentation"].names), reported  # the task's metrics, no AUC
    best = table.iloc[0]
    assert 0 <= best["val_dice"] <= 1 and best["val_dice"] == pytest.approx((best["val_dice_disc"] + best["val_dice_cup"]) / 2)  # round 1 at 16 px: may be 0
    assert best["objective"] == pytest.approx(best["val_dice"] - 0.5 * best["val_dice_gap"])
    saved = Path(results[0].checkpoint.path)  # the reported round's run directory: what the trial reported is its rows
    row = report_row(pd.read_parquet(saved / "metrics.parquet"), int(best["best_round"]), json.loads((saved / "provenance.json").read_text())["attribute"], study.objective, "segmentation")
    assert {k: best[k] for k in row if k != "round"} == pytest.approx({k: v for k, v in row.items() if k != "round"}, nan_ok=True)
