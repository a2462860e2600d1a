"""FedOpt (Reddi et al., "Adaptive Federated Optimization", ICLR 2021): a server optimiser on the mean client update.

Shared base of fedadam, fedyogi and fedadagrad (they differ only in the second-moment rule),
plus the pieces FedNova and q-FFL reuse: `ServerStep` (a server rule on the trainable
parameters, FedAvg on the buffers), which folds each update into a `StepFold` (Σ_k c_k (θ_k − θ)
in float64 and the method's running scalars).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from raysim.algorithms.aggregation import WeightedSum, check_against
from raysim.algorithms.base import Algorithm, ServerState
from raysim.types import Update

RULES = ("adam", "yogi", "adagrad")
WEIGHTINGS = ("examples", "uniform")


def stepped_keys(model: nn.Module, keys: Sequence[str]) -> list[str]:
    """The communicated keys a server rule steps: the trainable parameters.

    Buffers (BatchNorm running statistics) are averaged as FedAvg does: they are not
    gradients, and an extrapolating or adaptive step could push a running variance below zero.
    """
    trainable = {name for name, p in model.named_parameters() if p.requires_grad and p.is_floating_point()}
    return [k for k in keys if k in trainable]


class StepFold:
    """One round of a `ServerStep` method as running sums: the buffers' `WeightedSum`, and per
    stepped key Σ_k c_k (θ_k − θ) (or Σ_k c_k t_k) in float64, the method's scalars in `totals`.

    Each update is checked against the server's weights (names, shapes), added and dropped:
    nothing of it is kept. Memory: one float64 copy of the stepped tensors and of the buffers.
    """

    def __init__(self, weights: Mapping[str, torch.Tensor], stepped: Sequence[str]) -> None:
        self.origin = weights
        self.buffers = WeightedSum([k for k in weights if k not in set(stepped)])
        self.sums = {k: torch.zeros(weights[k].shape, dtype=torch.float64) for k in stepped}
        self.totals: dict[str, float] = {}

    def check(self, update: Update) -> None:
        check_against(self.origin, update)

    def add(self, tensors: Mapping[str, torch.Tensor], coef: float, *, relative: bool = True) -> None:
        """sums += coef · (t − θ) per stepped key (`relative=False`: coef · t)."""
        for key, acc in self.sums.items():
            value = tensors[key].to(torch.float64)
            acc.add_(value - self.origin[key] if relative else value, alpha=coef)

    def total(self, name: str, value: float) -> None:
        """totals[name] += value."""
        self.totals[name] = self.totals.get(name, 0.0) + value


class ServerStep(Algorithm):
    """A method whose server applies its own rule to the trainable parameters; buffers get FedAvg.

    The fold is a `StepFold`: per update `accumulate_step` adds to the method's running sums,
    `finalize_step` turns them into the new values of the stepped keys.
    """

    def init_state(self, model: nn.Module) -> ServerState:
        state = super().init_state(model)
        return {**state, "stepped": stepped_keys(model, list(state["weights"]))}

    def fold_start(self, round_: int, state: ServerState, statistics: dict[str, dict[str, Any]]) -> StepFold:
        return StepFold(state["weights"], state["stepped"])

    def accumulate(self, fold: StepFold, update: Update) -> None:
        fold.check(update)
        fold.buffers.add(update.tensors, self.mean_weight(update), update.client_id)  # checks the weight too
        self.accumulate_step(fold, update)

    def finalize(self, round_: int, fold: StepFold, state: ServerState) -> ServerState:
        rest = fold.buffers.mean()  # also: no update at all is an AggregationError
        new, state = self.finalize_step(fold, state)
        return {**state, "weights": {k: new[k] if k in fold.sums else rest[k] for k in state["weights"]}}

    def accumulate_step(self, fold: StepFold, update: Update) -> None:
        """Add one (checked) update to the stepped keys' running sums and the method's totals."""
        raise NotImplementedError

    def finalize_step(self, fold: StepFold, state: ServerState) -> tuple[dict[str, torch.Tensor], ServerState]:
        """New values of `state["stepped"]` (each in its tensor's dtype) and the updated state."""
        raise NotImplementedError

    def mean_weight(self, update: Update) -> float:
        """A client's weight in the buffers' mean (and in FedOpt's mean update): its example count."""
        return float(update.num_examples)


def apply_delta(weights: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """θ + δ computed in float64, stored back in each tensor's own dtype."""
    return {k: (weights[k].to(torch.float64) + d).to(weights[k].dtype) for k, d in delta.items()}


def fedopt_step(
    rule: str,
    weights: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    m: Mapping[str, torch.Tensor],
    v: Mapping[str, torch.Tensor],
    *,
    eta: float,
    tau: float,
    beta1: float,
    beta2: float,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One step of Reddi et al. Algorithm 2 on the mean update Δ (= −pseudo-gradient); returns (θ, m, v).

    m ← β1 m + (1−β1) Δ; v ← β2 v + (1−β2) Δ² (Adam), v − (1−β2) Δ² sign(v − Δ²) (Yogi),
    v + Δ² (Adagrad); θ ← θ + η m / (√v + τ). No bias correction, as in the paper.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    new_w, new_m, new_v = {}, {}, {}
    for key, d in delta.items():
        d = d.to(torch.float64)
        m64, v64, sq = m[key].to(torch.float64), v[key].to(torch.float64), d * d
        m64 = beta1 * m64 + (1.0 - beta1) * d
        if rule == "adam":
            v64 = beta2 * v64 + (1.0 - beta2) * sq
        elif rule == "yogi":
            v64 = v64 - (1.0 - beta2) * sq * torch.sign(v64 - sq)
        else:
            v64 = v64 + sq
        w = weights[key]
        new_w[key] = (w.to(torch.float64) + eta * m64 / (v64.sqrt() + tau)).to(w.dtype)
        new_m[key], new_v[key] = m64.to(m[key].dtype), v64.to(v[key].dtype)
    return new_w, new_m, new_v


@dataclass
class AdaptiveParams:
    """Server optimiser settings. β1 = 0.9, β2 = 0.99 and τ = 1e-3 as fixed in Reddi et al.'s
    experiments; η is tuned per task there (log grid), 1e-2 is Flower's FedYogi default."""

    eta: float = 1e-2  # server learning rate η: the step the mean client update drives
    tau: float = 1e-3  # adaptivity τ: added to √v (small = more adaptive); v starts at τ² (Algorithm 2)
    beta1: float = 0.9  # first-moment (server momentum) decay β1, in [0, 1)
    # mean of the client updates (and of the buffers): "examples" weighs client k by n_k (FedAvg's
    # weights), "uniform" is the paper's unweighted mean (Algorithm 2: Δ = (1/|S|) Σ_k Δ_k)
    weighting: str = "examples"

    def __post_init__(self) -> None:
        if not self.eta > 0:
            raise ValueError(f"eta (server learning rate) must be > 0, got {self.eta!r}")
        if not self.tau > 0:
            raise ValueError(f"tau (adaptivity) must be > 0, got {self.tau!r}")
        if not 0 <= self.beta1 < 1:
            raise ValueError(f"beta1 must be in [0, 1), got {self.beta1!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"algorithm.weighting must be 'examples' or 'uniform', got {self.weighting!r}")


@dataclass
class FedOptParams(AdaptiveParams):
    """FedAdam / FedYogi settings (FedAdagrad has no β2)."""

    beta2: float = 0.99  # second-moment decay β2, in [0, 1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.beta2 < 1:
            raise ValueError(f"beta2 must be in [0, 1), got {self.beta2!r}")


class FedOpt(ServerStep):
    """Server optimiser on the mean update (`weighting`: by examples or uniform); moments live in the
    server state (checkpointed). BatchNorm buffers get the same weighted mean."""

    rule: ClassVar[str] = "adam"
    Params: ClassVar[type] = FedOptParams

    def init_state(self, model: nn.Module) -> ServerState:
        state = super().init_state(model)
        weights = state["weights"]
        # v_{-1} = τ² (Algorithm 2 asks v_{-1} ≥ τ²); m_{-1} = 0.
        m = {k: torch.zeros_like(weights[k]) for k in state["stepped"]}
        v = {k: torch.full_like(weights[k], self.params.tau**2) for k in state["stepped"]}
        return {**state, "m": m, "v": v}

    def accumulate_step(self, fold: StepFold, update: Update) -> None:
        weight = self.mean_weight(update)
        fold.add(update.tensors, weight)
        fold.total("weight", weight)

    def finalize_step(self, fold: StepFold, state: ServerState) -> tuple[dict[str, torch.Tensor], ServerState]:
        total = fold.totals["weight"]
        delta = {k: acc / total for k, acc in fold.sums.items()}  # Δ = Σ_k w_k (θ_k − θ) / Σ_k w_k
        p = self.params
        weights, m, v = fedopt_step(self.rule, state["weights"], delta, state["m"], state["v"], eta=p.eta, tau=p.tau, beta1=p.beta1, beta2=getattr(p, "beta2", 0.0))
        return weights, {**state, "m": m, "v": v}

    def mean_weight(self, update: Update) -> float:
        return 1.0 if self.params.weighting == "uniform" else super().mean_weight(update)
