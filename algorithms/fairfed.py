"""FairFed (Ezzeldin et al., "FairFed: Enabling Group Fairness in Federated Learning", AAAI 2023).

Each sampled client counts, per group of the target attribute, a confusion matrix of the received
global model on its train split (`client_statistics`, the round's statistics pass before training).
From the whole cohort's counts, before any update is folded, the server forms the global gap F_g, gives
each client Δ_k = |F_g − F_k| (|Acc_g − Acc_k| where a gap is undefined, e.g. a client holding one
group, as the paper does), moves the weights ω_k ← ω_k − β(Δ_k − mean Δ) and aggregates
Σ ω_k θ_k / Σ ω_k.

The gap (`metric`), as in the paper for a two-group attribute A ∈ {a0, a1} (a0 < a1, the source's
group codes), is **signed**, so a client biased the opposite way to the global model is far from it:
- `eop`: equal opportunity TPR(A=a0) − TPR(A=a1);
- `spd`: statistical parity P(ŷ=1 | A=a0) − P(ŷ=1 | A=a1).
For more than two groups raysim's documented extension uses the unsigned max − min forms of
`raysim.metrics`: `eod` (equalized odds, max of the TPR and FPR gaps) and `spd`; `eod` is also
available for two groups. `auto` (the default) is `eop` for two groups, `eod` otherwise; `eop` on
an attribute with more groups is a ConfigError before training.
Multi-class tasks: a signed gap is a vector of one-vs-rest values, one per class present in the
cohort's labels, and Δ_k is the mean |F_g,c − F_k,c| over the classes where both are defined;
the unsigned gaps are the mean one-vs-rest value, as the evaluation metrics define them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from torch import nn

from raysim.algorithms.aggregation import AggregationError, WeightedSum
from raysim.algorithms.base import Algorithm, ServerState, register_algorithm
from raysim.client.client import Client
from raysim.config import ConfigError
from raysim.datasets.base import DataSource
from raysim.metrics.classification import predictions
from raysim.types import Tensors, Update

log = logging.getLogger(__name__)
STATS_KEY = "group_confusion"  # client_statistics: {group code: (K, K) counts [label, prediction]}, -1 = unknown group
Confusion = Mapping[int, np.ndarray]
METRICS = ("auto", "eop", "spd", "eod")
SIGNED = ("eop", "spd")  # signed when the attribute has two groups


@dataclass
class FairFedParams:
    """The paper studies β as a fairness budget; its default here is declearn's (the Inria FairFed port)."""

    beta: float = 1.0  # fairness budget β >= 0 (β = 0 is FedAvg); 1.0 as in declearn's FairFed (Inria)
    # The gap the weights chase: "auto" (eop for a two-group attribute, the paper's; eod otherwise),
    # "eop" (signed equal opportunity, two groups only), "spd" (statistical parity: signed for two
    # groups, max − min for more) or "eod" (equalized odds, max − min: raysim's extension)
    metric: str = "auto"
    weight_floor: float = 1e-3  # a step never leaves a client below this share of the cohort's total weight, in (0, 1)

    def __post_init__(self) -> None:
        if not (isinstance(self.beta, (int, float)) and self.beta >= 0):
            raise ValueError(f"beta must be a number >= 0, got {self.beta!r}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if not 0 < self.weight_floor < 1:
            raise ValueError(f"weight_floor must be in (0, 1), got {self.weight_floor!r}")


def resolve_metric(metric: str, groups: Mapping[int, str], attribute: str = "the target attribute") -> str:
    """`auto` → eop (two groups) or eod; `eop` with other than two groups is a ConfigError."""
    if metric == "auto":
        return "eop" if len(groups) == 2 else "eod"
    if metric == "eop" and len(groups) != 2:
        names = ", ".join(groups.values())
        raise ConfigError(
            f"algorithm.metric=eop (signed equal opportunity) needs a two-group attribute; {attribute} has {len(groups)} groups ({names}): use metric=eod or spd (max − min over groups) or auto"
        )
    return metric


def group_confusion(labels: npt.ArrayLike, preds: npt.ArrayLike, groups: npt.ArrayLike, num_classes: int) -> dict[int, np.ndarray]:
    """Per group code: counts[label, prediction] as a (K, K) int64 matrix."""
    y, p, g = (np.asarray(a, dtype=np.int64) for a in (labels, preds, groups))
    out = {}
    for code in np.unique(g):
        counts = np.zeros((num_classes, num_classes), dtype=np.int64)
        np.add.at(counts, (y[g == code], p[g == code]), 1)
        out[int(code)] = counts
    return out


def merge_confusions(parts: Sequence[Confusion]) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    for part in parts:
        for code, counts in part.items():
            out[code] = out[code] + counts if code in out else np.array(counts, dtype=np.int64)
    return out


def _gap(rates: list[float]) -> float:
    return float(max(rates) - min(rates)) if len(rates) >= 2 else math.nan


def _binary_gap(known: Confusion, metric: str) -> float:
    """EOD = max(TPR gap, FPR gap) over the groups where each rate is defined; SPD = gap of P(ŷ=1)."""
    if metric == "spd":
        return _gap([m[:, 1].sum() / m.sum() for m in known.values() if m.sum() > 0])
    tpr = _gap([m[1, 1] / m[1].sum() for m in known.values() if m[1].sum() > 0])
    fpr = _gap([m[0, 1] / m[0].sum() for m in known.values() if m[0].sum() > 0])
    defined = [v for v in (tpr, fpr) if not math.isnan(v)]
    return float(max(defined)) if defined else math.nan


def _one_vs_rest(m: np.ndarray, k: int) -> np.ndarray:
    tp, fn, fp = m[k, k], m[k].sum() - m[k, k], m[:, k].sum() - m[k, k]
    return np.array([[m.sum() - tp - fn - fp, fp], [fn, tp]])


def fairness_gap(confusion: Confusion, metric: str) -> float:
    """Unsigned EOD or SPD (max − min) of the counts, known groups only; multi-class: mean one-vs-rest
    over the labels present. NaN if undefined. Equals `raysim.metrics`' eod / spd."""
    known = {g: m for g, m in sorted(confusion.items()) if g >= 0}
    if not known:
        return math.nan
    classes = next(iter(known.values())).shape[0]
    if classes == 2:
        return _binary_gap(known, metric)
    present = np.flatnonzero(sum(known.values()).sum(axis=1))
    values = [_binary_gap({g: _one_vs_rest(m, int(k)) for g, m in known.items()}, metric) for k in present]
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def _rate(m: np.ndarray | None, metric: str, k: int) -> float:
    """TPR of class k (eop) or P(ŷ = k) (spd) in one group's counts; NaN when undefined."""
    if m is None:
        return math.nan
    hits, total = (m[k, k], m[k].sum()) if metric == "eop" else (m[:, k].sum(), m.sum())
    return float(hits / total) if total > 0 else math.nan


def signed_gaps(confusion: Confusion, metric: str, groups: tuple[int, int], classes: Sequence[int]) -> np.ndarray:
    """rate(A=groups[0]) − rate(A=groups[1]) per class in `classes` (eop: TPR, spd: P(ŷ=k)); NaN where undefined."""
    first, second = (confusion.get(g) for g in groups)
    return np.array([_rate(first, metric, k) - _rate(second, metric, k) for k in classes], dtype=np.float64)


def accuracy_of(confusion: Confusion) -> float:
    """Accuracy over every sample counted, unknown group included."""
    total = sum(int(m.sum()) for m in confusion.values())
    return sum(int(np.trace(m)) for m in confusion.values()) / total if total else math.nan


def fairness_deltas(confusions: Sequence[Confusion], metric: str, groups: Sequence[int] | None = None) -> list[float]:
    """Δ_k = |F_g − F_k|, or |Acc_g − Acc_k| where F_g or F_k is undefined (NaN if both are).

    `metric` is resolved (eop, spd or eod); `groups` are the target attribute's group codes (default:
    the known groups the counts show). eop / spd with two groups are signed, the rest max − min.
    """
    merged = merge_confusions(confusions)
    codes = sorted(groups) if groups is not None else sorted(g for g in merged if g >= 0)
    global_acc = accuracy_of(merged)
    if metric in SIGNED and len(codes) == 2:
        pair = (codes[0], codes[1])
        labels = sum(merged.values()).sum(axis=1)
        classes = [1] if len(labels) == 2 else np.flatnonzero(labels).tolist()  # binary: the positive class
        global_gap = signed_gaps(merged, metric, pair, classes)
        log.debug("fairfed: global signed %s %s, accuracy %.4f", metric, np.round(global_gap, 4).tolist(), global_acc)
        out = []
        for part in confusions:
            diff = np.abs(global_gap - signed_gaps(part, metric, pair, classes))
            defined = diff[~np.isnan(diff)]
            out.append(float(defined.mean()) if defined.size else abs(global_acc - accuracy_of(part)))
        return out
    if metric == "eop":
        raise ValueError(f"eop is defined for two groups, got {codes}")
    unsigned = fairness_gap(merged, metric)
    log.debug("fairfed: global %s %.4f, accuracy %.4f", metric, unsigned, global_acc)
    out = []
    for part in confusions:
        local = fairness_gap(part, metric)
        out.append(abs(unsigned - local) if not (math.isnan(unsigned) or math.isnan(local)) else abs(global_acc - accuracy_of(part)))
    return out


def fairfed_weights(weights: Sequence[float], deltas: Sequence[float], *, beta: float, floor: float) -> list[float]:
    """ω_k ← ω_k − β N (Δ_k − mean Δ), N = Σ ω over the cohort: the paper's step on the shares ω_k / N.

    A step never takes a weight below floor · N (a weight already below keeps its value), so every
    aggregation weight stays positive; the cohort is then rescaled to its total N (the paper's
    normalisation, which leaves clients outside the cohort untouched). NaN Δ_k count as the mean.
    """
    total = sum(weights)
    defined = [d for d in deltas if not math.isnan(d)]
    mean = sum(defined) / len(defined) if defined else 0.0
    stepped = [max(w - beta * total * ((mean if math.isnan(d) else d) - mean), min(w, floor * total)) for w, d in zip(weights, deltas)]
    scale = total / sum(stepped)  # exactly 1.0 when nothing moved (β = 0): FedAvg bit for bit
    return [w * scale for w in stepped]


@register_algorithm("fairfed")
class FairFed(Algorithm):
    """Weights ω_k live in the server state per client id, in example units (start: ω_k = n_k)."""
    tasks = ("classification",)  # its weights come from the group gap of class predictions

    Params = FairFedParams
    round_statistics = True  # the weights need the whole cohort's group counts before the fold

    def __init__(self, params: Any, cfg: Any) -> None:
        super().__init__(params, cfg)
        # The target attribute's group codes, from the data source (`adapt`). Without one (the
        # class used on its own) the known groups the cohort's counts show stand in.
        self.groups: tuple[int, ...] | None = None

    def init_state(self, model: nn.Module) -> ServerState:
        return {**super().init_state(model), "fair_weights": {}}

    def adapt(self, model: nn.Module, source: DataSource) -> nn.Module:
        """Runs in the driver before training (and in each actor): checks the attribute and the metric."""
        if source.attribute is None:
            raise ConfigError(f"algorithm fairfed needs a target sensitive attribute (data.attribute); data source {source.name} has none")
        names = source.group_names[source.attribute]
        resolve_metric(self.params.metric, names, f"data.attribute={source.attribute}")
        self.groups = tuple(sorted(names))
        return model

    def gap_metric(self, confusions: Sequence[Confusion]) -> tuple[str, list[int]]:
        """(resolved metric, group codes) for this round's cohort."""
        if self.groups is not None:
            codes = list(self.groups)
        else:
            codes = sorted({g for confusion in confusions for g in confusion if g >= 0})
        return resolve_metric(self.params.metric, {g: str(g) for g in codes}), codes

    # --- client side --------------------------------------------------------------------------

    def client_statistics(self, client: Client, payload: Tensors, round_: int) -> dict[str, Any]:
        """The received global model's group confusion on the client's train split, and its example count."""
        seen = client.predict("train", client.load(payload))
        classes = 2 if seen.scores.ndim == 1 else seen.scores.shape[1]
        confusion = group_confusion(seen.labels, predictions(seen.scores), seen.attributes[client.attribute], classes)
        return {STATS_KEY: confusion, "num_examples": client.num_train}

    # --- server side --------------------------------------------------------------------------

    def fold_start(self, round_: int, state: ServerState, statistics: dict[str, dict[str, Any]]) -> FairFedFold:
        """The round's weights ω_k for the whole sampled cohort, from its statistics, before any update."""
        ids = sorted(statistics)
        missing = [cid for cid in ids if STATS_KEY not in statistics[cid] or "num_examples" not in statistics[cid]]
        if missing:
            raise AggregationError(f"fairfed needs each client's group counts and example count (client_statistics: {STATS_KEY!r}, 'num_examples'); missing from {missing}")
        known: dict[str, float] = state["fair_weights"]
        if not ids:
            return FairFedFold({}, {}, WeightedSum())  # nothing to weigh by: `accumulate` says so
        confusions = [cast(Confusion, statistics[cid][STATS_KEY]) for cid in ids]
        metric, codes = self.gap_metric(confusions)
        deltas = fairness_deltas(confusions, metric, codes)
        previous = {cid: known.get(cid, float(statistics[cid]["num_examples"])) for cid in ids}
        weights = fairfed_weights([previous[cid] for cid in ids], deltas, beta=self.params.beta, floor=self.params.weight_floor)
        return FairFedFold(dict(zip(ids, weights)), previous, WeightedSum())

    def accumulate(self, fold: FairFedFold, update: Update) -> None:
        weight = fold.weights.get(update.client_id)
        if weight is None:
            if not fold.weights:
                raise AggregationError(
                    "fairfed weighs each update by the cohort's round statistics, and none were given: "
                    "pass statistics={client id: FairFed.client_statistics(...)} to aggregate (the engine gathers them when round_statistics is set)"
                )
            raise AggregationError(f"client {update.client_id}: its update arrived without round statistics (client_statistics), so fairfed has no weight for it")
        fold.mean.add(update.tensors, weight, update.client_id)
        fold.arrived.append(update.client_id)

    def finalize(self, round_: int, fold: FairFedFold, state: ServerState) -> ServerState:
        averaged = fold.mean.mean()  # no update at all is an AggregationError
        stored = {cid: fold.weights[cid] for cid in fold.arrived}
        if len(stored) < len(fold.weights):
            # A sampled client whose update never arrived keeps its old weight. The others' step
            # used the whole cohort's statistics (they describe the received model, so F_g and the
            # mean Δ were the cohort's), and this round was averaged with those weights; they are
            # stored rescaled to the total the arrived clients had before the round. Σ ω θ / Σ ω
            # does not see the scale, and the known weights keep their sum, as when every update
            # arrives, instead of the missing client's share leaking into (or out of) the others'.
            scale = sum(fold.previous[cid] for cid in stored) / sum(stored.values())
            stored = {cid: w * scale for cid, w in stored.items()}
        return {**state, "weights": averaged, "fair_weights": {**state["fair_weights"], **stored}}


@dataclass
class FairFedFold:
    weights: dict[str, float]  # client id -> this round's ω_k (the whole sampled cohort)
    previous: dict[str, float]  # client id -> ω_k before the step
    mean: WeightedSum  # Σ ω_k θ_k over the updates that arrived
    arrived: list[str] = field(default_factory=list)
