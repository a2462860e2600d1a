"""FedAsync (Xie, Koyejo & Gupta, "Asynchronous Federated Optimization", 2019).

The server mixes in every update as it arrives: x ← (1 − α_t) x + α_t x_k with α_t = α s(τ),
τ the update's staleness and s FedAsync's staleness function (`polynomial` (1 + τ)^-a or
`hinge`). A round is one server step (one update); who trains when comes from the simulated
clock, as for FedBuff.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from raysim.algorithms.aggregation import AggregationError, check_against
from raysim.algorithms.base import ServerState, register_algorithm
from raysim.algorithms.fedbuff import STALENESS, FedBuff, ScheduleParams, staleness_weight
from raysim.types import Update


@dataclass
class AsyncParams(ScheduleParams):
    alpha: float = 0.6  # the mixing weight α (Xie et al. try 0.6 to 0.9); with one update per step, both refills alike

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")


class MixFold:
    """The mixed weights in float64, starting from the server's (one update per step in a run;
    several, in arrival order, mix in one after another)."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self.weights = weights
        self.mixed = {k: v.to(torch.float64) for k, v in weights.items()}
        self.count = 0


@register_algorithm("fedasync")
class FedAsync(FedBuff):
    Params = AsyncParams

    def buffer_for(self, concurrency: int) -> int:
        return 1

    def fold_start(self, round_: int, state: ServerState, statistics: dict[str, dict[str, Any]]) -> Any:
        return MixFold(state["weights"])

    def accumulate(self, fold: Any, update: Update) -> None:
        check_against(fold.weights, update)
        p = self.params
        alpha = p.alpha * staleness_weight(p.staleness, int(update.extra[STALENESS]), p.staleness_a, p.staleness_b)
        for key, value in update.tensors.items():
            fold.mixed[key].mul_(1 - alpha).add_(value.to(torch.float64), alpha=alpha)
        fold.count += 1

    def finalize(self, round_: int, fold: Any, state: ServerState) -> ServerState:
        if not fold.count:
            raise AggregationError("no client updates to aggregate")
        current = state["weights"]
        new = {k: fold.mixed[k].to(current[k].dtype) for k in current}
        version = state["version"] + 1
        return {**state, "weights": new, "version": version, "history": {**state["history"], version: new}}
