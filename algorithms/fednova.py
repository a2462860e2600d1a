"""FedNova (Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous FL", NeurIPS 2020)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from raysim.algorithms.aggregation import AggregationError
from raysim.algorithms.base import ServerState, register_algorithm
from raysim.algorithms.fedopt import ServerStep, apply_delta, update_sum
from raysim.types import Update


def fednova_coefficients(num_examples: Sequence[int], steps: Sequence[float]) -> list[float]:
    """c_k with θ ← θ + Σ_k c_k Δ_k: c_k = τ_eff p_k / τ_k, p_k = n_k/n, τ_eff = Σ_k p_k τ_k.

    Dividing by τ_k stops clients that took more steps from dragging the model towards their
    own optimum; τ_eff restores the step length (without it the step shrinks). A client that
    took no step sent Δ_k = 0 and gets c_k = 0.
    """
    total = float(sum(num_examples))
    p = [n / total for n in num_examples]
    tau_eff = sum(pk * tk for pk, tk in zip(p, steps))
    return [tau_eff * pk / tk if tk > 0 else 0.0 for pk, tk in zip(p, steps)]


@register_algorithm("fednova")
class FedNova(ServerStep):
    """Normalised averaging of the trainable parameters; τ_k = the client's local optimizer steps
    (`Update.metrics["steps"]`). Buffers (BatchNorm statistics) are averaged as FedAvg does."""

    def server_step(self, updates: list[Update], state: ServerState) -> tuple[dict[str, torch.Tensor], ServerState]:
        missing = [u.client_id for u in updates if "steps" not in u.metrics]
        if missing:
            raise AggregationError(f"fednova needs each client's local step count (metrics['steps']); missing from {missing}")
        coefs = fednova_coefficients([u.num_examples for u in updates], [float(u.metrics["steps"]) for u in updates])
        delta = update_sum([u.tensors for u in updates], coefs, state["weights"], state["stepped"])
        return apply_delta(state["weights"], delta), state
