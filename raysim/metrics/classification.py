"""Evaluation metrics: AUC, accuracy, loss and group-fairness metrics.

Plain numpy / scikit-learn / pandas (fairlearn pins EOD/SPD in the tests); values are fractions in [0, 1].
Anything undefined (an empty set, a single class, fewer than two groups) is NaN and
emits an :class:`UndefinedMetricWarning`; nothing here raises for undefined values.
Invalid input (mismatched lengths, labels outside ``0..K-1``, non-finite scores)
raises ``ValueError``.

raysim's choices where the reference is loose (see ``specs/fairfedmed.md``):

* Fairness metrics use known groups only: group code ``-1`` is dropped first.
* A group without both classes has AUC NaN and is left out of the ES sum. ES needs at least
  two groups with a defined value: with fewer there is no spread to measure, so ES is NaN (and
  ``mean`` ES rows average the clients where it is defined) rather than the overall value.
* EOD = max(TPR gap, FPR gap); each gap is taken over the groups where that rate is
  defined (TPR needs positives, FPR needs negatives). fairlearn would count an
  undefined rate as 0, so it is only called when every group has both classes.
* Multi-class: AUC is the macro one-vs-rest AUC over the classes present; EOD/SPD
  are the mean of the one-vs-rest binary values over the classes present (in the
  labels). For two classes both one-vs-rest values equal the binary value, so the
  binary and multi-class definitions agree.
* Balanced accuracy (mean recall over the classes present) is reported per group and
  equity-scaled (``es_bacc``) for every source, binary included: on imbalanced
  multi-class tasks (ISIC) plain accuracy rewards the majority class.
* ``auc_lo`` / ``auc_hi`` are a per-client bootstrap interval; the mean of two
  clients' bounds is no interval of anything, so :func:`mean_over_clients` writes no
  mean rows for them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping

import numpy as np
import numpy.typing as npt
import pandas as pd

METRIC_NAMES = ("auc", "acc", "bacc", "loss", "es_auc", "es_acc", "es_bacc", "eod", "spd", "auc_lo", "auc_hi", "bytes_up", "bytes_down", "missing", "n_clients", "epsilon", "delta", "noise_scale", "generator_loss")
# Segmentation (raysim.metrics.segmentation, which defines them; listed here so the contract has one list).
METRIC_NAMES += ("dice_disc", "dice_cup", "iou_disc", "iou_cup", "hd95_disc", "hd95_cup", "cdr_error", "dice_disc_lo", "dice_disc_hi", "dice_cup_lo", "dice_cup_hi")
METRIC_NAMES += ("es_dice_disc", "es_dice_cup", "es_dice", "dice_disc_gap", "dice_cup_gap", "dice_gap")
METRIC_NAMES += ("dice_rim", "iou_rim", "hd95_rim", "dice_rim_lo", "dice_rim_hi", "es_dice_rim", "dice_rim_gap")  # FairSeg's rim (issue 25)
FRAME_COLUMNS = ("round", "split", "client", "role", "attribute", "group", "metric", "value")
_GROUP_METRICS = ("auc", "acc", "bacc", "auc_lo", "auc_hi")
NOT_AVERAGED = ("auc_lo", "auc_hi", "dice_disc_lo", "dice_disc_hi", "dice_cup_lo", "dice_cup_hi", "dice_rim_lo", "dice_rim_hi")  # per-client intervals: no mean rows (see the module docstring)
Row = tuple[str, str, str, float]  # (attribute, group, metric, value)
_EPS = 1e-7
_MAX_BOOT_CELLS = 2_000_000  # resample-matrix cells processed at once


class UndefinedMetricWarning(UserWarning):
    """A metric is NaN because it is undefined on the given data."""


def _undefined(message: str) -> float:
    warnings.warn(message, UndefinedMetricWarning, stacklevel=3)
    return math.nan


def _check_lengths(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {names} have lengths {len(a)} and {len(b)}")


def _as_ints(values: npt.ArrayLike, name: str, low: int = 0, high: int | None = None) -> np.ndarray:
    """Return a 1-D int array, checking that values are integers in [low, high)."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    integral = arr.dtype.kind in "iub" or (
        arr.dtype.kind == "f" and bool(np.all(np.isfinite(arr) & (arr == np.round(arr))))
    )
    if not integral:
        raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < low or (high is not None and arr.max() >= high)):
        bound = f"{{{low}..{high - 1}}}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must lie in {bound}, got values in [{arr.min()}, {arr.max()}]")
    return arr


def _as_scores(scores: npt.ArrayLike) -> np.ndarray:
    """Return binary scores as (N,) = P(class 1), multi-class as (N, K) with K > 2."""
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] in (1, 2):
        arr = arr[:, -1]
    if arr.ndim not in (1, 2):
        raise ValueError(f"scores must be (N,) or (N, K), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("scores contain NaN or infinite values")
    return arr


def _prepare(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s = _as_scores(scores)
    y = _as_ints(labels, "labels", 0, 2 if s.ndim == 1 else s.shape[1])
    _check_lengths(y, s, "labels and scores")
    return y, s


def _binary_auc_rows(positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC for each row of sample weights (B, N); NaN without both classes."""
    order = np.argsort(scores, kind="mergesort")
    s, pos, w = scores[order], positive[order], weights[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # tie blocks
    pos_w = np.add.reduceat(w * pos, starts, axis=1)
    neg_w = np.add.reduceat(w * ~pos, starts, axis=1)
    neg_below = np.cumsum(neg_w, axis=1) - neg_w
    pairs = pos_w.sum(axis=1) * neg_w.sum(axis=1)
    wins = (pos_w * (neg_below + 0.5 * neg_w)).sum(axis=1)
    return np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1.0), np.nan)


def _auc_rows(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC per weight row; multi-class: mean one-vs-rest AUC over the classes in the row."""
    if labels.size == 0:
        return np.full(len(weights), np.nan)
    if scores.ndim == 1:
        return _binary_auc_rows(labels == 1, scores, weights)
    present = np.unique(labels)
    per_class = np.stack([_binary_auc_rows(labels == k, scores[:, k], weights) for k in present])
    defined = ~np.isnan(per_class)
    count = defined.sum(axis=0)
    total = np.where(defined, per_class, 0.0).sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Binary AUC, or macro one-vs-rest AUC over the classes present in ``labels``.

    Args:
        labels: Integer labels in ``0..K-1``, shape (N,).
        scores: P(class 1) with shape (N,), or class probabilities with shape (N, K).

    Returns:
        The AUC; NaN (with a warning) when fewer than two classes are present.
    """
    y, s = _prepare(labels, scores)
    value = float(_auc_rows(y, s, np.ones((1, len(y))))[0])
    if math.isnan(value):
        return _undefined(f"AUC undefined: {len(np.unique(y))} class(es) in {len(y)} samples")
    return value


def predictions(scores: npt.ArrayLike) -> np.ndarray:
    """Predicted classes: ``scores >= 0.5`` for binary, argmax for multi-class."""
    s = _as_scores(scores)
    return (s >= 0.5).astype(np.int64) if s.ndim == 1 else s.argmax(axis=1).astype(np.int64)


def accuracy(labels: npt.ArrayLike, preds: npt.ArrayLike) -> float:
    """Fraction of correct predictions; NaN (with a warning) when empty."""
    y, p = _as_ints(labels, "labels"), _as_ints(preds, "preds")
    _check_lengths(y, p, "labels and preds")
    return float(np.mean(y == p)) if y.size else _undefined("accuracy undefined: no samples")


def balanced_accuracy(labels: npt.ArrayLike, preds: npt.ArrayLike) -> float:
    """Mean per-class recall over the classes present in ``labels`` (scikit-learn's
    ``balanced_accuracy_score``, in numpy: it is computed per group); NaN when empty."""
    y, p = _as_ints(labels, "labels"), _as_ints(preds, "preds")
    _check_lengths(y, p, "labels and preds")
    if not y.size:
        return _undefined("balanced accuracy undefined: no samples")
    classes, index = np.unique(y, return_inverse=True)
    hits = np.bincount(index, weights=(y == p).astype(np.float64), minlength=len(classes))
    return float(np.mean(hits / np.bincount(index, minlength=len(classes))))


def log_loss(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Mean cross-entropy with probabilities clipped to ``[1e-7, 1 - 1e-7]``; NaN when empty."""
    y, s = _prepare(labels, scores)
    if not y.size:
        return _undefined("loss undefined: no samples")
    p_true = np.where(y == 1, s, 1.0 - s) if s.ndim == 1 else s[np.arange(len(y)), y]
    return float(-np.mean(np.log(np.clip(p_true, _EPS, 1.0 - _EPS))))


def equity_scaled(overall: float, per_group: Mapping[int, float]) -> float:
    """Equity-scaled metric ``overall / (1 + sum_g |m_g - overall|)`` (alpha = 1).

    Groups whose value is NaN are left out of the sum. NaN with a warning when fewer than
    two groups have a value (one group has no spread: its ES would read as perfect equity);
    a NaN ``overall`` gives NaN (no new warning: whatever made it NaN already warned).
    """
    if math.isnan(overall):
        return math.nan
    defined = [v for v in per_group.values() if not math.isnan(v)]
    if len(defined) < 2:
        return _undefined(f"equity scaling undefined: fewer than two groups with a defined value ({len(defined)} of {len(per_group)})")
    return float(overall / (1.0 + sum(abs(v - overall) for v in defined)))


def _rate_gap(preds: np.ndarray, groups: np.ndarray, among: np.ndarray) -> float:
    """max - min over groups of P(pred = 1 | group, among); groups without such samples skipped."""
    masks = [among & (groups == g) for g in np.unique(groups)]
    rates = [preds[m].mean() for m in masks if m.any()]
    return float(max(rates) - min(rates)) if len(rates) >= 2 else math.nan


# EOD and SPD are computed here rather than by fairlearn: fairlearn's per-call set-up
# (~50-100 ms) made metric computation dominate a run's time, and it scores an undefined
# TPR/FPR as 0. The tests pin these functions to fairlearn wherever fairlearn is defined.


def _binary_eod(labels: np.ndarray, preds: np.ndarray, groups: np.ndarray) -> float:
    """Binary EOD with each rate gap taken over the groups where the rate is defined."""
    gaps = [_rate_gap(preds, groups, labels == 1), _rate_gap(preds, groups, labels == 0)]
    defined = [g for g in gaps if not math.isnan(g)]
    return max(defined) if defined else math.nan


def _binary_spd(preds: np.ndarray, groups: np.ndarray) -> float:
    return _rate_gap(preds, groups, np.ones(len(preds), dtype=bool))


def _one_vs_rest_mean(values: list[float]) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def _known(groups: npt.ArrayLike, *arrays: np.ndarray) -> list[np.ndarray]:
    """Validate group codes and drop samples of unknown group (-1) from all arrays."""
    g = _as_ints(groups, "groups", low=-1)
    for a in arrays:
        _check_lengths(a, g, "values and groups")
    keep = g != -1
    return [g[keep]] + [a[keep] for a in arrays]


def equalized_odds_difference(
    labels: npt.ArrayLike, preds: npt.ArrayLike, groups: npt.ArrayLike
) -> float:
    """Equalized-odds difference max(TPR gap, FPR gap) over known groups.

    Multi-class (any label or prediction > 1): mean of the one-vs-rest binary values
    over the classes present in ``labels``; undefined per-class values are skipped.

    Returns:
        The EOD; NaN (with a warning) if no rate is defined in two known groups.
    """
    y, p = _as_ints(labels, "labels"), _as_ints(preds, "preds")
    _check_lengths(y, p, "labels and preds")
    g, y, p = _known(groups, y, p)
    if y.size and max(y.max(), p.max()) > 1:
        ovr = [_binary_eod((y == k).astype(int), (p == k).astype(int), g) for k in np.unique(y)]
        value = _one_vs_rest_mean(ovr)
    else:
        value = _binary_eod(y, p, g) if y.size else math.nan
    if math.isnan(value):
        return _undefined("EOD undefined: fewer than two known groups with a defined TPR or FPR")
    return value


def demographic_parity_difference(
    preds: npt.ArrayLike, groups: npt.ArrayLike, *, classes: Iterable[int] | None = None
) -> float:
    """Statistical parity difference max_g P(pred = 1 | g) - min_g P(pred = 1 | g), known groups.

    Multi-class (any prediction or class > 1): mean over ``classes`` (default: the
    classes predicted) of the one-vs-rest values; pass the classes present in the
    labels to match :func:`equalized_odds_difference`.

    Returns:
        The SPD; NaN (with a warning) with fewer than two known groups.
    """
    p = _as_ints(preds, "preds")
    g, p = _known(groups, p)
    ks = np.unique(p) if classes is None else np.unique(np.fromiter(classes, dtype=np.int64))
    if len(np.unique(g)) < 2:
        return _undefined("SPD undefined: fewer than two known groups")
    if max(p.max(), ks.max(initial=0)) > 1:
        return _one_vs_rest_mean([_binary_spd((p == k).astype(int), g) for k in ks])
    return _binary_spd(p, g)


def bootstrap_auc_interval(
    labels: npt.ArrayLike,
    scores: npt.ArrayLike,
    *,
    n_boot: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUC (samples resampled with replacement).

    Resamples with a single class are skipped.

    Returns:
        ``(lo, hi)``; ``(nan, nan)`` (with one warning) when the AUC is undefined or
        fewer than 20 % of the resamples are valid.
    """
    if n_boot < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot=}, {level=}")
    y, s = _prepare(labels, scores)
    nan_pair = (math.nan, math.nan)
    if math.isnan(_auc_rows(y, s, np.ones((1, len(y))))[0]):
        _undefined("AUC interval undefined: fewer than two classes present")
        return nan_pair
    rng, n, values = np.random.default_rng(seed), len(y), []
    chunk = max(1, _MAX_BOOT_CELLS // n)
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(rows, n)) + n * np.arange(rows)[:, None]
        counts = np.bincount(idx.ravel(), minlength=rows * n).reshape(rows, n).astype(np.float64)
        values.append(_auc_rows(y, s, counts))
    boot = np.concatenate(values)
    boot = boot[~np.isnan(boot)]
    if len(boot) < 0.2 * n_boot:
        _undefined(f"AUC interval undefined: {len(boot)} of {n_boot} resamples have two classes")
        return nan_pair
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(boot, [tail, 1.0 - tail])
    return float(lo), float(hi)


def _group_seed(seed: int, code: int) -> int:
    return int(np.random.SeedSequence([seed, code]).generate_state(1)[0])


def _group_stats(
    y: np.ndarray, s: np.ndarray, preds: np.ndarray, n_boot: int, seed: int
) -> tuple[float, float, float, float, float]:
    """AUC, accuracy, balanced accuracy and bootstrap AUC interval of one group's samples (NaN when undefined)."""
    value = auc(y, s)
    lo, hi = (math.nan, math.nan)
    if n_boot > 0 and not math.isnan(value):  # (an undefined AUC's interval would only repeat the warning)
        lo, hi = bootstrap_auc_interval(y, s, n_boot=n_boot, seed=seed)
    return value, accuracy(y, preds), balanced_accuracy(y, preds), lo, hi


def _attribute_codes(attr: str, raw: npt.ArrayLike, names: Mapping[int, str], n: int) -> np.ndarray:
    codes = _as_ints(raw, f"attribute {attr!r}", low=-1)
    if len(codes) != n:
        raise ValueError(f"length mismatch: labels and attribute {attr!r} have {n}, {len(codes)}")
    unlisted = sorted(set(np.unique(codes).tolist()) - set(names) - {-1})
    if unlisted:
        raise ValueError(f"attribute {attr!r} has codes {unlisted} missing from group_names")
    return codes


def client_metrics(
    labels: npt.ArrayLike,
    scores: npt.ArrayLike,
    attributes: Mapping[str, npt.ArrayLike],
    group_names: Mapping[str, Mapping[int, str]],
    *,
    n_boot: int = 200,
    seed: int = 0,
) -> list[Row]:
    """All metrics of one client's evaluation set as (attribute, group, metric, value) rows.

    Whole-population rows (attribute and group ``""``): auc, acc, bacc, loss. Per
    attribute: es_auc, es_acc, es_bacc, eod, spd (group ``""``), then auc, acc, bacc,
    auc_lo, auc_hi for every group listed in ``group_names[attr]`` in code order (NaN
    when absent). The bootstrap seed of a group is derived from ``seed`` and its code.

    Raises:
        ValueError: If an attribute has no group names, or uses a code that is not listed.
    """
    y, s = _prepare(labels, scores)
    preds = predictions(s)
    overall_auc, overall_acc, overall_bacc = auc(y, s), accuracy(y, preds), balanced_accuracy(y, preds)
    rows: list[Row] = [("", "", "auc", overall_auc), ("", "", "acc", overall_acc)]
    rows += [("", "", "bacc", overall_bacc), ("", "", "loss", log_loss(y, s))]
    for attr, raw in attributes.items():
        if attr not in group_names:
            raise ValueError(f"no group names for attribute {attr!r}")
        names = group_names[attr]
        codes = _attribute_codes(attr, raw, names, len(y))
        stats: dict[int, tuple[float, float, float, float, float]] = {}
        for code in sorted(names):
            m = codes == code
            stats[code] = _group_stats(y[m], s[m], preds[m], n_boot, _group_seed(seed, code))
        rows += [
            (attr, "", "es_auc", equity_scaled(overall_auc, {c: v[0] for c, v in stats.items()})),
            (attr, "", "es_acc", equity_scaled(overall_acc, {c: v[1] for c, v in stats.items()})),
            (attr, "", "es_bacc", equity_scaled(overall_bacc, {c: v[2] for c, v in stats.items()})),
            (attr, "", "eod", equalized_odds_difference(y, preds, codes)),
            (attr, "", "spd", demographic_parity_difference(preds, codes, classes=np.unique(y))),
        ]
        for code, values in stats.items():
            rows += [(attr, names[code], k, v) for k, v in zip(_GROUP_METRICS, values)]
    return rows


def mean_over_clients(frame: pd.DataFrame, client: str = "mean") -> pd.DataFrame:
    """Mean ``value`` over the clients in ``frame`` per (round, split, attribute, group, metric).

    NaN values are ignored (all-NaN gives NaN); keys keep their first-seen order; the
    result has the same columns with ``client`` set to ``client`` and ``role`` to ``""``.
    Metrics in ``NOT_AVERAGED`` (the per-client AUC intervals) get no mean rows.
    """
    missing = [c for c in FRAME_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks columns {missing}")
    keys = ["round", "split", "attribute", "group", "metric"]
    averaged = frame[~frame["metric"].isin(NOT_AVERAGED)]
    out = averaged.groupby(keys, sort=False, dropna=False)["value"].mean().reset_index()
    out["client"], out["role"] = client, ""
    return out[list(FRAME_COLUMNS)]
