"""FairLoRA (FairFedMed, IEEE TMI 2025): LoRA with one row of singular values per group.

Each adapted layer computes `W0·x + (alpha/r)·((x·A) ⊙ π(g)S)·B`. The server averages S row
by row with each client's count of that group, makes the first half of S shared across
groups, and blends the result with the previous global by a round-dependent EMA
(β_t = ema·(t−1)/T, FedLoRA's `server_blend`; 0 in the first round). An optional
differentiable group-fairness loss (`lambda_fair`, 0 as in the paper) penalises unequal error.
Rules: specs/fairfedmed.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from raysim.algorithms.aggregation import AggregationError, WeightedSum
from raysim.algorithms.base import ServerState, register_algorithm
from raysim.algorithms.fedlora import FedLoRA, LoRAParams
from raysim.client.training import Batch, forward, supervised_loss
from raysim.config import ConfigError
from raysim.datasets.base import DataSource
from raysim.models import adapters
from raysim.types import Tensors, Update


@dataclass
class FairLoRAParams(LoRAParams):
    own_weight: float = 0.7  # π's weight on the sample's own group (reference code); 1.0 = the paper's one-hot
    lambda_fair: float = 0.0  # weight of the differentiable group-fairness loss (0 in the paper)
    ema: float = 0.999  # the reference's server EMA (FedLoRA's field, off there): β_t = ema·(t−1)/T; 0 disables

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.own_weight <= 1.0:
            raise ValueError(f"algorithm.own_weight must be in (0, 1], got {self.own_weight}")
        if self.lambda_fair < 0:
            raise ValueError(f"algorithm.lambda_fair must be >= 0, got {self.lambda_fair}")


@register_algorithm("fairlora")
class FairLoRA(FedLoRA):
    Params = FairLoRAParams

    def adapt(self, model: nn.Module, source: DataSource) -> nn.Module:
        if self.params.lambda_fair > 0 and self.task.name != "classification":
            raise ConfigError(f"algorithm.lambda_fair={self.params.lambda_fair}: FairLoRA's group error gap is defined for classification, not {self.task.name}; set algorithm.lambda_fair=0")
        rank, alpha = self.params.rank_alpha(model)
        groups = num_groups(source)
        try:
            adapters.validate_fair_rank(rank, groups)
        except ValueError as err:
            raise ConfigError(f"algorithm.rank: {err} (target attribute {source.attribute!r}); set algorithm.rank") from err
        self.inject(model, adapters.FairLoRA, rank=rank, alpha=alpha, num_groups=groups, own_weight=self.params.own_weight)
        return model

    # --- client side --------------------------------------------------------------------------

    def client_fit(self, client, payload: Tensors, round_: int) -> Update:  # type: ignore[no-untyped-def]
        update = super().client_fit(client, payload, round_)
        update.extra["group_counts"] = client_group_counts(client, self._groups(payload))
        return update

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits = forward(model, batch)
        loss = supervised_loss(logits, batch)  # per-pixel CE + Dice for a segmentation batch
        if self.params.lambda_fair > 0 and batch.group is not None:
            loss = loss + self.params.lambda_fair * group_error_gap(logits, batch.y, batch.group)
        return loss

    # --- server side --------------------------------------------------------------------------

    def fold_start(self, round_: int, state: ServerState, statistics: dict[str, dict[str, Any]]) -> FairLoRAFold:
        previous = state["weights"]
        return FairLoRAFold(WeightedSum(), {key: GroupRows(previous[key].shape) for key in singular_value_keys(previous)})

    def accumulate(self, fold: FairLoRAFold, update: Update) -> None:
        """Every tensor into the example-weighted sum; each S row g also by the client's count n_{k,g}."""
        counts = update.extra.get("group_counts")
        if counts is None:
            raise AggregationError(f"fairlora needs each client's group counts (extra['group_counts']); missing from {[update.client_id]}")
        fold.mean.add(update.tensors, float(update.num_examples), update.client_id)  # names, shapes, weight
        absent = [key for key in fold.rows if key not in update.tensors]
        if absent:
            raise AggregationError(f"client {update.client_id}: no singular values {absent[:3]}, which the server's weights hold")
        for key, rows in fold.rows.items():
            rows.add(update.tensors[key], cast(Sequence[float], counts), update.client_id)

    def finalize(self, round_: int, fold: FairLoRAFold, state: ServerState) -> ServerState:
        averaged, previous = fold.mean.mean(), state["weights"]
        for key, rows in fold.rows.items():
            averaged[key] = share_first_half(rows.rows(previous[key]))
        return {**state, "weights": self.server_blend(round_, averaged, previous)}

    def _groups(self, payload: Tensors) -> int:
        key = next(iter(singular_value_keys(payload)))
        return payload[key].shape[0]


def num_groups(source: DataSource) -> int:
    """G: the number of groups of the target attribute (1 when the source has none)."""
    names = source.group_names.get(source.attribute or "", {})
    return max(names) + 1 if names else 1


def client_group_counts(client, groups: int) -> list[int]:  # type: ignore[no-untyped-def]
    """n_{k,g}: this client's training examples of each group (unknowns count for none)."""
    table = client.shards["train"].table
    if client.attribute is None:
        return [len(table)] * groups
    codes = table.attributes[client.attribute]
    return [int((codes == g).sum()) for g in range(groups)]


def singular_value_keys(tensors: Tensors) -> list[str]:
    return [k for k in tensors if k.endswith("lora_S")]


class GroupRows:
    """Σ_k n_{k,g} S_k[g] and Σ_k n_{k,g} per group row g in float64, one client at a time."""

    def __init__(self, shape: torch.Size) -> None:
        self.sums = torch.zeros(shape, dtype=torch.float64)
        self.counts = torch.zeros(shape[0], dtype=torch.float64)

    def add(self, s: torch.Tensor, counts: Sequence[float], name: str) -> None:
        weights = torch.as_tensor(counts, dtype=torch.float64)
        if weights.shape != self.counts.shape:
            raise AggregationError(f"client {name}: {len(weights)} group counts for {len(self.counts)} rows of singular values")
        if bool((weights < 0).any()):
            raise AggregationError(f"client {name}: negative group counts {list(counts)}")
        self.sums.add_(s.to(torch.float64) * weights.view(-1, *[1] * (s.dim() - 1)))
        self.counts.add_(weights)

    def rows(self, previous: torch.Tensor) -> torch.Tensor:
        """S[g] = Σ_k n_{k,g} S_k[g] / Σ_k n_{k,g}; a group no client holds keeps its previous row."""
        out = previous.to(torch.float64).clone()
        held = self.counts > 0
        out[held] = self.sums[held] / self.counts[held].view(-1, *[1] * (out.dim() - 1))
        return out.to(previous.dtype)


@dataclass
class FairLoRAFold:
    mean: WeightedSum  # every communicated tensor, by example counts (the S rows are replaced)
    rows: dict[str, GroupRows]  # per singular-value key


def aggregate_singular_values(rows: list[torch.Tensor], counts: np.ndarray, previous: torch.Tensor) -> torch.Tensor:
    """S[g] = Σ_k n_{k,g} S_k[g] / Σ_k n_{k,g} over a list (`GroupRows`, the fold's arithmetic); a group no client holds keeps its previous row."""
    acc = GroupRows(previous.shape)
    for k, s in enumerate(rows):
        acc.add(s, counts[k].tolist(), str(k))
    return acc.rows(previous)


def share_first_half(s: torch.Tensor) -> torch.Tensor:
    """The first r/2 singular values are shared: replaced by their mean over groups."""
    half = s.shape[1] // 2
    out = s.clone()
    out[:, :half] = s[:, :half].to(torch.float64).mean(dim=0, keepdim=True).to(s.dtype)
    return out


def group_error_gap(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """mean_g |c_g − mean(c)| with c_g = 1 − mean p(correct | g), over the groups in the batch.

    The reference code detaches this term; here it is differentiable, so it trains.
    """
    p_correct = torch.softmax(logits, dim=1).gather(1, labels.view(-1, 1)).squeeze(1)
    present = [g for g in torch.unique(groups).tolist() if g >= 0]
    if len(present) < 2:
        return logits.new_zeros(())
    errors = torch.stack([1 - p_correct[groups == g].mean() for g in present])
    return (errors - errors.mean()).abs().mean()
