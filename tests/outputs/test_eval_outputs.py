"""What an evaluation sends and what survives an empty split (issue 25, items 4 and 5).

Most cases run the client actor's body (`ClientHost`) in-process: its real `Predictions` go
through the driver's metric path (`recorder.metric_frame`, `prediction_rows`, `with_means`)
without Ray. One Ray run reproduces the reported crash end to end.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raysim import secrets
from raysim.config import ConfigError
from raysim.datasets import DATASETS
from raysim.engine.client_actor import ClientHost
from raysim.metrics import segmentation as segmetrics
from raysim.metrics.classification import UndefinedMetricWarning
from raysim.outputs import recorder, runs
from raysim.reports import run_report as report
from raysim.types import Predictions

from helpers import load_config, make_driver, tiny_overrides, write_isic

KEY = "another-test-key-0123456789abcdef"
SEG = {"data.name": "synthetic", "model.name": "unet:test_resnet"}
JOINT = {"data.name": "synthetic", "data.modality": "slo_fundus+oct_onh_bscans", "model.name": "joint:test_resnet"}
ISIC = {"data.name": "fed_isic2019", "federation.batch_size": 4}
EVAL_COLUMNS = ("round", "split", "client", "role", "attribute", "group", "metric")


@pytest.fixture(scope="module")
def isic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fed-ISIC2019 layout, 6 centres x 4 train rows: a 15 % validation share of 4 rows rounds to none."""
    root = tmp_path_factory.mktemp("isic")
    write_isic(root)
    return root


def host_for(root: Path, emptied: str | None = "site1", **overrides: object) -> tuple[ClientHost, dict, list[str]]:
    """A client actor's body over every client of the source (`emptied`'s val split without rows),
    the initial model's payload, and the attributes the driver scores."""
    cfg = load_config(None, tiny_overrides(root, **overrides))
    source = DATASETS.get(cfg.data.name)(cfg.data, img_size=cfg.model.img_size, seed=cfg.seed)
    host = ClientHost(cfg, source.client_specs())
    if emptied is not None:  # as an actor holds a split carved from too few rows (the image sources refuse one at load)
        client, none = host.clients[emptied], np.array([], dtype=np.int64)
        shard = client.shards["val"]
        client.shards["val"] = dataclasses.replace(shard, images=shard.images[:0], table=shard.table.take(none), masks=None if shard.masks is None else shard.masks[:0])
    algorithm = host.algorithm
    payload = algorithm.payload(algorithm.init_state(next(iter(host.clients.values())).model), 1)
    return host, payload, list(source.group_names)


def evaluate_all(host: ClientHost, payload: dict, **kwargs: object) -> list[Predictions]:
    return [p for cid in sorted(host.clients) for p in host.evaluate(cid, payload, **kwargs)]


def scored(preds: list[Predictions], host: ClientHost, attributes: list[str]) -> tuple[pd.DataFrame, list[warnings.WarningMessage]]:
    """The driver's metric rows of one evaluation (with the means) and the warnings raised on the way."""
    names = DATASETS.get(host.cfg.data.name)(host.cfg.data, img_size=host.cfg.model.img_size, seed=host.cfg.seed).group_names
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UndefinedMetricWarning)
        frame = recorder.metric_frame(1, [(p, 7) for p in preds], names, attributes, n_boot=10)
    return recorder.with_means(frame), [w for w in caught if issubclass(w.category, UndefinedMetricWarning)]


# --- item 4: an empty split of any client, in every task --------------------------------------


@pytest.mark.parametrize(
    ("task", "overrides", "emptied"),
    [
        ("classification-binary", {}, "site1"),
        ("classification-multiclass", ISIC, None),  # every centre's val split is empty
        ("segmentation", SEG, "site1"),
        ("joint", JOINT, "site1"),
    ],
)
def test_an_empty_split_gives_undefined_metrics_not_a_crash(task: str, overrides: dict, emptied: str | None, oph_root: Path, isic_root: Path) -> None:
    root = isic_root if task == "classification-multiclass" else oph_root
    host, payload, attributes = host_for(root, emptied, **overrides)
    preds = evaluate_all(host, payload)
    empty = [p for p in preds if len(p.labels) == 0]
    full = [p for p in preds if len(p.labels)]
    assert empty and full
    assert {p.scores.shape[1:] for p in preds} == {full[0].scores.shape[1:]}  # an empty split's scores have the others' shape

    frame, caught = scored(preds, host, attributes)
    rows = recorder.prediction_rows(1, preds, attributes)  # the reported crash: 1-D scores beside 2-D ones
    assert len(rows) == sum(len(p.labels) for p in full)
    for p in empty:
        mine = frame[(frame["client"] == p.client_id) & (frame["split"] == p.split)]
        other = frame[(frame["client"] == p.client_id) & (frame["split"] == "test")]
        assert list(mine["metric"]) == list(other["metric"]) and list(mine["group"]) == list(other["group"])  # the same rows as a full split
        assert mine["value"].isna().all()
        # named in the round's undefined-values warning (the driver logs the count and the first)
        assert any(f"{p.client_id}/{p.split}" in str(w.message) and "no samples" in str(w.message) for w in caught), [str(w.message) for w in caught[:5]]
    # the means over clients leave the empty split out
    test_means = frame[(frame["client"] == "mean") & (frame["split"] == "test")]
    assert test_means["value"].notna().any()


@pytest.mark.parametrize(("task", "overrides"), [("classification-binary", {}), ("joint", JOINT)])
def test_a_diverged_model_gives_undefined_metrics_not_a_crash(task: str, overrides: dict, oph_root: Path) -> None:
    """DEeR at epsilon 1 on 3 clients (issue 24's re-run): noise scaled by the frozen factor's
    sigma_max grew the weights until the logits overflowed, and the run stopped in
    `ValueError: scores contain NaN or infinite values` inside the metrics."""
    host, payload, attributes = host_for(oph_root, None, **overrides)
    preds = evaluate_all(host, payload)
    broken = preds[0]
    broken.scores[: max(1, len(broken.scores) // 2)] = np.nan  # half the scores: what an overflowing softmax gives
    frame, caught = scored(preds, host, attributes)
    mine = frame[(frame["client"] == broken.client_id) & (frame["split"] == broken.split)]
    other = frame[(frame["client"] == broken.client_id) & (frame["split"] != broken.split)]
    assert len(mine) and mine["value"].isna().all()  # every row of that client and split, undefined
    assert other["value"].notna().any()  # the other evaluations of that client are scored
    assert any(f"{broken.client_id}/{broken.split}" in str(w.message) and "not finite" in str(w.message) for w in caught), [str(w.message) for w in caught[:5]]


def test_the_reported_fed_isic2019_run_finishes(ray_session, isic_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The issue's command, on a layout where every centre's val split is empty: it ended after
    round 1 in `ValueError: all the input arrays must have same number of dimensions`."""
    with caplog.at_level(logging.WARNING, logger="raysim"):
        metrics = make_driver(isic_root, tmp_path / "run", **{**ISIC, "federation.rounds": 1, "resources.clients_per_actor": 6}).run()
    val = metrics[(metrics["split"] == "val") & (metrics["metric"] == "auc")]
    assert len(val) and val["value"].isna().all()
    assert metrics[(metrics["split"] == "test") & (metrics["metric"] == "auc") & (metrics["client"] == "mean") & (metrics["attribute"] == "")]["value"].notna().all()
    preds = pd.read_parquet(tmp_path / "run" / "predictions.parquet")
    assert {f"score_{k}" for k in range(8)} <= set(preds.columns) and set(preds["split"]) == {"test"}
    assert any("metric values undefined" in r.getMessage() and "/val" in r.getMessage() for r in caplog.records), caplog.text
    page = report.build(runs.read_run(tmp_path / "run"))  # the report after it (was KeyError 'auc': no group AUC defined)
    assert "No group AUC is defined" in page


# --- item 5: what leaves the actor ------------------------------------------------------------


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "id.key"
    path.write_text(KEY + "\n")
    return path


def test_only_what_the_outputs_keep_leaves_the_actor_and_metrics_stay_identical(oph_root: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(secrets.ID_KEY_ENV, raising=False)
    variants = {
        "default": {},
        "masks": {"eval.masks": "true"},
        "none": {"eval.predictions": "none"},
        "hashed": {"eval.pseudonymize": "true", "eval.id_key_file": str(key_file)},
    }
    sent, frames = {}, {}
    for name, extra in variants.items():
        host, payload, attributes = host_for(oph_root, None, **SEG, **extra)
        sent[name] = evaluate_all(host, payload)
        frames[name], _ = scored(sent[name], host, attributes)
    for name in variants:
        pd.testing.assert_frame_equal(frames[name], frames["default"], check_exact=True)  # what is sent never changes what is measured

    default, masks, none, hashed = (sent[n] for n in variants)
    assert all(p.masks is None for p in default)  # predicted masks are opt-in
    assert all(p.masks is not None and p.masks.shape == (len(p.labels), 16, 16) for p in masks)
    assert all(p.sample_ids is None and p.masks is None for p in none)  # nothing for predictions.parquet: no ids
    assert all(set(p.values) == set(segmetrics.SAMPLE_COLUMNS) for p in none)  # only what the metrics need: no true areas or CDR
    assert all(set(p.values) == {*segmetrics.SAMPLE_COLUMNS, *segmetrics.EXTRA_COLUMNS} for p in default)
    for raw, pseudo in zip(default, hashed, strict=True):  # pseudonymised in the actor: the driver never sees a raw id
        assert list(pseudo.sample_ids) == list(secrets.pseudonym(raw.sample_ids, KEY.encode()))
        assert not set(map(str, raw.sample_ids)) & set(pseudo.sample_ids)
    # an evaluation whose predictions are not written (eval.predictions=final, an earlier round) sends no ids either
    host, payload, _ = host_for(oph_root, None, **SEG, **{"eval.masks": "true", "eval.predictions": "final"})
    assert all(p.sample_ids is None and p.masks is None for p in host.evaluate("site1", payload, record=False))
    assert all(p.sample_ids is not None and p.masks is not None for p in host.evaluate("site1", payload, record=True))


def test_the_actor_reads_the_key_itself_and_refuses_without_one(oph_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(secrets.ID_KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match=r"eval.pseudonymize=true needs a key"):
        host_for(oph_root, None, **{"eval.pseudonymize": "true"})
    monkeypatch.setenv(secrets.ID_KEY_ENV, KEY)  # one machine: the actors inherit the driver's environment
    host, payload, _ = host_for(oph_root, None, **{"eval.pseudonymize": "true"})
    (preds,) = host.evaluate("site2", payload, ["test"])
    raw = host.clients["site2"].shards["test"].table.sample_ids
    assert list(preds.sample_ids) == list(secrets.pseudonym(raw, KEY.encode()))


def test_eval_masks_needs_predictions_to_write_them_to() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["eval.masks=true", "eval.predictions=none"])
    assert "eval.masks" in str(err.value) and "eval.predictions" in str(err.value) and "\n" not in str(err.value)
    assert load_config(None, []).eval.masks is False
