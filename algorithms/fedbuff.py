"""FedBuff (Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022).

Clients train asynchronously on the model version they downloaded; the server buffers their
updates and takes one step once `buffer_size` (K) have arrived:

    Δ̄ = Σ_k w_k s(τ_k) (x_k − x_{v_k}) / Σ_k w_k,    x ← x + η_g Δ̄

on the trainable parameters (buffers such as BatchNorm's running statistics take the buffered
updates' w-weighted mean)
with τ_k the update's staleness (server steps since its download), s the staleness weight
(FedBuff: 1/√(1+τ)), w_k 1 (the paper's 1/K) or the client's training examples, and η_g the
server learning rate. A round of the run is one server step. Which clients train when, and how
stale each update is, comes from the simulated clock (`system.*`, `raysim.systems.AsyncClock`),
never from wall time, so runs are deterministic. With K = `system.concurrency` = the cohort,
`refill=step`, η_g = 1, `weighting=examples` and `staleness=none` each step is FedAvg's round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from raysim.algorithms.aggregation import AggregationError, WeightedSum, check_against
from raysim.algorithms.base import Algorithm, ServerState, register_algorithm
from raysim.algorithms.fedopt import stepped_keys
from raysim.types import Tensors, Update

BASE_VERSION, STALENESS = "base_version", "staleness"  # Update.extra keys the driver sets on arrival
STALENESS_RULES = ("none", "polynomial", "hinge")


@dataclass
class ScheduleParams:
    """What every buffered asynchronous method shares: the staleness weight and the refill rule."""

    staleness: str = "polynomial"  # none; polynomial (1 + τ)^-a (FedBuff: a = 0.5); hinge (FedAsync: 1 for τ <= b, else 1 / (a (τ − b) + 1))
    staleness_a: float = 0.5
    staleness_b: float = 4.0
    refill: str = "arrival"  # arrival: a slot is refilled as an update arrives (FedBuff's loop); step: once the server has stepped

    def __post_init__(self) -> None:
        if self.staleness not in STALENESS_RULES:
            raise ValueError(f"staleness must be one of {', '.join(STALENESS_RULES)}, got {self.staleness!r}")
        if self.staleness_a < 0 or self.staleness_b < 0:
            raise ValueError("staleness_a and staleness_b must be >= 0")
        if self.refill not in ("arrival", "step"):
            raise ValueError(f"refill must be arrival or step, got {self.refill!r}")


@dataclass
class BufferParams(ScheduleParams):
    buffer_size: int | None = None  # K updates per server step (null: half of system.concurrency, at least 1)
    server_lr: float = 1.0  # η_g
    weighting: str = "uniform"  # uniform (the paper's 1/K) or examples (n_k / Σ n)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.buffer_size is not None and (isinstance(self.buffer_size, bool) or not isinstance(self.buffer_size, int) or self.buffer_size < 1):
            raise ValueError(f"buffer_size must be a positive integer or null, got {self.buffer_size!r}")
        if not self.server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {self.server_lr}")
        if self.weighting not in ("uniform", "examples"):
            raise ValueError(f"weighting must be uniform or examples, got {self.weighting!r}")


def staleness_weight(rule: str, tau: int, a: float, b: float) -> float:
    """s(τ) of Xie et al. (FedAsync, 2019), which FedBuff uses with the polynomial rule, a = 0.5."""
    if rule == "none":
        return 1.0
    if rule == "polynomial":
        return float((1.0 + tau) ** -a)
    return 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)


class BufferFold:
    """Σ_k w_k s_k (x_k − x_{v_k}) of the trainable parameters in float64 and Σ_k w_k: one running
    sum, whatever K. Buffers (BatchNorm's running statistics) are no gradient steps: a stale
    update's difference added to a newer model can drive a running variance negative (FedBuff
    diverged on resnet18 that way), so they take the buffered updates' w-weighted mean, as FedOpt
    and FedNova treat them."""

    def __init__(self, state: ServerState) -> None:
        self.history: dict[int, Tensors] = state["history"]
        self.stepped = set(state["stepped"])
        self.buffers = WeightedSum([k for k in state["weights"] if k not in self.stepped])
        self.sums: dict[str, torch.Tensor] = {}
        self.total = 0.0
        self.count = 0

    def add(self, update: Update, weight: float, scale: float) -> None:
        base = self.history.get(int(update.extra[BASE_VERSION]))
        if base is None:
            raise AggregationError(f"client {update.client_id}: trained on model version {update.extra[BASE_VERSION]}, which the server no longer holds")
        check_against(base, update)
        self.buffers.add(update.tensors, weight, update.client_id)
        for key, value in update.tensors.items():
            if key not in self.stepped:
                continue
            delta = value.to(torch.float64) - base[key].to(torch.float64)
            if key in self.sums:
                self.sums[key].add_(delta, alpha=weight * scale)
            else:
                self.sums[key] = delta.mul_(weight * scale)
        self.total += weight
        self.count += 1


@register_algorithm("fedbuff")
class FedBuff(Algorithm):
    """Buffered asynchronous aggregation: see the module docstring."""

    Params = BufferParams
    asynchronous: ClassVar[bool] = True

    def buffer_for(self, concurrency: int) -> int:
        """K: `buffer_size`, else half the clients training at once (at least 1)."""
        return self.params.buffer_size or max(1, concurrency // 2)

    def init_state(self, model: torch.nn.Module) -> ServerState:
        state = super().init_state(model)
        return {**state, "stepped": stepped_keys(model, list(state["weights"])), "version": 0, "history": {0: state["weights"]}}

    def version_payload(self, state: ServerState, version: int) -> Tensors:
        """The weights of model version `version` (what a client that downloaded it trains on)."""
        return state["history"][version]

    def keep_versions(self, state: ServerState, needed: set[int]) -> ServerState:
        """Forget the versions no client in flight trained on (the current one stays)."""
        keep = needed | {state["version"]}
        return {**state, "history": {v: w for v, w in state["history"].items() if v in keep}}

    def fold_start(self, round_: int, state: ServerState, statistics: dict[str, dict[str, Any]]) -> Any:
        return BufferFold(state)

    def accumulate(self, fold: Any, update: Update) -> None:
        p = self.params
        weight = float(update.num_examples) if p.weighting == "examples" else 1.0
        fold.add(update, weight, staleness_weight(p.staleness, int(update.extra[STALENESS]), p.staleness_a, p.staleness_b))

    def finalize(self, round_: int, fold: Any, state: ServerState) -> ServerState:
        if not fold.count:
            raise AggregationError("no client updates to aggregate")
        current = state["weights"]
        step = self.params.server_lr / fold.total
        new = {k: (current[k].to(torch.float64) + fold.sums[k] * step).to(current[k].dtype) if k in fold.sums else current[k] for k in current}
        if fold.buffers.count and fold.buffers.keys:
            new.update(fold.buffers.mean())
        version = state["version"] + 1
        return {**state, "weights": new, "version": version, "history": {**state["history"], version: new}}
