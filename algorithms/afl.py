"""AFL (Mohri, Sivek and Suresh, "Agnostic Federated Learning", ICML 2019): min over the model θ,
max over client mixture weights λ on the simplex Δ of L(θ, λ) = Σ_k λ_k L_k(θ), L_k the mean
loss of client k. Its Stochastic-AFL alternates a descent step on θ with a projected ascent step
on λ; raysim takes one of each per round:

- **Cohort and model step.** Under full participation (`federation.clients_per_round` null or ≥ the
  number of clients) every client trains from θ and the server sets θ ← Σ_k λ_k θ_k / Σ_k λ_k.
  Otherwise the round draws k clients from λ with replacement (seed derive_seed(seed, "sample",
  round), so the cohort depends on (seed, round, λ) only; sorted, each drawn client once) and
  weighs each by how often it was drawn, m_k: E[Σ_k m_k θ_k / k] = Σ_k λ_k θ_k, the paper's
  "sample a client by λ" with k draws.
- **Mixture step.** Each trained client reports L_k, the mean cross-entropy of the received θ on
  its train split (q-FFL's measurement, `Update.extra`). The server takes λ ← Π_Δ(λ + γ_λ g) on
  the whole simplex, with g the λ-gradient: g_k = L_k for every reporting client under full
  participation (the paper's exact step), and under sampling the importance-weighted estimate
  g_k = L_k·m_k / (k·λ_k) for the drawn clients (m_k draws of k; 0 for the others), whose
  expectation over the draws is L_k. Before 0.6.0 the step was projected onto the cohort's own
  previous total, which froze λ whenever the cohort held one distinct client (always at
  `clients_per_round=1`). λ starts uniform (1/K each).

Deviations from the paper, all documented here: local training replaces the single SGD step
per round; the λ-gradient comes from the trained cohort's own losses (importance-weighted by the draws)
instead of a second, uniformly drawn client (no extra cohort); a client that failed in a round
contributes 0 to that round's gradient; and the run
reports the last iterate, not the average of all iterates (the paper's output, for its convex
analysis). Nothing goes down besides θ; λ is server state (client id -> float).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from torch import nn

from raysim.algorithms.aggregation import AggregationError, WeightedSum
from raysim.algorithms.base import Algorithm, ServerState, register_algorithm
from raysim.algorithms.qffl import LOSS_KEY, loss_at
from raysim.client.client import Client
from raysim.config import ConfigError
from raysim.seeding import rng
from raysim.types import Update

LAMBDA_KEY = "afl_lambda"  # server state: client id -> λ_k


@dataclass
class AFLParams:
    """γ_λ = 0.01 is the `--learning_rate_lambda` of the AFL implementation the q-FFL authors compared
    against (litian96/fair_flearn, run.sh); a value from the AFL paper itself could not be checked."""

    lambda_lr: float = 0.01  # γ_λ > 0: step of the projected ascent on the mixture weights λ (fair_flearn's AFL script)

    def __post_init__(self) -> None:
        value = self.lambda_lr
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value) and value > 0):
            raise ValueError(f"algorithm.lambda_lr must be a finite number > 0, got {value!r}")


def project_to_simplex(values: Sequence[float], total: float = 1.0) -> np.ndarray:
    """The Euclidean projection of `values` onto {x ≥ 0, Σ x = total} (sort-based, Duchi et al. 2008)."""
    v = np.asarray(values, dtype=np.float64)
    if total <= 0:
        return np.zeros_like(v)
    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u) - total
    ranks = np.arange(1, len(v) + 1)
    rho = np.nonzero(u - cumulative / ranks > 0)[0][-1]
    return np.maximum(v - cumulative[rho] / (rho + 1), 0.0)


def ascent_step(lam: dict[str, float], gradient: dict[str, float], step: float) -> dict[str, float]:
    """λ ← Π_Δ(λ + γ g) onto the whole simplex (total Σ λ); clients absent from `gradient` have g_k = 0."""
    ids = sorted(lam)
    moved = project_to_simplex([lam[cid] + step * gradient.get(cid, 0.0) for cid in ids], sum(lam.values()))
    return {cid: float(x) for cid, x in zip(ids, moved)}


def lambda_gradient(lam: dict[str, float], losses: dict[str, float], draws: dict[str, float] | None) -> dict[str, float]:
    """The λ-gradient from the cohort's losses: L_k under full participation (`draws` None), else the
    importance-weighted L_k·m_k / (k·λ_k) with m_k the draw counts and k their sum."""
    if draws is None:
        return dict(losses)
    k = sum(draws.values())
    return {cid: loss * draws[cid] / (k * lam[cid]) for cid, loss in losses.items() if draws.get(cid, 0) > 0 and lam[cid] > 0}


def draw_cohort(seed: int, round_: int, clients: Sequence[str], lam: Sequence[float], k: int) -> Counter[str]:
    """How often each client is drawn: k draws from λ with replacement, seeded by (seed, "sample", round)."""
    p = np.asarray(lam, dtype=np.float64)
    draws = rng(seed, "sample", round_).choice(len(clients), size=k, replace=True, p=p / p.sum())
    return Counter(clients[i] for i in draws)


@dataclass
class AFLFold:
    weights: dict[str, float]  # client id -> its weight in the model average (λ_k, or its draw count)
    sampled: bool  # the cohort was drawn from λ (its weights are draw counts)
    mean: WeightedSum  # Σ w_k θ_k over the updates with w_k > 0
    losses: dict[str, float] = field(default_factory=dict)  # client id -> L_k at the received θ


@register_algorithm("afl")
class AFL(Algorithm):
    """λ lives in the server state (`afl_lambda`), one float per client id, set up before round 1."""
    tasks = ("classification",)  # its mixture step needs each client's classification loss (a per-pixel form is future work)

    Params = AFLParams

    def _check_system(self, system: Any) -> None:
        """AFL's fold re-draws its cohort from λ over every client: a clock that samples only the
        online clients, or more of them, would fold weights of a cohort that never trained."""
        super()._check_system(system)
        if system is not None and system.simulate and (system.availability != "always" or system.over_select > 0):
            key = f"system.availability={system.availability}" if system.availability != "always" else f"system.over_select={system.over_select}"
            raise ConfigError(f"algorithm afl draws its cohort from λ over every client, so it cannot run with {key}; use system.availability=always without over-selection (deadlines are fine)")

    # --- server side --------------------------------------------------------------------------

    def init_state(self, model: nn.Module) -> ServerState:
        return {**super().init_state(model), LAMBDA_KEY: {}}

    def setup_state(self, state: ServerState, shared: dict[str, dict[str, Any]]) -> ServerState:
        """λ_k = 1/K for every client of the run (the engine calls it with every client id)."""
        if not shared:
            raise ValueError("afl: setup_state needs the run's client ids (one client_setup result per client)")
        return {**state, LAMBDA_KEY: {cid: 1.0 / len(shared) for cid in sorted(shared)}}

    def mixture(self, state: ServerState) -> dict[str, float]:
        lam = cast(dict[str, float], state.get(LAMBDA_KEY) or {})
        if not lam:
            raise AggregationError("afl: the server state holds no mixture weights λ; setup_state sets them before round 1")
        return lam

    def sample_clients(self, round_: int, clients: list[str], k: int, state: ServerState) -> list[str]:
        """Everyone under full participation; else the distinct clients of k draws from λ (sorted)."""
        return sorted(self._draws(round_, clients, k, state) if k < len(clients) else clients)

    def _draws(self, round_: int, clients: Sequence[str], k: int, state: ServerState) -> Counter[str]:
        lam = self.mixture(state)
        if sorted(lam) != sorted(clients):
            raise AggregationError(f"afl: λ covers clients {sorted(lam)[:5]}, the run has {sorted(clients)[:5]}")
        ordered = sorted(clients)
        return draw_cohort(self.cfg.seed, round_, ordered, [lam[cid] for cid in ordered], k)

    def fold_start(self, round_: int, state: ServerState, statistics: dict[str, dict[str, Any]]) -> AFLFold:
        lam = self.mixture(state)
        k = self.cfg.federation.clients_per_round or len(lam)
        if k >= len(lam):
            return AFLFold(dict(lam), False, WeightedSum())
        return AFLFold({cid: float(m) for cid, m in self._draws(round_, list(lam), k, state).items()}, True, WeightedSum())

    def accumulate(self, fold: AFLFold, update: Update) -> None:
        cid = update.client_id
        if LOSS_KEY not in update.extra:
            raise AggregationError(f"afl needs each client's loss at the received model (extra[{LOSS_KEY!r}]); missing from {[cid]}")
        if cid not in fold.weights:
            raise AggregationError(f"client {cid}: not in this round's cohort (afl samples by λ)")
        fold.losses[cid] = float(cast(float, update.extra[LOSS_KEY]))
        if fold.weights[cid] > 0:  # λ_k = 0: its loss still counts for the λ step
            fold.mean.add(update.tensors, fold.weights[cid], cid)

    def finalize(self, round_: int, fold: AFLFold, state: ServerState) -> ServerState:
        weights = state["weights"] if not fold.mean.count else {**state["weights"], **fold.mean.mean()}
        lam = self.mixture(state)
        if fold.losses:
            lam = ascent_step(lam, lambda_gradient(lam, fold.losses, fold.weights if fold.sampled else None), self.params.lambda_lr)
        return {**state, "weights": weights, LAMBDA_KEY: lam}

    # --- client side --------------------------------------------------------------------------

    def before_training(self, client: Client, model: nn.Module) -> dict[str, object]:
        return {LOSS_KEY: loss_at(client, model)}  # L_k at the received θ, for the λ step
