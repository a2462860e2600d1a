"""FedOpt (Reddi et al., "Adaptive Federated Optimization", ICLR 2021): a server optimiser on the mean client update.

Shared base of fedadam, fedyogi and fedadagrad (they differ only in the second-moment rule),
plus the pieces FedNova and q-FFL reuse: `ServerStep` (a server rule on the trainable
parameters, FedAvg on the buffers) and `update_sum` (Σ_k c_k (θ_k − θ) in float64).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from raysim.algorithms.aggregation import validate_updates, weighted_average
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


def update_sum(tensors: Sequence[Mapping[str, torch.Tensor]], coefs: Sequence[float], base: Mapping[str, torch.Tensor], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """Σ_k c_k (θ_k − θ) per key in float64, summed in the given (sorted) order."""
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        origin = base[key].to(torch.float64)
        acc = torch.zeros_like(origin)
        for update, coef in zip(tensors, coefs):
            acc += (update[key].to(torch.float64) - origin) * coef
        out[key] = acc
    return out


class ServerStep(Algorithm):
    """A method whose server applies its own rule to the trainable parameters; buffers get FedAvg."""

    def init_state(self, model: nn.Module) -> ServerState:
        state = super().init_state(model)
        return {**state, "stepped": stepped_keys(model, list(state["weights"]))}

    def aggregate(self, round_: int, updates: list[Update], state: ServerState) -> ServerState:
        tensors, ids, weights = [u.tensors for u in updates], [u.client_id for u in updates], self.mean_weights(updates)
        validate_updates(tensors, weights, ids)
        stepped = set(state["stepped"])
        rest = weighted_average([{k: v for k, v in t.items() if k not in stepped} for t in tensors], weights, ids)
        new, state = self.server_step(updates, state)
        return {**state, "weights": {k: new[k] if k in stepped else rest[k] for k in state["weights"]}}

    def server_step(self, updates: list[Update], state: ServerState) -> tuple[dict[str, torch.Tensor], ServerState]:
        """New values of `state["stepped"]` (any dtype; cast back here) and the updated state."""
        raise NotImplementedError

    def mean_weights(self, updates: list[Update]) -> list[float]:
        """Client weights of the buffers' mean (and of FedOpt's mean update): example counts."""
        return [float(u.num_examples) for u in updates]


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

    def server_step(self, updates: list[Update], state: ServerState) -> tuple[dict[str, torch.Tensor], ServerState]:
        shares = self.mean_weights(updates)
        total = sum(shares)
        delta = update_sum([u.tensors for u in updates], [w / total for w in shares], state["weights"], state["stepped"])
        p = self.params
        weights, m, v = fedopt_step(self.rule, state["weights"], delta, state["m"], state["v"], eta=p.eta, tau=p.tau, beta1=p.beta1, beta2=getattr(p, "beta2", 0.0))
        return weights, {**state, "m": m, "v": v}

    def mean_weights(self, updates: list[Update]) -> list[float]:
        return [1.0] * len(updates) if self.params.weighting == "uniform" else super().mean_weights(updates)
