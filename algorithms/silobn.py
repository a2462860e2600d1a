"""SiloBN (Andreux et al., MICCAI DART 2020): FedAvg including the BN affine parameters, while
each client (silo) keeps its BN running mean/var local."""

from __future__ import annotations

from torch import nn

from raysim.algorithms.base import Algorithm, register_algorithm
from raysim.algorithms.fedbn import norm_keys


@register_algorithm("silobn")
class SiloBN(Algorithm):
    """Only the normalisation buffers stay home (num_batches_tracked, an integer, never travels)."""

    def communicated(self, model: nn.Module) -> list[str]:
        local = norm_keys(model, params=False)
        return [k for k in super().communicated(model) if k not in local]
