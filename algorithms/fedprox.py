"""FedProx (Li et al., MLSys 2020): FedAvg whose local loss adds (μ/2)‖θ − θ_g‖²."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from raysim.algorithms.base import Algorithm, register_algorithm
from raysim.client.training import Batch
from raysim.types import Tensors, Update

if TYPE_CHECKING:
    from raysim.client.client import Client


def check_weight(name: str, value: object) -> None:
    """A proximal weight must be a finite number >= 0 (shared with Ditto)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def proximal_term(model: nn.Module, anchor: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """‖θ − anchor‖² over the trained parameters (those with requires_grad that `anchor` names)."""
    terms = [(p - anchor[name]).pow(2).sum() for name, p in model.named_parameters() if p.requires_grad and name in anchor]
    return torch.stack(terms).sum() if terms else torch.zeros(())


@dataclass
class FedProxParams:
    mu: float = 0.01  # weight μ of the proximal term; 0 is FedAvg (FL-MedSegBench uses 0.001)

    def __post_init__(self) -> None:
        check_weight("mu", self.mu)


@register_algorithm("fedprox")
class FedProx(Algorithm):
    """Local loss + (μ/2)‖θ − θ_g‖², θ_g the global weights this round started from."""

    Params = FedProxParams
    params: FedProxParams
    anchor: dict[str, torch.Tensor]  # θ_g of the client being trained (set in client_fit)

    def client_fit(self, client: Client, payload: Tensors, round_: int) -> Update:
        # The payload is never modified (load copies it), so it can serve as θ_g directly.
        self.anchor = {k: v.detach().to(client.device) for k, v in payload.items()}
        return super().client_fit(client, payload, round_)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return super().loss(model, batch) + self.params.mu / 2 * proximal_term(model, self.anchor)
