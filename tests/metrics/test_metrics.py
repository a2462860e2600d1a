"""Tests for raysim.metrics: hand-computed cases, agreement with sklearn / fairlearn, NaN cases."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import demographic_parity_difference as fl_dpd
from fairlearn.metrics import equalized_odds_difference as fl_eod
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.metrics import log_loss as sk_log_loss

from raysim.metrics import classification as M
from raysim.metrics.classification import UndefinedMetricWarning

# Tiny binary example, two groups of four samples.
#   group A (code 0): y = [1, 1, 0, 0], s = [0.9, 0.4, 0.6, 0.2]
#   group B (code 1): y = [1, 0, 0, 1], s = [0.8, 0.3, 0.85, 0.65]
LABELS = np.array([1, 1, 0, 0, 1, 0, 0, 1])
SCORES = np.array([0.9, 0.4, 0.6, 0.2, 0.8, 0.3, 0.85, 0.65])
GROUPS = np.array([0, 0, 0, 0, 1, 1, 1, 1])
NAMES = {"sex": {0: "A", 1: "B"}}


Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]


def _random_case(seed: int, n: int = 300, n_groups: int = 3) -> Arrays:
    """Random binary data where every group has both classes."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, n_groups, n)
    labels = rng.integers(0, 2, n)
    labels[:n_groups * 2] = np.repeat([0, 1], n_groups)
    groups[:n_groups * 2] = np.tile(np.arange(n_groups), 2)
    scores = np.clip(0.3 * labels + rng.normal(0.35, 0.25, n), 0.01, 0.99)
    return labels, scores, groups


def _rows_to_dict(rows: list[tuple[str, str, str, float]]) -> dict[tuple[str, str, str], float]:
    return {(a, g, m): v for a, g, m, v in rows}


# --- hand-computed ---------------------------------------------------------------------------


def test_hand_computed_binary_example() -> None:
    # Overall AUC: positives {.9, .4, .8, .65} vs negatives {.6, .2, .3, .85}:
    #   wins 4 + 2 + 3 + 3 = 12 of 16 pairs -> 0.75.
    assert M.auc(LABELS, SCORES) == pytest.approx(0.75)
    # Group A: pos {.9, .4} vs neg {.6, .2}: 3 of 4 -> 0.75.
    # Group B: pos {.8, .65} vs neg {.3, .85}: 2 of 4 -> 0.5.
    auc_a = M.auc(LABELS[:4], SCORES[:4])
    auc_b = M.auc(LABELS[4:], SCORES[4:])
    assert (auc_a, auc_b) == (pytest.approx(0.75), pytest.approx(0.5))
    # ES-AUC = 0.75 / (1 + |0.75 - 0.75| + |0.5 - 0.75|) = 0.75 / 1.25 = 0.6.
    assert M.equity_scaled(0.75, {0: auc_a, 1: auc_b}) == pytest.approx(0.6)
    # Predictions (>= .5): A [1, 0, 1, 0], B [1, 0, 1, 1].
    preds = M.predictions(SCORES)
    np.testing.assert_array_equal(preds, [1, 0, 1, 0, 1, 0, 1, 1])
    # A: TPR 1/2, FPR 1/2; B: TPR 2/2, FPR 1/2 -> EOD = max(0.5, 0) = 0.5.
    assert M.equalized_odds_difference(LABELS, preds, GROUPS) == pytest.approx(0.5)
    # Selection rates A 2/4, B 3/4 -> SPD 0.25.
    assert M.demographic_parity_difference(preds, GROUPS) == pytest.approx(0.25)
    # Accuracy: A 2/4, B 3/4, overall 5/8; ES-Acc = 0.625 / (1 + 0.125 + 0.125) = 0.5.
    assert M.accuracy(LABELS, preds) == pytest.approx(0.625)
    assert M.equity_scaled(0.625, {0: 0.5, 1: 0.75}) == pytest.approx(0.5)


def test_client_metrics_hand_computed() -> None:
    rows = _rows_to_dict(M.client_metrics(LABELS, SCORES, {"sex": GROUPS}, NAMES, n_boot=50))
    assert rows[("", "", "auc")] == pytest.approx(0.75)
    assert rows[("sex", "", "es_auc")] == pytest.approx(0.6)
    assert rows[("sex", "", "es_acc")] == pytest.approx(0.5)
    assert rows[("sex", "", "eod")] == pytest.approx(0.5)
    assert rows[("sex", "", "spd")] == pytest.approx(0.25)
    assert rows[("sex", "A", "auc")] == pytest.approx(0.75)
    assert rows[("sex", "B", "acc")] == pytest.approx(0.75)


def test_log_loss_and_predictions() -> None:
    assert M.log_loss(LABELS, SCORES) == pytest.approx(sk_log_loss(LABELS, SCORES))
    # Clipping keeps certain-and-wrong predictions finite: -log(1e-7).
    assert M.log_loss([1], [0.0]) == pytest.approx(-math.log(1e-7))
    probs = np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    np.testing.assert_array_equal(M.predictions(probs), [1, 0])
    assert M.log_loss([2, 0], probs) == pytest.approx(-(math.log(0.3) + math.log(0.6)) / 2)
    # (N, 2) probabilities are treated as binary P(class 1).
    two_col = np.stack([1 - SCORES, SCORES], axis=1)
    assert M.auc(LABELS, two_col) == pytest.approx(M.auc(LABELS, SCORES))


# --- agreement with sklearn / fairlearn ------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_sklearn_and_fairlearn(seed: int) -> None:
    labels, scores, groups = _random_case(seed)
    preds = M.predictions(scores)
    assert M.auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    expected_bacc = balanced_accuracy_score(labels, preds)
    assert M.balanced_accuracy(labels, preds) == pytest.approx(expected_bacc)
    assert M.log_loss(labels, scores) == pytest.approx(sk_log_loss(labels, scores))
    fair_eod = fl_eod(labels, preds, sensitive_features=groups)
    fair_dpd = fl_dpd(labels, preds, sensitive_features=groups)
    assert M.equalized_odds_difference(labels, preds, groups) == pytest.approx(fair_eod)
    assert M.demographic_parity_difference(preds, groups) == pytest.approx(fair_dpd)
    # The hand-written EOD path agrees with fairlearn where both apply.
    assert M._binary_eod(labels, preds, groups) == pytest.approx(fair_eod)


def test_auc_handles_ties_like_sklearn() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    scores = rng.integers(0, 5, 200) / 4.0
    assert M.auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))


@pytest.mark.parametrize("seed", range(3))
def test_multiclass_auc_matches_sklearn_ovr_macro(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = np.r_[np.arange(4), rng.integers(0, 4, 196)]
    logits = rng.normal(size=(200, 4)) + np.eye(4)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert M.auc(labels, probs) == pytest.approx(expected)


def test_multiclass_auc_with_absent_class() -> None:
    rng = np.random.default_rng(0)
    labels = rng.choice([0, 2, 3], 150)  # class 1 absent
    probs = rng.dirichlet(np.ones(4), 150)
    expected = np.mean([roc_auc_score(labels == k, probs[:, k]) for k in (0, 2, 3)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UndefinedMetricWarning)
        assert M.auc(labels, probs) == pytest.approx(expected)


def test_multiclass_eod_spd_are_one_vs_rest_means() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 400)
    preds = np.where(rng.random(400) < 0.6, labels, rng.integers(0, 3, 400))
    groups = rng.integers(0, 2, 400)
    eods = [fl_eod(labels == k, preds == k, sensitive_features=groups) for k in range(3)]
    spds = [fl_dpd(preds == k, preds == k, sensitive_features=groups) for k in range(3)]
    assert M.equalized_odds_difference(labels, preds, groups) == pytest.approx(np.mean(eods))
    assert M.demographic_parity_difference(preds, groups) == pytest.approx(np.mean(spds))


def test_binary_equals_its_one_vs_rest_mean() -> None:
    # Documented claim: for two classes both one-vs-rest values equal the binary value.
    labels, scores, groups = _random_case(7)
    preds = M.predictions(scores)
    binary = fl_eod(labels, preds, sensitive_features=groups)
    class0 = fl_eod(labels == 0, preds == 0, sensitive_features=groups)
    assert class0 == pytest.approx(binary)


# --- unknown groups --------------------------------------------------------------------------


def test_unknown_group_samples_are_excluded() -> None:
    labels, scores, groups = _random_case(11, n=200, n_groups=2)
    rng = np.random.default_rng(0)
    extra_labels = rng.integers(0, 2, 50)
    wild = 1.0 - extra_labels.astype(float)  # always wrong, maximally confident
    all_labels, all_scores = np.r_[labels, extra_labels], np.r_[scores, wild]
    all_groups = np.r_[groups, np.full(50, -1)]
    names = {"g": {0: "a", 1: "b"}}
    base = _rows_to_dict(M.client_metrics(labels, scores, {"g": groups}, names, n_boot=30))
    more = M.client_metrics(all_labels, all_scores, {"g": all_groups}, names, n_boot=30)
    more = _rows_to_dict(more)
    keys = [("g", "", "eod"), ("g", "", "spd"), ("g", "a", "auc"), ("g", "b", "auc")]
    for key in keys + [("g", "a", "acc"), ("g", "b", "auc_lo"), ("g", "b", "auc_hi")]:
        assert more[key] == pytest.approx(base[key])
    assert more[("", "", "auc")] < base[("", "", "auc")]  # the overall metric does see them


# --- undefined -> NaN ------------------------------------------------------------------------


def test_single_class_group_auc_is_nan_and_left_out_of_es_auc() -> None:
    labels = np.r_[LABELS, [1, 1, 1]]
    scores = np.r_[SCORES, [0.2, 0.9, 0.7]]
    groups = np.r_[GROUPS, [2, 2, 2]]
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(M.auc(labels[groups == 2], scores[groups == 2]))
    names = {"sex": {0: "A", 1: "B", 2: "C"}}
    with pytest.warns(UndefinedMetricWarning):
        rows = _rows_to_dict(M.client_metrics(labels, scores, {"sex": groups}, names, n_boot=30))
    assert math.isnan(rows[("sex", "C", "auc")])
    assert math.isnan(rows[("sex", "C", "auc_lo")]) and math.isnan(rows[("sex", "C", "auc_hi")])
    overall = rows[("", "", "auc")]
    expected = overall / (1 + abs(0.75 - overall) + abs(0.5 - overall))
    assert rows[("sex", "", "es_auc")] == pytest.approx(expected)


def test_equity_scaled_nan_handling() -> None:
    assert M.equity_scaled(0.8, {0: math.nan, 1: 0.7, 2: 0.9}) == pytest.approx(0.8 / 1.2)
    with pytest.warns(M.UndefinedMetricWarning, match="fewer than two groups"):  # issue 25: was 0.8 / 1.1 and 0.8
        assert math.isnan(M.equity_scaled(0.8, {0: math.nan, 1: 0.7})) and math.isnan(M.equity_scaled(0.8, {}))
    assert math.isnan(M.equity_scaled(math.nan, {0: 0.7}))


def test_eod_uses_only_groups_where_rate_is_defined() -> None:
    # A: y [1, 1, 0, 0], yhat [1, 0, 1, 0] -> TPR 1/2, FPR 1/2.
    # B: y [0, 0, 0],    yhat [1, 1, 0]    -> TPR undefined, FPR 2/3.
    # TPR gap undefined (one group), FPR gap 2/3 - 1/2 = 1/6 -> EOD = 1/6.
    labels = np.array([1, 1, 0, 0, 0, 0, 0])
    preds = np.array([1, 0, 1, 0, 1, 1, 0])
    groups = np.array([0, 0, 0, 0, 1, 1, 1])
    assert M.equalized_odds_difference(labels, preds, groups) == pytest.approx(1 / 6)
    # fairlearn counts B's undefined TPR as 0 and would give 0.5 -- the documented difference.
    assert fl_eod(labels, preds, sensitive_features=groups) == pytest.approx(0.5)
    # A third group C with positives only: TPR 1/1 -> TPR gap 1/2 over {A, C}; EOD = 1/2.
    labels3, preds3, groups3 = np.r_[labels, 1], np.r_[preds, 1], np.r_[groups, 2]
    assert M.equalized_odds_difference(labels3, preds3, groups3) == pytest.approx(0.5)


def test_one_group_gives_nan_eod_and_spd() -> None:
    groups = np.r_[np.zeros(6, int), -np.ones(2, int)]
    preds = M.predictions(SCORES)
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(M.equalized_odds_difference(LABELS, preds, groups))
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(M.demographic_parity_difference(preds, groups))


@pytest.mark.parametrize(
    "call",
    [
        lambda: M.auc([], []),
        lambda: M.accuracy([], []),
        lambda: M.balanced_accuracy([], []),
        lambda: M.log_loss([], []),
        lambda: M.equalized_odds_difference([], [], []),
        lambda: M.demographic_parity_difference([], []),
        lambda: M.auc([1, 1, 1], [0.2, 0.5, 0.9]),
    ],
)
def test_empty_or_single_class_is_nan_with_warning(call: Callable[[], float]) -> None:
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(call())


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="3 and 2"):
        M.auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="labels"):
        M.auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="labels"):
        M.auc([0, 3], np.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match="4 and 3"):
        M.equalized_odds_difference([0, 1, 1, 0], [0, 1, 1, 0], [0, 1, 1])
    with pytest.raises(ValueError, match="missing from group_names"):
        M.client_metrics(LABELS, SCORES, {"sex": GROUPS}, {"sex": {0: "A"}})


# --- bootstrap -------------------------------------------------------------------------------


def test_bootstrap_interval() -> None:
    labels, scores, _ = _random_case(5, n=400)
    point = M.auc(labels, scores)
    lo, hi = M.bootstrap_auc_interval(labels, scores, n_boot=200, seed=3)
    assert lo < point < hi
    assert 0.0 <= lo < hi <= 1.0
    assert M.bootstrap_auc_interval(labels, scores, n_boot=200, seed=3) == (lo, hi)
    assert M.bootstrap_auc_interval(labels, scores, n_boot=200, seed=4) != (lo, hi)


def test_bootstrap_single_class_is_nan_without_spam() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lo, hi = M.bootstrap_auc_interval([1, 1, 1, 1], [0.1, 0.2, 0.3, 0.4])
    assert math.isnan(lo) and math.isnan(hi)
    assert len([w for w in caught if issubclass(w.category, UndefinedMetricWarning)]) == 1
    # Two samples: about half the resamples have one class; they are skipped silently.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert M.bootstrap_auc_interval([0, 1], [0.3, 0.6], n_boot=100) == (1.0, 1.0)
    assert not caught
    # With this seed none of the 5 resamples has both classes (< 20 % valid) -> (nan, nan).
    with pytest.warns(UndefinedMetricWarning, match="resamples"):
        lo, hi = M.bootstrap_auc_interval([0, 1], [0.3, 0.6], n_boot=5, seed=45)
    assert math.isnan(lo) and math.isnan(hi)


@pytest.mark.exclusive  # timed
def test_bootstrap_multiclass_and_speed() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 1000)
    scores = np.clip(0.2 * labels + rng.random(1000) * 0.8, 0, 1)
    start = time.perf_counter()
    M.bootstrap_auc_interval(labels, scores, n_boot=200, seed=0)
    assert time.perf_counter() - start < 0.5
    probs = rng.dirichlet(np.ones(3), 300)
    mlabels = rng.integers(0, 3, 300)
    lo, hi = M.bootstrap_auc_interval(mlabels, probs, n_boot=100)
    assert lo <= M.auc(mlabels, probs) <= hi


# --- client_metrics / mean_over_clients ------------------------------------------------------


def test_client_metrics_rows_names_and_absent_groups() -> None:
    attributes = {"sex": GROUPS, "race": np.array([0, 0, 2, 2, -1, 0, 2, 0])}
    names = {"sex": {1: "B", 0: "A"}, "race": {0: "White", 1: "Black", 2: "Asian"}}
    with pytest.warns(UndefinedMetricWarning):  # "Black" has no samples
        rows = M.client_metrics(LABELS, SCORES, attributes, names, n_boot=30, seed=1)
    keys = [(a, g, m) for a, g, m, _ in rows]
    assert keys[:4] == [("", "", m) for m in ("auc", "acc", "bacc", "loss")]
    per_group = ["auc", "acc", "bacc", "auc_lo", "auc_hi"]
    expected_sex = [("sex", "", m) for m in ("es_auc", "es_acc", "es_bacc", "eod", "spd")]
    expected_sex += [("sex", g, m) for g in ("A", "B") for m in per_group]
    expected_race = [("race", "", m) for m in ("es_auc", "es_acc", "es_bacc", "eod", "spd")]
    expected_race += [("race", g, m) for g in ("White", "Black", "Asian") for m in per_group]
    assert keys[4:] == expected_sex + expected_race
    assert {m for _, _, m in keys} <= set(M.METRIC_NAMES)
    values = _rows_to_dict(rows)
    assert all(math.isnan(values[("race", "Black", m)]) for m in per_group)
    finite = [v for (a, g, m), v in values.items() if m != "loss" and not math.isnan(v)]
    assert all(0.0 <= v <= 1.0 for v in finite)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        again = M.client_metrics(LABELS, SCORES, attributes, names, n_boot=30, seed=1)
    assert [r[3] for r in again] == pytest.approx([r[3] for r in rows], nan_ok=True)


def test_client_metrics_multiclass() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, 240)
    probs = rng.dirichlet(np.ones(4), 240)
    groups = rng.integers(0, 2, 240)
    names = {"age": {0: "young", 1: "old"}}
    values = _rows_to_dict(M.client_metrics(labels, probs, {"age": groups}, names, n_boot=30))
    assert values[("", "", "auc")] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"))
    expected_bacc = balanced_accuracy_score(labels, probs.argmax(1))
    assert values[("", "", "bacc")] == pytest.approx(expected_bacc)
    assert 0.0 <= values[("age", "", "eod")] <= 1.0 and 0.0 <= values[("age", "", "spd")] <= 1.0


def test_multiclass_group_balanced_accuracy_and_es_bacc_hand_computed() -> None:
    # 3 classes, two groups of six samples; predictions are the argmax of one-hot-ish scores.
    #   group young (0): y = [0, 0, 0, 0, 1, 2], ŷ = [0, 0, 0, 0, 0, 2]: acc 5/6, recalls (1, 0, 1) -> bacc 2/3
    #   group old   (1): y = [0, 1, 1, 1, 2, 2], ŷ = [0, 1, 1, 0, 2, 1]: acc 4/6, recalls (1, 2/3, 1/2) -> bacc 13/18
    labels = np.array([0, 0, 0, 0, 1, 2, 0, 1, 1, 1, 2, 2])
    preds = np.array([0, 0, 0, 0, 0, 2, 0, 1, 1, 0, 2, 1])
    probs = np.full((12, 3), 0.1) + 0.7 * np.eye(3)[preds]
    groups = np.repeat([0, 1], 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        values = _rows_to_dict(M.client_metrics(labels, probs, {"age": groups}, {"age": {0: "young", 1: "old"}}, n_boot=0))
    # overall: recalls class 0 5/5, class 1 2/4, class 2 2/3 -> bacc (1 + 1/2 + 2/3) / 3 = 13/18; acc 9/12
    assert values[("", "", "bacc")] == pytest.approx(13 / 18) and values[("", "", "acc")] == pytest.approx(0.75)
    assert values[("age", "young", "bacc")] == pytest.approx(2 / 3) and values[("age", "old", "bacc")] == pytest.approx(13 / 18)
    assert values[("age", "young", "acc")] == pytest.approx(5 / 6) and values[("age", "old", "acc")] == pytest.approx(4 / 6)  # acc keeps its meaning
    # ES-BAcc = 13/18 / (1 + |2/3 - 13/18| + 0) = (13/18) / (1 + 1/18) = 13/19; ES-Acc unchanged: 0.75 / (1 + 1/12 + 1/12)
    assert values[("age", "", "es_bacc")] == pytest.approx(13 / 19)
    assert values[("age", "", "es_acc")] == pytest.approx(0.75 / (1 + 1 / 6))
    with warnings.catch_warnings():  # sklearn: "y_pred contains classes not in y_true"
        warnings.simplefilter("ignore", UserWarning)
        for y, p in (([0, 0, 1], [0, 2, 2]), ([1, 1, 1], [0, 1, 1]), (labels[6:], preds[6:])):
            assert M.balanced_accuracy(y, p) == pytest.approx(balanced_accuracy_score(y, p), abs=1e-12)


def test_mean_rows_leave_out_the_per_client_auc_intervals() -> None:
    from raysim.outputs.recorder import with_means

    rows = [(1, "test", c, "", "sex", "A", m, v) for c, (lo, hi, a) in (("c0", (0.5, 0.9, 0.7)), ("c1", (0.6, 0.8, 0.7))) for m, v in (("auc_lo", lo), ("auc_hi", hi), ("auc", a))]
    frame = pd.DataFrame(rows, columns=list(M.FRAME_COLUMNS)).assign(role=["x"] * 3 + ["y"] * 3)
    out = with_means(frame)
    means = out[out["client"].str.startswith("mean")]
    # (0.55, 0.85) would be no interval of the mean AUC: no mean rows at all for the bounds
    assert sorted(means["client"]) == ["mean", "mean:x", "mean:y"] and set(means["metric"]) == {"auc"}
    assert len(out[~out["client"].str.startswith("mean")]) == 6  # the clients' own intervals stay


def test_mean_over_clients() -> None:
    nan = math.nan
    frame = pd.DataFrame(
        [
            (1, "test", "c0", "", "", "", "auc", 0.8),
            (1, "test", "c0", "", "sex", "B", "auc", nan),
            (1, "test", "c0", "", "sex", "A", "auc", 0.6),
            (1, "test", "c0", "", "sex", "C", "auc", nan),
            (1, "test", "c1", "", "", "", "auc", 0.6),
            (1, "test", "c1", "", "sex", "B", "auc", 0.9),
            (1, "test", "c1", "", "sex", "A", "auc", 0.4),
            (1, "test", "c1", "", "sex", "C", "auc", nan),
            (2, "test", "c0", "", "", "", "auc", 0.9),
        ],
        columns=list(M.FRAME_COLUMNS),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = M.mean_over_clients(frame, client="mean:hospital")
    assert list(out.columns) == list(M.FRAME_COLUMNS)
    assert list(zip(out["round"], out["group"])) == [(1, ""), (1, "B"), (1, "A"), (1, "C"), (2, "")]
    assert set(out["client"]) == {"mean:hospital"} and set(out["role"]) == {""}
    np.testing.assert_allclose(out["value"], [0.7, 0.9, 0.5, nan, 0.9])
