"""eval.holdout_site, FL-MedSegBench's unseen-site protocol (issue 17, item 5): the held-out site
never trains, is never sampled and sits in no mean; it is scored at each evaluation with its
method's `newcomer_model`, whose evaluation leaves every other client's numbers as they were."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from raysim.algorithms.base import HOLDOUT
from raysim.algorithms.fedbn import norm_keys
from raysim.config import ConfigError
from raysim.datasets import DATASETS
from raysim.engine.checkpoints import folder, load_manifest
from raysim.engine.client_actor import ClientHost
from raysim.outputs import runs
from raysim.reports import run_report as report
from raysim.run import main as run_main

from helpers import load_config, make_driver, tiny_overrides

PARTICIPANTS = ["site1", "site2"]


@pytest.fixture(scope="module")
def holdout_run(ray_session, oph_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """FedBN (a newcomer rule of its own) on the tiny set, 2 rounds at 16 px, site3 held out, all
    three clients in one actor: the held-out site is scored in the model the participants share."""
    lines: list[str] = []
    run_dir = tmp_path_factory.mktemp("holdout") / "fedbn"
    make_driver(oph_root, run_dir, lines, **{"algorithm.name": "fedbn", "eval.holdout_site": "site3", "resources.clients_per_actor": 3}).run()
    return run_dir, lines


@pytest.mark.filterwarnings("ignore::raysim.metrics.UndefinedMetricWarning")  # the tiny set's empty groups
def test_the_held_out_site_never_trains_and_sits_in_no_mean(holdout_run: tuple[Path, list[str]]) -> None:
    run_dir, lines = holdout_run
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    held = metrics[metrics["client"] == "site3"]
    assert len(held) and (held["role"] == HOLDOUT).all() and set(held["split"]) == {"val", "test"}  # no train row: no traffic, no loss
    trained = metrics[(metrics["split"] == "train") & (metrics["metric"] == "bytes_up")]
    assert set(trained["client"]) == {*PARTICIPANTS, "mean"}  # both rounds sampled site1 and site2 only
    assert not metrics["client"].str.startswith("mean:").any() and (metrics.loc[metrics["client"] != "site3", "role"] == "").all()
    for (round_, split), rows in metrics[(metrics["split"] != "train") & (metrics["attribute"] == "") & (metrics["metric"] == "auc")].groupby(["round", "split"]):
        by_client = rows.set_index("client")["value"]
        assert np.isclose(by_client["mean"], by_client[PARTICIPANTS].mean()), (round_, split)  # the mean is the participants'
        assert not np.isclose(by_client["mean"], by_client[[*PARTICIPANTS, "site3"]].mean())
    assert "site3" not in load_manifest(folder(run_dir, 2)).get("clients", {})  # its state never changed: nothing to save
    preds = pd.read_parquet(run_dir / "predictions.parquet")
    assert {"site3"} < set(preds["client"])
    console = "\n".join(lines)
    assert "site3 (" in console and "holdout)" in console and "eval.holdout_site=site3: never trains" in console and "re-estimated on the site's own training images" in console
    # reading back: the participants are the clients; the held-out site is named apart
    run = runs.read_run(run_dir)
    assert runs.clients(run.metrics) == PARTICIPANTS and runs.holdout_clients(run.metrics) == ["site3"]
    at = run.selection().round
    assert np.isclose(
        runs.holdout_values(run.metrics, at)["site3"]["auc"], held[(held["round"] == at) & (held["split"] == "test") & (held["metric"] == "auc") & (held["attribute"] == "")]["value"].iloc[0]
    )
    page = report.build(run)
    assert "Unseen site" in page and "test AUC site3" in page


def after_one_round(oph_root: Path, **overrides: object) -> tuple[ClientHost, dict]:
    """In-process (the actor's body): the synthetic set with site3 held out, one round of the
    participants trained and folded; the host and round 2's payload."""
    cfg = load_config(None, tiny_overrides(oph_root, **{"data.name": "synthetic", "eval.holdout_site": "site3", **overrides}))
    specs = DATASETS.get("synthetic")(cfg.data, img_size=16, seed=0).client_specs()
    host = ClientHost(cfg, [dataclasses.replace(s, role=HOLDOUT) if s.id == "site3" else s for s in specs])
    algorithm, model = host.algorithm, host.clients["site1"].model
    state = algorithm.init_state(model)
    state = algorithm.aggregate(1, [host.fit(cid, algorithm.payload(state, 1), 1) for cid in PARTICIPANTS], state)
    return host, algorithm.payload(state, 2)


def test_the_newcomer_leaves_the_participants_alone_segmentation(oph_root: Path) -> None:
    """In-process (the actor's body): FedBN on the U-Net. The held-out site's newcomer model is the
    global payload with BatchNorm statistics of its own images; scoring it changes neither its
    state nor any participant's predictions, though all three share one model object."""
    host, payload = after_one_round(oph_root, **{"model.name": "unet:test_resnet", "algorithm.name": "fedbn"})
    algorithm, model = host.algorithm, host.clients["site1"].model
    before = host.evaluate("site1", payload)
    held = host.evaluate("site3", payload)
    after = host.evaluate("site1", payload)
    for a, b in zip(before, after, strict=True):
        assert all(np.array_equal(a.values[k], b.values[k], equal_nan=True) for k in a.values)
    assert {p.role for p in held} == {HOLDOUT} and {p.split for p in held} == {"val", "test"} and {p.task for p in held} == {"segmentation"}
    site3 = host.clients["site3"]
    assert site3.own_state == {} and site3.memory == {}  # never trained, nothing kept
    newcomer = {k: v.clone() for k, v in algorithm.newcomer_model(site3, payload).state_dict().items()}
    initial = site3.initial_state
    means = [k for k in norm_keys(model, params=False) if k.endswith("running_mean")]
    weights = [k for k in norm_keys(model, buffers=False) if k.endswith(".weight")]
    assert all(torch.equal(newcomer[k], payload[k]) for k in payload)  # every shared tensor is the server's
    assert all(torch.equal(newcomer[k], initial[k]) for k in weights)  # FedBN's server holds no affine parameters
    assert means and all(not torch.equal(newcomer[k], initial[k]) for k in means)  # statistics of the site's own images
    assert not any(torch.equal(newcomer[k], host.clients["site1"].own_state[k]) for k in means)  # not a participant's


def test_a_bad_holdout_site_is_one_line_before_training(oph_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert run_main(["--out", str(out), *tiny_overrides(oph_root, **{"eval.holdout_site": "site9"})]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: eval.holdout_site='site9' is not a client of data source fairfedmed_oph; its clients: site1, site2, site3" and not out.exists()
    with pytest.raises(ConfigError, match="^algorithm local has no model for a site that never trained, so eval.holdout_site=site3 cannot be scored"):
        make_driver(oph_root, tmp_path / "local", **{"algorithm.name": "local", "eval.holdout_site": "site3"})
    pooled = {"data.partition": "iid", "data.num_clients": 1, "eval.holdout_site": "client1"}
    with pytest.raises(ConfigError, match="^eval.holdout_site=client1 is the only client of data source fairfedmed_oph: no client would train"):
        make_driver(oph_root, tmp_path / "only", **pooled)
    driver = make_driver(oph_root, tmp_path / "pooled", **{**pooled, "data.num_clients": 3, "eval.holdout_site": "client2"})  # partition ids work too
    participants, held = driver._hold_out(driver.source.client_specs())
    assert [s.id for s in participants] == ["client1", "client3"] and held is not None and (held.id, held.role) == ("client2", HOLDOUT)
    with pytest.raises(ConfigError, match="eval.holdout_site must be a client id"):
        load_config(None, ["eval.holdout_site=''"])


def test_cksp_scores_the_held_out_site_with_its_own_norm_statistics(oph_root: Path) -> None:
    """Issue 24.7: CKSP keeps every norm layer per client, so a site that never trained has none;
    0.5.0 scored it with the initial running statistics (0 / 1). Its newcomer model now carries
    statistics re-estimated on the site's own images, the shared tensors being the server's."""
    host, payload = after_one_round(oph_root, **{"algorithm.name": "cksp"})
    algorithm, model = host.algorithm, host.clients["site1"].model
    site3 = host.clients["site3"]
    newcomer = {k: v.clone() for k, v in algorithm.newcomer_model(site3, payload).state_dict().items()}
    means = [k for k in norm_keys(model, params=False) if k.endswith(("running_mean", "running_var"))]
    assert means and all(not torch.equal(newcomer[k], site3.initial_state[k]) for k in means)  # the site's own statistics
    assert all(torch.equal(newcomer[k], payload[k]) for k in payload)  # every shared tensor is the server's
    assert site3.own_state == {}  # nothing kept
