"""FedHEAL (Chen et al., "Fair Federated Learning under Domain Skew with Local Consistency and
Domain Diversity", CVPR 2024; `yuhangchen0/FedHEAL`, `models/utils/federated_model.py`): FedAvg
with two server rules that keep clients with a rare domain from being drowned out.

- **FPHL, discarding unimportant updates.** Per client and per parameter element the server
  keeps h, the share of the client's rounds in which the element's update u = θ_global − θ_k was
  ≥ 0. In a round, an element whose sign agrees with its history less than `threshold` of the
  time (consistency h if u ≥ 0, else 1 − h) is masked out (m = 0) of that client's update; a
  client's first round keeps everything and starts h at [u ≥ 0]; then h ← (h·n + [u ≥ 0])/(n+1).
- **FAEL, fair aggregation weights.** The client's distance d_k = Σ over parameter tensors of
  ‖m ⊙ u‖₂; its weight moves by Δ_k = (1 − β)·Δ_k,prev + β·d_k / Σ_j d_j (over the round's
  clients), w_k = w_k,prev + Δ_k (w_k,prev = 1/K for a client's first round, K clients in the
  round), and the round's weights are w normalised over the round's clients. Clients whose
  models moved further from the global (a more diverse domain) gain weight.
- **Aggregation.** Each element of the global model moves by Σ_k w_k m_k (θ_k − θ) / Σ_k w_k m_k
  (unchanged where every client's element was masked). Example counts play no part.

As the reference, the rules cover every communicated tensor (BatchNorm statistics included)
and the distance the parameters only. Defaults: the reference's `--threshold 0.3 --beta 0.4`.
Two choices where the reference is loose: h counts a client's own rounds (the reference divides
by the global round index, the same when every client trains every round), and K counts the
updates that arrived (the reference has no failures). The stored w_k are unnormalised, as in
the reference. Server memory: a float32 history per client of the model's size, and six float64
running sums in the fold (the weights' decomposition below lets updates be folded as they
arrive, before Σ_j d_j and K are known).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raysim.algorithms.aggregation import AggregationError, check_against
from raysim.algorithms.base import Algorithm, ServerState, register_algorithm
from raysim.algorithms.fedopt import stepped_keys
from raysim.types import Update

# w_k = c_k + e_k / K + b_k / D with D = Σ_j d_j: the three parts of a client's unnormalised
# weight, each known when its update arrives (c: its past, e: 1 for a first round, b = β d_k).
PARTS = ("past", "first", "distance")


@dataclass
class FedHEALParams:
    threshold: float = 0.3  # FPHL: an element whose sign agrees with its history at most this often is discarded
    beta: float = 0.4  # FAEL: momentum of the weight increments

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"algorithm.threshold must be in [0, 1), got {self.threshold}")
        if not 0.0 < self.beta <= 1.0:
            raise ValueError(f"algorithm.beta must be in (0, 1], got {self.beta}")


class HealFold:
    """Σ_k part_k · m_k ⊙ (θ_k − θ) and Σ_k part_k · m_k per tensor and part (float64), the
    clients' distances and weight parts, and their new sign histories."""

    def __init__(self, weights: Mapping[str, torch.Tensor], params: list[str], heal: Mapping[str, Any]) -> None:
        self.origin = weights
        self.heal = heal  # the server's per-client histories, weights and increments before the round
        self.params = set(params)
        self.moves = {part: {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in weights.items()} for part in PARTS}
        self.masses = {part: {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in weights.items()} for part in PARTS}
        self.distances: dict[str, float] = {}
        self.parts: dict[str, dict[str, float]] = {}
        self.histories: dict[str, dict[str, torch.Tensor]] = {}


@register_algorithm("fedheal")
class FedHEAL(Algorithm):
    Params = FedHEALParams
    params: FedHEALParams

    def init_state(self, model: nn.Module) -> ServerState:
        state = super().init_state(model)
        empty: dict[str, Any] = {"history": {}, "seen": {}, "weight": {}, "increment": {}}
        return {**state, "params": stepped_keys(model, list(state["weights"])), "heal": empty}

    def fold_start(self, round_: int, state: ServerState, statistics: dict[str, dict[str, Any]]) -> HealFold:
        return HealFold(state["weights"], state["params"], state["heal"])

    def accumulate(self, fold: HealFold, update: Update) -> None:
        check_against(fold.origin, update)
        heal = fold.heal
        cid = update.client_id
        seen = int(heal["seen"].get(cid, 0))
        history = heal["history"].get(cid)
        distance = 0.0
        new_history = {}
        masked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key, origin in fold.origin.items():
            move = update.tensors[key].to(torch.float64) - origin.to(torch.float64)  # θ_k − θ = −u
            up = (move <= 0).to(torch.float32)  # [u ≥ 0], the reference's sign convention
            if seen == 0:
                mask = torch.ones_like(up)
                new_history[key] = up
            else:
                consistency = torch.where(up.bool(), history[key], 1.0 - history[key])
                mask = (consistency > self.params.threshold).to(torch.float32)
                new_history[key] = (history[key] * seen + up) / (seen + 1)
            move = move * mask
            if key in fold.params:
                distance += float(torch.linalg.vector_norm(move))
            masked[key] = (move, mask.to(torch.float64))
        beta = self.params.beta
        parts = {
            "past": float(heal["weight"].get(cid, 0.0)) + (1 - beta) * float(heal["increment"].get(cid, 0.0)),
            "first": 1.0 if cid not in heal["weight"] else 0.0,
            "distance": beta * distance,
        }
        for part, coef in parts.items():
            if coef:
                for key, (move, mask) in masked.items():
                    fold.moves[part][key].add_(move, alpha=coef)
                    fold.masses[part][key].add_(mask, alpha=coef)
        fold.distances[cid], fold.parts[cid], fold.histories[cid] = distance, parts, new_history

    def finalize(self, round_: int, fold: HealFold, state: ServerState) -> ServerState:
        if not fold.parts:
            raise AggregationError("fedheal: no client update to aggregate")
        total = sum(fold.distances.values())
        scale = {"past": 1.0, "first": 1.0 / len(fold.parts), "distance": 1.0 / total if total > 0 else 0.0}
        weights = {}
        for key, origin in fold.origin.items():
            move = sum(scale[p] * fold.moves[p][key] for p in PARTS)
            mass = sum(scale[p] * fold.masses[p][key] for p in PARTS)
            step = torch.where(mass > 0, move / torch.where(mass > 0, mass, 1.0), 0.0)
            weights[key] = (origin.to(torch.float64) + step).to(origin.dtype)
        heal = {name: dict(values) for name, values in state["heal"].items()}
        for cid, parts in fold.parts.items():
            increment = (1 - self.params.beta) * float(state["heal"]["increment"].get(cid, 0.0)) + parts["distance"] * scale["distance"]
            heal["weight"][cid] = float(state["heal"]["weight"].get(cid, scale["first"])) + increment
            heal["increment"][cid] = increment
            heal["seen"][cid] = int(state["heal"]["seen"].get(cid, 0)) + 1
            heal["history"][cid] = fold.histories[cid]
        return {**state, "weights": weights, "heal": heal}
