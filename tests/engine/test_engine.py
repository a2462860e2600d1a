"""The engine through real Ray actors: outputs contract, determinism, resume, failures."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from raysim.engine.driver import Driver, latest_checkpoint
from raysim.metrics.classification import METRIC_NAMES

from helpers import load_config, make_driver, tiny_overrides

GROUPS = {"race": {"Asian", "Black", "White"}, "gender": {"Female", "Male"}}




def test_two_clients_two_rounds_output_contract(ray_session, oph_root: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    run_dir = tmp_path / "run"
    make_driver(oph_root, run_dir, lines, **{"federation.clients_per_round": 2}).run()

    console = "\n".join(lines)
    lines = console.splitlines()
    assert "round   1/2 | clients 2 |" in console and "ETA" in console
    assert "test metrics after round 2 (x100; attribute: race)" in console
    header = next(line for line in lines if line.startswith("client"))
    assert header.split() == ["client", "AUC", "ES-AUC", "AUC", "Asian", "AUC", "Black", "AUC", "White", "EOD", "SPD"]
    table_rows = [line.split()[0] for line in lines[lines.index(header) + 2 :] if line and line.split()[0].startswith(("site", "mean"))]
    assert table_rows[:4] == ["site1", "site2", "site3", "mean"]

    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert list(metrics.columns) == ["round", "split", "client", "role", "attribute", "group", "metric", "value"]
    assert set(metrics["split"]) == {"val", "test", "train"}
    up = metrics[(metrics["split"] == "train") & (metrics["metric"] == "bytes_up")]
    assert len(up) == 2 * 3 and (up["value"] > 0).all()  # two rounds, two sampled clients + their mean
    train_loss = metrics[(metrics["split"] == "train") & (metrics["metric"] == "loss")]
    assert len(train_loss) == 2 * 3 and (train_loss["value"] > 0).all()  # each sampled client's local training loss + their mean
    assert set(metrics["round"]) == {1, 2}
    assert set(metrics["client"]) == {"site1", "site2", "site3", "mean"}
    assert set(metrics["metric"]) <= set(METRIC_NAMES)
    assert {"auc", "acc", "bacc", "es_auc", "es_acc", "eod", "spd", "auc_lo", "auc_hi", "loss"} <= set(metrics["metric"])
    values = metrics["value"].dropna()
    rates = metrics[~metrics["metric"].isin(["loss", "bytes_up", "bytes_down"])]["value"].dropna()
    assert len(values) > 0 and rates.between(0, 1).all()
    whole = metrics[metrics["metric"].isin(["auc", "acc", "bacc", "loss"]) & (metrics["group"] == "")]
    assert (whole["attribute"] == "").all()
    for attr, names in GROUPS.items():
        assert set(metrics[(metrics["attribute"] == attr) & (metrics["group"] != "")]["group"]) == names
    # the mean row is the mean over clients of each client's value
    r2 = metrics[(metrics["round"] == 2) & (metrics["split"] == "test") & (metrics["metric"] == "auc") & (metrics["attribute"] == "")]
    assert r2[r2["client"] == "mean"]["value"].item() == pytest.approx(r2[r2["client"] != "mean"]["value"].mean())

    preds = pd.read_parquet(run_dir / "predictions.parquet")
    assert list(preds.columns[:6]) == ["round", "split", "client", "sample_id", "label", "score"]
    assert {"race", "gender", "ethnicity", "language", "maritalstatus"} <= set(preds.columns)
    assert preds["race"].dtype == np.int64 and preds["score"].between(0, 1).all()
    assert set(preds["client"]) == {"site1", "site2", "site3"}
    # every test prediction of round 2 reproduces that client's AUC row
    from raysim.metrics.classification import auc

    site1 = preds[(preds["round"] == 2) & (preds["split"] == "test") & (preds["client"] == "site1")]
    assert auc(site1["label"].to_numpy(), site1["score"].to_numpy()) == pytest.approx(r2[r2["client"] == "site1"]["value"].item())
    assert latest_checkpoint(run_dir).name == "round_0002"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    # provenance tells machines apart: CPU, kernels chosen by instruction set, math libraries, threads
    record = json.loads((run_dir / "provenance.json").read_text())
    assert record["attribute"] == "race"  # the target attribute, which reports read back
    assert record["cpu"]["model"] and record["math"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert {"mkl", "onednn", "ATEN_CPU_CAPABILITY", "cpu_count"} <= set(record["math"])
    (actor,) = record["actor_machines"]  # one machine: the actors share this host
    assert actor["cpu_capability"] == record["math"]["cpu_capability"]
    assert actor["torch_settings"] == {
        "torch_threads": 1,
        "cudnn_deterministic": True,
        "cudnn_benchmark": False,
        "deterministic_algorithms": True,
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    }


def test_same_seed_and_any_actor_layout_give_identical_metrics(ray_session, oph_root: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    runs = {n: make_driver(oph_root, tmp_path / f"actors{n}", lines, **{"resources.actors": n}).run() for n in (1, 2, 3)}
    pd.testing.assert_frame_equal(runs[1], runs[2], check_exact=True)
    pd.testing.assert_frame_equal(runs[1], runs[3], check_exact=True)
    assert "starting 1 client actors (0.25 CPU, 0 GPU each; 3 clients per actor)" in lines
    assert "starting 2 client actors (0.25 CPU, 0 GPU each; 1–2 clients per actor)" in lines
    assert "starting 3 client actors (0.25 CPU, 0 GPU each; 1 client per actor)" in lines
    plan = json.loads((tmp_path / "actors2" / "provenance.json").read_text())["actor_plan"]
    assert sorted(len(group) for group in plan) == [1, 2] and sorted(sum(plan, [])) == ["site1", "site2", "site3"]
    other = make_driver(oph_root, tmp_path / "seed1", seed=1).run()  # auto: 3 actors of 0.25 CPU on Ray's 2
    assert not runs[1]["value"].equals(other["value"])


def test_resume_matches_an_uninterrupted_run(ray_session, oph_root: Path, tmp_path: Path) -> None:
    full = make_driver(oph_root, tmp_path / "full", **{"federation.rounds": 3}).run()
    make_driver(oph_root, tmp_path / "cut", **{"federation.rounds": 3}).run(until=1)
    assert latest_checkpoint(tmp_path / "cut").name == "round_0001"
    cfg = load_config(tmp_path / "cut" / "config.yaml")
    resumed = Driver(cfg, tmp_path / "cut", echo=lambda _: None).run(resume=True)
    pd.testing.assert_frame_equal(full, resumed, check_exact=True)
    pd.testing.assert_frame_equal(full, pd.read_parquet(tmp_path / "cut" / "metrics.parquet"), check_exact=True)


def test_cli_run_writes_the_run_directory_and_prints_it_last(ray_session, oph_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI runs the rounds in a driver actor on this node, streams its lines, resolves a
    relative --out against its own working directory (and prints it absolute), and computes the
    in-process driver's bits (with one client actor to start, the in-process run with three)."""
    from raysim import run

    run_dir = tmp_path / "cli"
    overrides = tiny_overrides(oph_root, **{"federation.rounds": 1})
    proc = subprocess.run([sys.executable, "-m", "raysim.run", "--out", "cli", *overrides, "resources.actors=1"], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.strip().splitlines()
    assert out[-1] == str(run_dir) and any(line.startswith("round   1/1 | clients 3 |") for line in out)
    assert "DriverActor pid=" not in proc.stdout + proc.stderr  # warnings come through the stream, not Ray's log prefix
    driver = json.loads((run_dir / "provenance.json").read_text())["driver"]
    assert driver["ray_actor_id"]  # the rounds ran in an actor, not in the CLI process
    for name in ("config.yaml", "provenance.json", "metrics.parquet", "predictions.parquet"):
        assert (run_dir / name).exists(), name
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["federation"]["rounds"] == 1 and saved["model"]["name"] == "test_resnet"
    capsys.readouterr()
    assert run.main(["--out", str(run_dir), *overrides]) == 2 and "--resume" in capsys.readouterr().err  # refused before Ray: no second interpreter needed
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert not math.isnan(metrics[(metrics["client"] == "mean") & (metrics["metric"] == "auc") & (metrics["attribute"] == "")]["value"].iloc[-1])
    in_process = make_driver(oph_root, tmp_path / "in_process", **{"federation.rounds": 1}).run()
    pd.testing.assert_frame_equal(metrics, in_process, check_exact=True)
