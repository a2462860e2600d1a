"""FedNova (Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous FL", NeurIPS 2020)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from raysim.algorithms.aggregation import AggregationError
from raysim.algorithms.base import ServerState, register_algorithm
from raysim.algorithms.fedopt import ServerStep, StepFold, apply_delta
from raysim.types import Update

if TYPE_CHECKING:
    from raysim.config import FederationConfig
    from raysim.datasets.base import ClientSpec, DataSource


def solver_norm(steps: int, *, momentum: float = 0.0, lr: float = 0.0, mu: float = 0.0) -> float:
    """‖a‖₁ of τ = `steps` local SGD steps: the client's update is −lr Σ_j a_j g_j over its gradients g_j.

    Heavy-ball momentum ρ (PyTorch's SGD: v ← ρv + g, θ ← θ − lr v) gives
    a_j = (1 − ρ^j)/(1 − ρ), so ‖a‖₁ = Σ_{j=1}^{τ} (1 − ρ^j)/(1 − ρ) (Wang et al. 2020); ρ = 0 gives τ.
    A proximal term (μ/2)‖θ − θ_global‖² in the local loss (FedProx) contracts each earlier step
    by (1 − lr μ) per later step: without momentum a_j = (1 − lr μ)^(j−1), ‖a‖₁ = (1 − (1 − lr μ)^τ)/(lr μ)
    as the paper derives. With both, a is the impulse response of that linear recursion (exact, for
    the order PyTorch applies them: the proximal gradient is added before the momentum buffer).

    SGD's weight decay λ is the gradient of (λ/2)‖θ‖², the same term in every client's objective,
    so it belongs to g_j and leaves a unchanged (the reference implementation, JYWa/FedNova, does
    the same). Counting it as a contraction (1 − lr λ) instead would change ‖a‖₁ by a factor of
    about 1 − lr λ τ / 2: 6e-6 for 24 steps at lr 1e-3 and λ 5e-4.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    shrink = lr * mu
    velocity = position = norm = 0.0  # the response, in units of lr, to a unit gradient at the first step
    for step in range(steps):
        velocity = momentum * velocity - shrink * position + (1.0 if step == 0 else 0.0)
        position += velocity
        norm += abs(position)  # a_{τ−step}: the weight of the gradient taken `step` steps before the end
    return norm


def effective_steps(fed: FederationConfig, steps: float) -> float:
    """‖a_k‖₁ of a client that took `steps` optimizer steps under `fed`'s local optimizer.

    SGD: `solver_norm` with its momentum (weight decay leaves it unchanged; raysim's FedNova has
    no proximal term). Adam and AdamW rescale every coordinate by its own running statistics:
    the update is no linear combination of gradients, there is no such normalisation, and
    FedNova falls back to the step count τ_k.
    """
    if fed.optimizer != "sgd":
        return float(steps)
    return solver_norm(int(round(steps)), momentum=fed.momentum, lr=fed.lr)


def fednova_coefficients(num_examples: Sequence[int], norms: Sequence[float]) -> list[float]:
    """c_k with θ ← θ + Σ_k c_k Δ_k: c_k = τ_eff p_k / ‖a_k‖₁, p_k = n_k/n, τ_eff = Σ_k p_k ‖a_k‖₁.

    Dividing by ‖a_k‖₁ stops clients that took more (or longer, with momentum) steps from dragging
    the model towards their own optimum; τ_eff restores the step length (without it the step
    shrinks). A client that took no step sent Δ_k = 0 and gets c_k = 0. The server folds the same
    step as running sums: c_k = (T/N)/N · n_k/‖a_k‖₁ with N = Σ_k n_k, T = Σ_k n_k ‖a_k‖₁.
    """
    total = float(sum(num_examples))
    p = [n / total for n in num_examples]
    tau_eff = sum(pk * ak for pk, ak in zip(p, norms))
    return [tau_eff * pk / ak if ak > 0 else 0.0 for pk, ak in zip(p, norms)]


@register_algorithm("fednova")
class FedNova(ServerStep):
    """Normalised averaging of the trainable parameters by ‖a_k‖₁, computed from each client's local
    optimizer steps (`Update.metrics["steps"]`) and `federation` (optimizer, momentum, lr): see
    `effective_steps`. Buffers (BatchNorm statistics) are averaged as FedAvg does."""

    def prepare_run(self, source: DataSource, specs: list[ClientSpec], run_dir: Path, echo: Callable[[str], None]) -> dict[str, Any]:
        if self.cfg.federation.optimizer != "sgd":
            echo(f"fednova: federation.optimizer={self.cfg.federation.optimizer} has no FedNova normalisation (derived for SGD); client updates are normalised by their local step counts")
        return {}

    def accumulate_step(self, fold: StepFold, update: Update) -> None:
        """S += (n_k/‖a_k‖₁)(θ_k − θ), N += n_k, T += n_k ‖a_k‖₁; a client that took no step adds to N only."""
        if "steps" not in update.metrics:
            raise AggregationError(f"fednova needs each client's local step count (metrics['steps']); missing from {[update.client_id]}")
        norm = effective_steps(self.cfg.federation, update.metrics["steps"])
        examples = float(update.num_examples)
        if norm > 0:
            fold.add(update.tensors, examples / norm)
        fold.total("examples", examples)
        fold.total("steps", examples * norm)

    def finalize_step(self, fold: StepFold, state: ServerState) -> tuple[dict[str, torch.Tensor], ServerState]:
        """θ + δ with δ = Σ_k c_k Δ_k = τ_eff/N · S, τ_eff = T/N (`fednova_coefficients` in running form)."""
        examples = fold.totals["examples"]
        scale = fold.totals["steps"] / examples / examples
        return apply_delta(state["weights"], {k: acc * scale for k, acc in fold.sums.items()}), state
