"""Issue 25 items 1-3: FairSeg's rim (code -1: the disc without the cup) beside disc and cup, the
cup-to-disc ratio of the largest connected components, and equity scaling that needs two groups."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raysim.datasets.fairseg import FairSeg
from raysim.engine.study import check_objective, parse_objective
from raysim.metrics import classification as metrics
from raysim.metrics import segmentation as segmetrics
from raysim.metrics.classification import UndefinedMetricWarning
from raysim.outputs import runs
from raysim.reports import compare
from raysim.reports import run_report as report
from raysim.seeding import derive_seed

from helpers import load_config, make_driver, write_fairseg

GROUPS = {"race": {0: "Asian", 1: "Black", 2: "White"}}
RIM = ("dice_rim", "iou_rim", "hd95_rim", "dice_rim_lo", "dice_rim_hi", "es_dice_rim", "dice_rim_gap")


def disc_with_cup(size: int, top: int, left: int, disc: int, cup: int) -> np.ndarray:
    """A square disc (class 1 rim around a class 2 cup) of `disc` rows, its cup of `cup` rows in the middle."""
    labels = np.zeros((size, size), np.uint8)
    labels[top : top + disc, left : left + disc] = 1
    offset = (disc - cup) // 2
    labels[top + offset : top + offset + cup, left + offset : left + offset + cup] = 2
    return labels


def as_dict(rows: list[metrics.Row]) -> dict[tuple[str, str, str], float]:
    return {(a, g, m): v for a, g, m, v in rows}


# --- 1. the rim ------------------------------------------------------------------------------


def test_rim_is_the_disc_without_the_cup() -> None:
    true = disc_with_cup(32, 8, 8, 12, 6)[None]
    pred = np.roll(true, 2, axis=2)
    values = segmetrics.sample_metrics(pred, true)
    rim_t, rim_p = true[0] == 1, pred[0] == 1  # FairSeg's -1, read as class 1
    overlap = int((rim_t & rim_p).sum())
    assert values["dice_rim"][0] == pytest.approx(2 * overlap / (rim_t.sum() + rim_p.sum()))
    assert values["iou_rim"][0] == pytest.approx(overlap / (rim_t | rim_p).sum())
    assert values["hd95_rim"][0] == pytest.approx(segmetrics.hd95_pixels(rim_p, rim_t) / math.hypot(32, 32))
    assert values["dice_rim"][0] < values["dice_disc"][0]  # the disc's Dice keeps its disc + cup meaning
    assert values["dice_disc"][0] == pytest.approx(2 * 12 * 10 / (2 * 144))


def test_rim_rows_are_recomputable_and_their_intervals_have_no_mean_rows() -> None:
    rng = np.random.default_rng(4)
    true = np.stack([disc_with_cup(24, int(t), 6, 10, 4) for t in rng.integers(2, 10, 9)])
    pred = np.where(rng.random(true.shape) < 0.15, 0, true).astype(np.uint8)
    race = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    values = segmetrics.sample_metrics(pred, true)
    v = as_dict(segmetrics.client_segmentation_metrics(values, {"race": race}, GROUPS, n_boot=30, seed=7))
    assert {m for _, _, m in v} >= set(RIM) and set(RIM) <= set(metrics.METRIC_NAMES)
    rim = values["dice_rim"]
    assert v[("", "", "dice_rim")] == pytest.approx(rim.mean()) and v[("", "", "iou_rim")] == pytest.approx(values["iou_rim"].mean())
    per_group = {c: rim[race == c].mean() for c in range(3)}
    assert v[("race", "Black", "dice_rim")] == pytest.approx(per_group[1])
    assert v[("race", "", "es_dice_rim")] == pytest.approx(rim.mean() / (1 + sum(abs(d - rim.mean()) for d in per_group.values())))
    assert v[("race", "", "dice_rim_gap")] == pytest.approx(max(per_group.values()) - min(per_group.values()))
    columns = np.stack([values["dice_disc"], values["dice_cup"], rim], axis=1)  # disc, cup and rim share the resamples
    assert segmetrics.bootstrap_mean_intervals(columns, n_boot=30, seed=7)[2].tolist() == [v[("", "", "dice_rim_lo")], v[("", "", "dice_rim_hi")]]
    # the disc and cup intervals are those of before: adding the rim column changes no resample
    assert segmetrics.bootstrap_mean_intervals(columns[:, :2], n_boot=30, seed=7)[0].tolist() == [v[("", "", "dice_disc_lo")], v[("", "", "dice_disc_hi")]]
    frame = pd.DataFrame([(1, "test", c, "", "", "", m, 0.5) for c in ("a", "b") for m in ("dice_rim", "dice_rim_lo", "dice_rim_hi")], columns=list(metrics.FRAME_COLUMNS))
    assert metrics.mean_over_clients(frame)["metric"].tolist() == ["dice_rim"]


def test_tune_accepts_the_rim_objectives() -> None:
    cfg = load_config("segmentation", [])
    for text in ("dice_rim - 0.5*dice_rim_gap", "es_dice_rim", "(dice_rim + dice_cup) / 2"):
        check_objective(parse_objective(text), cfg)


@pytest.fixture(scope="module")
def fairseg_run(ray_session, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fairseg")
    write_fairseg(root, n_train=12, n_test=6)
    run_dir = tmp_path_factory.mktemp("run") / "fairseg"
    extra = {"data.name": "fairseg", "model.name": "unet:test_resnet", "federation.rounds": 1, "eval.bootstrap": 10, "report.html": True, "resources.clients_per_actor": 3}  # one actor
    make_driver(root, run_dir, **extra).run()
    return run_dir


@pytest.mark.filterwarnings("ignore::raysim.metrics.UndefinedMetricWarning")  # a tiny set: groups may be empty
def test_a_fairseg_run_writes_and_reports_rim_and_cup(fairseg_run: Path) -> None:
    cfg = load_config(fairseg_run / "config.yaml", [])
    stored = pd.read_parquet(fairseg_run / "metrics.parquet")
    assert {"dice_rim", "dice_cup", "es_dice_rim", "dice_rim_lo", "dice_rim_gap", "hd95_rim"} <= set(stored["metric"])
    preds = pd.read_parquet(fairseg_run / "predictions.parquet")
    names = FairSeg(cfg.data, img_size=cfg.model.img_size, seed=cfg.seed).group_names
    attributes = [a for a in names if a in preds.columns]
    checked = 0
    for (round_, split, client), rows in preds.groupby(["round", "split", "client"]):
        seed = derive_seed(cfg.seed, "boot", int(round_), client, split)
        samples = {c: rows[c].to_numpy() for c in segmetrics.SAMPLE_COLUMNS}
        recomputed = segmetrics.client_segmentation_metrics(samples, {a: rows[a].to_numpy() for a in attributes}, {a: names[a] for a in attributes}, n_boot=cfg.eval.bootstrap, seed=seed)
        have = stored[(stored["round"] == round_) & (stored["split"] == split) & (stored["client"] == client)]
        have = {(r.attribute, r.group, r.metric): r.value for r in have.itertuples()}
        for attr, group, metric, value in recomputed:
            if "rim" in metric:
                assert np.isclose(have[(attr, group, metric)], value, equal_nan=True), (split, client, attr, group, metric)
                checked += 1
    assert checked > 20
    page = (fairseg_run / "report.html").read_text()
    for label in ("Dice rim", "Dice cup", "ES-Dice rim", "hd95 rim", "medpy"):
        assert label in page, label
    assert runs.read_run(fairseg_run).task == "segmentation" and report.SEG_NAMES["dice_rim"] == "Dice rim"
    comparison = compare.compare([fairseg_run])
    table = comparison.markdown()
    assert "Dice rim" in table and "Dice cup" in table and "ES-Dice rim" in table
    assert comparison.per_run["dice_rim"].iloc[0] == runs.value(stored, round_=1, split="test", metric="dice_rim")


# --- 2. the cup-to-disc ratio ----------------------------------------------------------------


def test_one_stray_cup_pixel_leaves_the_cdr_error_at_zero() -> None:
    true = disc_with_cup(64, 16, 16, 30, 14)[None]
    pred = true.copy()
    pred[0, 60, 60] = 2  # one stray cup pixel far below the disc
    values = segmetrics.sample_metrics(pred, true)
    assert values["dice_cup"][0] > 0.99
    assert values["cdr_error"][0] == 0.0  # 0.356 on 0.5.0: the stray pixel stretched both extents (37 / 45 rows)
    assert segmetrics.vertical_cdr(pred[0]) == pytest.approx(14 / 30)
    stray_disc = true[0].copy()
    stray_disc[2, 2] = 1  # a stray rim pixel above: the disc is still the big component
    assert segmetrics.vertical_cdr(stray_disc) == pytest.approx(14 / 30)


# --- 3. equity scaling needs two groups ------------------------------------------------------


def test_equity_scaling_with_fewer_than_two_defined_groups_is_undefined() -> None:
    for per_group in ({0: 0.7}, {0: math.nan, 1: 0.7}, {}):
        with pytest.warns(UndefinedMetricWarning, match="fewer than two groups"):
            assert math.isnan(metrics.equity_scaled(0.8, per_group))
    assert metrics.equity_scaled(0.75, {0: 0.7, 1: math.nan, 2: 0.8}) == pytest.approx(0.75 / 1.1)


def test_a_single_group_client_reports_no_equity() -> None:
    rng = np.random.default_rng(1)
    labels, scores, race = np.tile([0, 1], 10), rng.random(20), np.zeros(20, int)
    with warnings.catch_warnings(record=True) as caught:  # as the driver counts a round's undefined values
        warnings.simplefilter("always", UndefinedMetricWarning)
        rows = as_dict(metrics.client_metrics(labels, scores, {"race": race}, GROUPS, n_boot=0))
    assert all(math.isnan(rows[("race", "", m)]) for m in ("es_auc", "es_acc", "es_bacc"))
    assert sum("fewer than two groups" in str(w.message) for w in caught) == 3
    true = np.stack([disc_with_cup(16, 3, 3, 8, 4)] * 4)
    values = segmetrics.sample_metrics(true, true)
    with pytest.warns(UndefinedMetricWarning, match="fewer than two groups"):
        seg = as_dict(segmetrics.client_segmentation_metrics(values, {"race": np.zeros(4, int)}, GROUPS, n_boot=0))
    assert all(math.isnan(seg[("race", "", m)]) for m in ("es_dice", "es_dice_disc", "es_dice_cup", "es_dice_rim"))
    # `mean` ES rows average the clients where ES is defined
    frame = pd.DataFrame([(1, "test", "a", "", "race", "", "es_auc", math.nan), (1, "test", "b", "", "race", "", "es_auc", 0.6)], columns=list(metrics.FRAME_COLUMNS))
    assert metrics.mean_over_clients(frame)["value"].tolist() == [0.6]
