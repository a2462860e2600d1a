"""Segmentation metrics: hand-computed Dice / IoU, hd95 of a known shift, CDR, ES-Dice, bootstrap, empty masks."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from raysim.metrics import classification as metrics
from raysim.metrics import segmentation as S
from raysim.metrics.classification import UndefinedMetricWarning


def square(size: int, top: int, left: int, side: int, label: int = 1, into: np.ndarray | None = None) -> np.ndarray:
    out = np.zeros((size, size), np.uint8) if into is None else into
    out[top : top + side, left : left + side] = label
    return out


def test_dice_and_iou_by_hand() -> None:
    pred = np.array([[1, 1, 0, 0], [1, 1, 0, 0]], bool)  # 4 pixels
    true = np.array([[0, 1, 1, 0], [0, 1, 1, 0]], bool)  # 4 pixels, 2 shared
    assert S.dice(pred, true) == pytest.approx(2 * 2 / 8)
    assert S.iou(pred, true) == pytest.approx(2 / 6)
    assert S.dice(pred, pred) == S.iou(pred, pred) == 1.0


def test_disc_counts_the_cup_and_cup_is_label_two() -> None:
    true = square(10, 2, 2, 6)  # disc rim 36 pixels ...
    square(10, 4, 4, 2, label=2, into=true)  # ... with a 4-pixel cup inside
    pred = square(10, 2, 2, 6)  # the whole disc predicted as rim: no cup
    values = S.sample_metrics(pred[None], true[None])
    assert values["dice_disc"][0] == 1.0 and values["iou_disc"][0] == 1.0  # disc = label >= 1
    assert values["dice_cup"][0] == 0.0 and values["hd95_cup"][0] == 1.0  # missed cup: the worst values
    assert values["area_disc"][0] == values["area_disc_true"][0] == pytest.approx(36 / 100)
    assert values["area_cup"][0] == 0.0 and values["area_cup_true"][0] == pytest.approx(4 / 100)
    assert values["cdr"][0] == 0.0 and values["cdr_true"][0] == pytest.approx(2 / 6) and values["cdr_error"][0] == pytest.approx(2 / 6)


def test_hd95_of_a_known_shift() -> None:
    a = square(64, 20, 20, 20).astype(bool)
    b = square(64, 20, 23, 20).astype(bool)  # the same square 3 pixels to the right
    assert S.hd95_pixels(a, b) == pytest.approx(3.0)
    assert S.hd95(a, b) == pytest.approx(3.0 / math.hypot(64, 64))
    c = square(64, 24, 20, 20).astype(bool)  # 4 pixels down: symmetric and translation-only
    assert S.hd95_pixels(a, c) == pytest.approx(4.0) and S.hd95_pixels(c, a) == pytest.approx(4.0)
    assert S.hd95_pixels(a, a) == 0.0


def test_empty_mask_conventions() -> None:
    empty, some = np.zeros((8, 8), bool), square(8, 2, 2, 3).astype(bool)
    assert S.dice(empty, empty) == S.iou(empty, empty) == 1.0  # nothing there, nothing predicted
    assert S.dice(some, empty) == S.dice(empty, some) == S.iou(some, empty) == 0.0
    assert S.hd95(empty, empty) == 0.0 and S.hd95(some, empty) == S.hd95(empty, some) == 1.0
    assert math.isinf(S.hd95_pixels(empty, some))
    blank = np.zeros((1, 8, 8), np.uint8)
    disc = square(8, 2, 2, 4)[None]
    both_empty = S.sample_metrics(blank, blank)
    assert both_empty["dice_disc"][0] == both_empty["dice_cup"][0] == 1.0 and math.isnan(both_empty["cdr_error"][0])  # no disc in the truth
    missed = S.sample_metrics(blank, disc)
    assert missed["dice_disc"][0] == 0.0 and missed["hd95_disc"][0] == 1.0 and missed["cdr_error"][0] == 1.0  # no disc predicted
    assert missed["dice_cup"][0] == 1.0  # neither has a cup
    assert math.isnan(S.vertical_cdr(blank[0])) and S.vertical_cdr(disc[0]) == 0.0


def test_vertical_cdr_uses_rows_only() -> None:
    labels = square(40, 10, 5, 20)  # 20 disc rows
    labels[15:25, 10:12] = 2  # 10 cup rows, only 2 columns wide
    assert S.vertical_cdr(labels) == pytest.approx(0.5)
    assert S.class_fractions(labels).tolist() == pytest.approx([1200 / 1600, 380 / 1600, 20 / 1600])


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="one shape"):
        S.sample_metrics(np.zeros((2, 4, 4), np.uint8), np.zeros((2, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="integer labels 0"):
        S.sample_metrics(np.full((1, 4, 4), 3, np.uint8), np.zeros((1, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="lack hd95_cup"):
        S.client_segmentation_metrics({c: [1.0] for c in S.SAMPLE_COLUMNS if c != "hd95_cup"}, {}, {})
    with pytest.raises(ValueError, match="dice_cup must lie in"):
        S.client_segmentation_metrics({**{c: [0.5] for c in S.SAMPLE_COLUMNS}, "dice_cup": [math.nan]}, {}, {})
    with pytest.raises(ValueError, match="codes \\[5\\] missing from group_names"):
        S.client_segmentation_metrics({c: [0.5] for c in S.SAMPLE_COLUMNS}, {"race": [5]}, {"race": {0: "A"}})


# --- aggregation ---------------------------------------------------------------------------------

GROUPS = {"race": {0: "Asian", 1: "Black", 2: "White"}}


def samples() -> tuple[dict[str, np.ndarray], np.ndarray]:
    disc = np.array([0.9, 0.8, 0.7, 0.6, 0.95, 0.85])
    cup = np.array([0.7, 0.5, 0.6, 0.4, 0.8, 0.9])
    values = {c: np.full(6, 0.1) for c in S.SAMPLE_COLUMNS}
    values.update(dice_disc=disc, dice_cup=cup, cdr_error=np.array([0.1, np.nan, 0.3, 0.2, 0.0, 0.1]))
    return values, np.array([0, 0, 1, 1, 2, -1])  # one sample of unknown race


def as_dict(rows: list[tuple[str, str, str, float]]) -> dict[tuple[str, str, str], float]:
    return {(a, g, m): v for a, g, m, v in rows}


def test_client_rows_equity_scaling_and_gaps() -> None:
    values, race = samples()
    rows = S.client_segmentation_metrics(values, {"race": race}, GROUPS, n_boot=50, seed=3)
    keys = [(a, g, m) for a, g, m, _ in rows]
    assert keys[: len(S.GROUP_METRICS)] == [("", "", m) for m in S.GROUP_METRICS]
    assert keys[len(S.GROUP_METRICS) :][: len(S.EQUITY)] == [("race", "", m) for m in S.EQUITY]
    assert {m for _, _, m in keys} == set(S.METRIC_NAMES) and set(S.METRIC_NAMES) <= set(metrics.METRIC_NAMES)
    v = as_dict(rows)
    disc, cup = values["dice_disc"], values["dice_cup"]
    assert v[("", "", "dice_disc")] == pytest.approx(disc.mean())  # the unknown-race sample counts for the client
    assert v[("", "", "cdr_error")] == pytest.approx(np.nanmean(values["cdr_error"]))  # NaN (no disc in the truth) left out
    groups = {0: [0, 1], 1: [2, 3], 2: [4]}
    disc_g = {g: disc[i].mean() for g, i in groups.items()}
    cup_g = {g: cup[i].mean() for g, i in groups.items()}
    assert v[("race", "", "es_dice_disc")] == pytest.approx(disc.mean() / (1 + sum(abs(d - disc.mean()) for d in disc_g.values())))
    assert v[("race", "", "es_dice_cup")] == pytest.approx(cup.mean() / (1 + sum(abs(c - cup.mean()) for c in cup_g.values())))
    mean_dice, mean_g = (disc.mean() + cup.mean()) / 2, {g: (disc_g[g] + cup_g[g]) / 2 for g in groups}
    es_dice = mean_dice / (1 + sum(abs(m - mean_dice) for m in mean_g.values()))
    assert v[("race", "", "es_dice")] == pytest.approx(es_dice)  # ES of the mean Dice ...
    assert es_dice != pytest.approx((v[("race", "", "es_dice_disc")] + v[("race", "", "es_dice_cup")]) / 2)  # ... not the mean of the ES
    assert v[("race", "", "dice_disc_gap")] == pytest.approx(max(disc_g.values()) - min(disc_g.values()))
    assert v[("race", "", "dice_gap")] == pytest.approx(max(mean_g.values()) - min(mean_g.values()))
    assert v[("race", "Black", "dice_cup")] == pytest.approx(0.5) and v[("race", "White", "iou_disc")] == pytest.approx(0.1)
    lo, hi = v[("race", "Asian", "dice_disc_lo")], v[("race", "Asian", "dice_disc_hi")]
    assert 0.8 <= lo <= disc_g[0] <= hi <= 0.9
    assert v[("race", "White", "dice_disc_lo")] == v[("race", "White", "dice_disc_hi")] == 0.95  # one sample: no spread


def test_bootstrap_is_seeded() -> None:
    values, race = samples()
    run = lambda seed: as_dict(S.client_segmentation_metrics(values, {"race": race}, GROUPS, n_boot=40, seed=seed))  # noqa: E731
    a, b, c = run(7), run(7), run(8)
    assert a == b
    assert any(a[k] != c[k] for k in a if k[2].endswith(("_lo", "_hi")))
    # The client's interval is seeded by `seed`; a group's by (seed, code) as the AUC intervals (metrics._group_seed).
    columns = np.stack([values["dice_disc"], values["dice_cup"]], axis=1)
    assert S.bootstrap_mean_intervals(columns, n_boot=40, seed=7)[0].tolist() == [a[("", "", "dice_disc_lo")], a[("", "", "dice_disc_hi")]]
    asian = S.bootstrap_mean_intervals(columns[[0, 1]], n_boot=40, seed=metrics._group_seed(7, 0))
    assert asian[1].tolist() == [a[("race", "Asian", "dice_cup_lo")], a[("race", "Asian", "dice_cup_hi")]]
    none = as_dict(S.client_segmentation_metrics(values, {}, {}, n_boot=0))
    assert all(math.isnan(none[("", "", m)]) for m in S.INTERVALS) and none[("", "", "dice_cup")] == pytest.approx(values["dice_cup"].mean())


def test_absent_groups_are_nan_with_a_warning() -> None:
    values, _ = samples()
    race = np.array([0, 0, 0, 2, 2, 2])
    with pytest.warns(UndefinedMetricWarning, match="no samples in group 'Black'"):
        v = as_dict(S.client_segmentation_metrics(values, {"race": race}, GROUPS, n_boot=10))
    assert all(math.isnan(v[("race", "Black", m)]) for m in S.GROUP_METRICS)
    assert not math.isnan(v[("race", "", "es_dice")])  # the ES sum skips the absent group
    with pytest.warns(UndefinedMetricWarning, match="fewer than two groups"):  # issue 25: one group has no equity to scale by
        lone = as_dict(S.client_segmentation_metrics(values, {"race": np.zeros(6, int)}, {"race": {0: "Asian"}}, n_boot=10))
    assert math.isnan(lone[("race", "", "dice_gap")]) and math.isnan(lone[("race", "", "es_dice")])  # one group: no gap, no ES


def disc_with_cup(size: int, top: int, left: int, disc: int, cup: int) -> np.ndarray:
    """A square disc with a square cup in its middle (class indices)."""
    labels = square(size, top, left, disc)
    offset = (disc - cup) // 2
    return square(size, top + offset, left + offset, cup, label=2, into=labels)


def test_per_sample_metrics_recompute_the_client_values() -> None:
    true = np.stack([disc_with_cup(32, top, 8, 12, 6) for top in range(4, 10)])
    pred = np.roll(true, 2, axis=2)  # every mask 2 pixels to the right
    values = S.sample_metrics(pred, true)
    assert values["dice_disc"] == pytest.approx(np.full(6, 2 * 12 * 10 / (2 * 144)))
    assert values["dice_cup"] == pytest.approx(np.full(6, 2 * 6 * 4 / (2 * 36)))
    assert values["hd95_disc"] == pytest.approx(np.full(6, 2 / math.hypot(32, 32)))
    rows = as_dict(S.client_segmentation_metrics(values, {}, {}, n_boot=0))
    for m in S.SAMPLE_COLUMNS:
        assert rows[("", "", m)] == pytest.approx(np.nanmean(values[m]))
    assert rows[("", "", "cdr_error")] == 0.0  # a sideways shift keeps the vertical CDR (0.5)


def test_intervals_get_no_mean_rows() -> None:
    values, race = samples()
    frames = []
    for client, seed in (("a", 1), ("b", 2)):
        rows = S.client_segmentation_metrics(values, {"race": race}, GROUPS, n_boot=20, seed=seed)
        frames.append(pd.DataFrame([(1, "test", client, "", *r) for r in rows], columns=list(metrics.FRAME_COLUMNS)))
    mean = metrics.mean_over_clients(pd.concat(frames))
    assert set(S.INTERVALS) <= set(metrics.NOT_AVERAGED) and not set(mean["metric"]) & set(S.INTERVALS)
    assert set(mean["metric"]) == set(S.METRIC_NAMES) - set(S.INTERVALS)
