"""Optic disc / cup segmentation metrics: per sample, then per client and group (plain numpy + scipy).

Masks hold class indices: 0 background, 1 neuroretinal rim, 2 cup (FairSeg's codes 0 / -1 / -2
as `raysim.datasets.fairseg` maps them; the synthetic twin writes the same codes). Three regions
are scored: the disc is label >= 1 (rim + cup), the cup label == 2, the rim label == 1 (the disc
without the cup: the region FairSeg's evaluation reports beside the cup, so ``dice_rim`` /
``dice_cup`` sit beside the paper's numbers, while ``dice`` stays D of disc and cup).
Values are fractions in [0, 1], as in `metrics.parquet` everywhere.

raysim's choices where the literature is loose (each is tested):

* **Empty masks.** Dice and IoU: both masks empty -> 1 (nothing there, nothing predicted:
  correct); exactly one empty -> 0 (the formula's value). So Dice is never undefined and every
  sample counts in every group mean. hd95: both empty -> 0; exactly one empty -> 1, the worst
  value. (MONAI and nnU-Net instead give NaN and leave such samples out; that would let a model
  that predicts cups where there are none go unpunished.)
* **hd95** is the 95th percentile Hausdorff distance between the two boundaries, MONAI's form
  (the larger of the two directed 95th percentiles; boundary = mask pixels with a 4-neighbour
  outside the mask), computed with scipy's exact Euclidean distance transform, and divided by
  the image diagonal so that it lies in [0, 1] and does not depend on the resolution. (FairSeg
  reports medpy's HD95 in pixels instead: `hd95_pixels` gives that distance unscaled.)
* **Vertical cup-to-disc ratio** (CDR): the vertical extent (first to last row) of the largest
  8-connected component of the cup over that of the disc's largest component, so stray pixels
  away from the optic nerve head do not stretch either extent (the first of equal-sized
  components in raster order wins). NaN without a disc; 0 with a disc but no cup.
  ``cdr_error`` = |CDR(prediction) - CDR(truth)|: NaN when the truth has no disc (left out of
  means), 1 (the worst) when only the prediction lacks one.
* **Areas** are fractions of the image's pixels.
* **Equity scaling** as for AUC (`metrics.equity_scaled`): ES-Dice = Dice / (1 + sum_g |Dice_g - Dice|)
  per region (``es_dice_disc``, ``es_dice_cup``, ``es_dice_rim``), over the groups whose Dice is
  defined: NaN (with a warning) when fewer than two groups have samples. ``es_dice`` is the same formula applied to
  the mean Dice D = (Dice_disc + Dice_cup) / 2, with D_g = (Dice_disc_g + Dice_cup_g) / 2 per
  group (Dice is never NaN here, so D is also the per-sample mean of the two Dices, averaged).
  It is not the mean of ``es_dice_disc`` and ``es_dice_cup``.
* **Group gap**: max_g - min_g of a group's mean over the groups with samples
  (``dice_disc_gap``, ``dice_cup_gap``, ``dice_rim_gap``, ``dice_gap`` of D); NaN with fewer than
  two groups.
* **Intervals**: ``dice_disc_lo`` / ``_hi``, ``dice_cup_lo`` / ``_hi`` and ``dice_rim_lo`` / ``_hi`` are percentile bootstrap
  95 % intervals of the mean Dice, for the client (seeded by ``seed``) and for each group
  (seeded by ``(seed, group code)`` as the AUC intervals); the regions share the resamples.
  Like ``auc_lo`` / ``auc_hi`` they are per client: no mean rows (``metrics.NOT_AVERAGED``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from raysim.metrics.classification import Row, UndefinedMetricWarning, _attribute_codes, _group_seed, equity_scaled

# The scored regions: label >= 1, == 2, == 1 (the rim came later: its names follow the others').
STRUCTURES = ("disc", "cup", "rim")
_STRUCTURE_LABELS = {"disc": (1, 2), "cup": (2,), "rim": (1,)}
AREAS = ("disc", "cup")  # regions with per-sample areas (`EXTRA_COLUMNS`)
# Per-sample columns every aggregation needs (what actors send; predictions.parquet's columns).
SAMPLE_COLUMNS = ("dice_disc", "dice_cup", "iou_disc", "iou_cup", "hd95_disc", "hd95_cup", "cdr_error", "dice_rim", "iou_rim", "hd95_rim")
# Per-sample extras `sample_metrics` also returns (not aggregated here).
EXTRA_COLUMNS = ("area_disc", "area_cup", "area_disc_true", "area_cup_true", "cdr", "cdr_true")
INTERVALS = ("dice_disc_lo", "dice_disc_hi", "dice_cup_lo", "dice_cup_hi", "dice_rim_lo", "dice_rim_hi")
EQUITY = ("es_dice_disc", "es_dice_cup", "es_dice", "dice_disc_gap", "dice_cup_gap", "dice_gap", "es_dice_rim", "dice_rim_gap")
METRIC_NAMES = (*SAMPLE_COLUMNS, *INTERVALS, *EQUITY)
_MAX_BOOT_CELLS = 2_000_000  # resample-matrix cells processed at once


# --- one mask ----------------------------------------------------------------------------------


def structure(labels: np.ndarray, name: str) -> np.ndarray:
    """Boolean mask of the disc (label >= 1, the cup included), the cup (label == 2) or the rim
    (label == 1: the disc without the cup, FairSeg's code -1)."""
    if name not in _STRUCTURE_LABELS:
        raise ValueError(f"structure must be one of {', '.join(STRUCTURES)}, got {name!r}")
    return np.isin(labels, _STRUCTURE_LABELS[name])


def dice(pred: np.ndarray, true: np.ndarray) -> float:
    """2 |A & B| / (|A| + |B|) of two boolean masks; 1 when both are empty."""
    total = int(pred.sum()) + int(true.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & true).sum()) / total


def iou(pred: np.ndarray, true: np.ndarray) -> float:
    """|A & B| / |A | B| of two boolean masks; 1 when both are empty."""
    union = int((pred | true).sum())
    return 1.0 if union == 0 else int((pred & true).sum()) / union


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (the image edge counts as outside)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95_pixels(pred: np.ndarray, true: np.ndarray) -> float:
    """95th percentile Hausdorff distance in pixels (MONAI's: max of the two directed percentiles).

    Both empty: 0. Exactly one empty: inf (no boundary to measure to); `hd95` maps it to 1.
    """
    if not pred.any() and not true.any():
        return 0.0
    if not pred.any() or not true.any():
        return math.inf
    pred_edge, true_edge = _boundary(pred), _boundary(true)
    to_true = ndimage.distance_transform_edt(~true_edge)[pred_edge]
    to_pred = ndimage.distance_transform_edt(~pred_edge)[true_edge]
    return float(max(np.percentile(to_true, 95), np.percentile(to_pred, 95)))


def hd95(pred: np.ndarray, true: np.ndarray) -> float:
    """`hd95_pixels` divided by the image diagonal, in [0, 1]; 1 when exactly one mask is empty."""
    distance = hd95_pixels(pred, true)
    return 1.0 if math.isinf(distance) else distance / math.hypot(*pred.shape)


def _extent(rows_with_pixels: np.ndarray) -> int:
    rows = np.flatnonzero(rows_with_pixels)
    return int(rows[-1] - rows[0] + 1) if len(rows) else 0


_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity (diagonal neighbours join a component)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (the first in raster order on a tie);
    an empty mask stays empty."""
    components, count = ndimage.label(mask, structure=_EIGHT)
    if count <= 1:
        return mask
    sizes = np.bincount(components.ravel())[1:]
    return components == int(np.argmax(sizes)) + 1


def vertical_cdr(labels: np.ndarray) -> float:
    """Vertical cup-to-disc ratio of one (H, W) label mask: the rows spanned by the cup's largest
    connected component over those of the disc's; NaN without a disc, 0 without a cup."""
    disc = _extent(largest_component(structure(labels, "disc")).any(axis=1))
    return _extent(largest_component(structure(labels, "cup")).any(axis=1)) / disc if disc else math.nan


def class_fractions(labels: np.ndarray) -> np.ndarray:
    """Share of pixels in each class 0 (background), 1 (disc rim), 2 (cup) over all given masks."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64).ravel(), minlength=3)[:3]
    return counts / max(int(counts.sum()), 1)


# --- many samples ------------------------------------------------------------------------------


def _check_masks(pred: npt.ArrayLike, true: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p, t = np.asarray(pred), np.asarray(true)
    if p.shape != t.shape or p.ndim != 3:
        raise ValueError(f"pred and true must be label masks of one shape (N, H, W), got {p.shape} and {t.shape}")
    for name, m in (("pred", p), ("true", t)):
        if m.dtype.kind not in "iu" or (m.size and (m.min() < 0 or m.max() > 2)):
            raise ValueError(f"{name} must hold integer labels 0 (background), 1 (disc rim), 2 (cup), got dtype {m.dtype}" + (f", values in [{m.min()}, {m.max()}]" if m.size else ""))
    return p, t


def _cdr_error(pred: float, true: float) -> float:
    if math.isnan(true):
        return math.nan  # no disc in the truth: nothing to compare with
    return 1.0 if math.isnan(pred) else abs(pred - true)


def sample_metrics(pred: npt.ArrayLike, true: npt.ArrayLike) -> dict[str, np.ndarray]:
    """Per-sample values of (N, H, W) predicted and true label masks: `SAMPLE_COLUMNS` + `EXTRA_COLUMNS`.

    ``area_*`` are the prediction's areas and ``cdr`` its vertical CDR; ``*_true`` the truth's.
    """
    p, t = _check_masks(pred, true)
    out: dict[str, list[float]] = {name: [] for name in (*SAMPLE_COLUMNS, *EXTRA_COLUMNS)}
    for pm, tm in zip(p, t):
        for name in STRUCTURES:
            a, b = structure(pm, name), structure(tm, name)
            out[f"dice_{name}"].append(dice(a, b))
            out[f"iou_{name}"].append(iou(a, b))
            out[f"hd95_{name}"].append(hd95(a, b))
            if name in AREAS:
                out[f"area_{name}"].append(a.mean())
                out[f"area_{name}_true"].append(b.mean())
        out["cdr"].append(vertical_cdr(pm))
        out["cdr_true"].append(vertical_cdr(tm))
        out["cdr_error"].append(_cdr_error(out["cdr"][-1], out["cdr_true"][-1]))
    return {name: np.asarray(values, dtype=np.float64) for name, values in out.items()}


def _check_samples(samples: Mapping[str, npt.ArrayLike]) -> dict[str, np.ndarray]:
    missing = [c for c in SAMPLE_COLUMNS if c not in samples]
    if missing:
        raise ValueError(f"per-sample values lack {', '.join(missing)} (need {', '.join(SAMPLE_COLUMNS)})")
    values = {c: np.asarray(samples[c], dtype=np.float64) for c in SAMPLE_COLUMNS}
    lengths = {c: v.shape for c, v in values.items()}
    if len(set(lengths.values())) != 1 or values["dice_disc"].ndim != 1:
        raise ValueError(f"per-sample values must be 1-D arrays of one length, got shapes {lengths}")
    for c, v in values.items():
        finite = v[~np.isnan(v)] if c == "cdr_error" else v  # only cdr_error may be undefined
        if np.isnan(finite).any() or (finite.size and (finite.min() < 0 or finite.max() > 1)):
            raise ValueError(f"{c} must lie in [0, 1]" + (" (NaN only for cdr_error)" if c != "cdr_error" else ""))
    return values


def _mean(values: np.ndarray, what: str) -> float:
    defined = values[~np.isnan(values)]
    if not defined.size:
        warnings.warn(f"{what} undefined: no samples with a value", UndefinedMetricWarning, stacklevel=3)
        return math.nan
    return float(defined.mean())


def bootstrap_mean_intervals(columns: np.ndarray, *, n_boot: int = 200, seed: int = 0, level: float = 0.95) -> np.ndarray:
    """Percentile bootstrap interval of the mean of each column of (N, K) values (NaN-free).

    All columns share the resamples. Returns (K, 2) ``[lo, hi]``; NaN without samples.
    """
    if n_boot < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot=}, {level=}")
    n, k = columns.shape
    if n == 0:
        return np.full((k, 2), math.nan)
    rng, means = np.random.default_rng(seed), []
    chunk = max(1, _MAX_BOOT_CELLS // n)
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        means.append(columns[idx].mean(axis=1))  # (rows, K)
    tail = (1.0 - level) / 2.0
    return np.quantile(np.concatenate(means), [tail, 1.0 - tail], axis=0).T


def _summary(values: dict[str, np.ndarray], index: np.ndarray, n_boot: int, seed: int, who: str) -> dict[str, float]:
    """Means of `SAMPLE_COLUMNS` over `index` and the Dice intervals (NaN for no samples)."""
    if not len(index):
        warnings.warn(f"segmentation metrics undefined: no samples in {who}", UndefinedMetricWarning, stacklevel=3)
        return dict.fromkeys((*SAMPLE_COLUMNS, *INTERVALS), math.nan)
    out = {c: _mean(values[c][index], f"{c} of {who}") for c in SAMPLE_COLUMNS}
    if n_boot > 0:
        # One resample matrix for all regions (its draws do not depend on the column count, so
        # the disc and cup intervals are those of before the rim was added).
        dices = np.stack([values[f"dice_{name}"][index] for name in STRUCTURES], axis=1)
        for name, (lo, hi) in zip(STRUCTURES, bootstrap_mean_intervals(dices, n_boot=n_boot, seed=seed)):
            out.update({f"dice_{name}_lo": lo, f"dice_{name}_hi": hi})
    else:
        out.update(dict.fromkeys(INTERVALS, math.nan))
    return {k: float(v) for k, v in out.items()}


def _gap(per_group: Mapping[int, float]) -> float:
    known = [v for v in per_group.values() if not math.isnan(v)]
    return float(max(known) - min(known)) if len(known) >= 2 else math.nan


def _equity_rows(attr: str, overall: Mapping[str, float], groups: Mapping[int, Mapping[str, float]]) -> list[Row]:
    mean_dice = lambda s: (s["dice_disc"] + s["dice_cup"]) / 2  # noqa: E731  (D of the module docstring)
    per = {name: {c: s[f"dice_{name}"] for c, s in groups.items()} for name in STRUCTURES}
    per[""] = {c: mean_dice(s) for c, s in groups.items()}
    overall_of = {name: overall[f"dice_{name}"] for name in STRUCTURES} | {"": mean_dice(overall)}
    es = {name: equity_scaled(overall_of[name], per[name]) for name in ("disc", "cup", "", "rim")}  # the order of `EQUITY`
    return [
        (attr, "", "es_dice_disc", es["disc"]),
        (attr, "", "es_dice_cup", es["cup"]),
        (attr, "", "es_dice", es[""]),
        (attr, "", "dice_disc_gap", _gap(per["disc"])),
        (attr, "", "dice_cup_gap", _gap(per["cup"])),
        (attr, "", "dice_gap", _gap(per[""])),
        (attr, "", "es_dice_rim", es["rim"]),
        (attr, "", "dice_rim_gap", _gap(per["rim"])),
    ]


GROUP_METRICS = (*SAMPLE_COLUMNS, *INTERVALS)  # the rows of the client and of each group, in order


def client_segmentation_metrics(
    samples: Mapping[str, npt.ArrayLike],
    attributes: Mapping[str, npt.ArrayLike],
    group_names: Mapping[str, Mapping[int, str]],
    *,
    n_boot: int = 200,
    seed: int = 0,
) -> list[Row]:
    """One client's segmentation metrics as (attribute, group, metric, value) rows (`metrics.client_metrics`'s form).

    Args:
        samples: Per-sample `SAMPLE_COLUMNS` (from `sample_metrics`, or predictions.parquet).
        attributes: attribute -> group code per sample (-1 unknown).
        group_names: attribute -> {code: name}; every code used must be listed.

    Rows: the client's `GROUP_METRICS` (attribute and group ""); per attribute the `EQUITY`
    rows (group ""), then `GROUP_METRICS` for every listed group in code order (NaN when the
    group has no samples). Unknown-group samples count for the client, in no group.
    """
    values = _check_samples(samples)
    n = len(values["dice_disc"])
    everyone = _summary(values, np.arange(n), n_boot, seed, "the client")
    rows: list[Row] = [("", "", m, everyone[m]) for m in GROUP_METRICS]
    for attr, raw in attributes.items():
        if attr not in group_names:
            raise ValueError(f"no group names for attribute {attr!r}")
        names = group_names[attr]
        codes = _attribute_codes(attr, raw, names, n)
        groups = {code: _summary(values, np.flatnonzero(codes == code), n_boot, _group_seed(seed, code), f"group {names[code]!r} of {attr}") for code in sorted(names)}
        rows += _equity_rows(attr, everyone, groups)
        for code, summary in groups.items():
            rows += [(attr, names[code], m, summary[m]) for m in GROUP_METRICS]
    return rows
