"""SiloBN (Andreux et al., MICCAI DART 2020): FedAvg including the BN affine parameters, while
each client (silo) keeps its BN running mean/var local."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from raysim.algorithms.base import Algorithm, register_algorithm
from raysim.algorithms.fedbn import norm_keys, own_image_batches, refit_norm_statistics
from raysim.types import Tensors

if TYPE_CHECKING:
    from raysim.client.client import Client


@register_algorithm("silobn")
class SiloBN(Algorithm):
    """Only the normalisation buffers stay home (num_batches_tracked, an integer, never travels)."""

    newcomer = "the global model (BatchNorm affine parameters included) with BatchNorm statistics computed on the site's own training images (label-free forward passes, no training), as SiloBN's local statistics are"

    def communicated(self, model: nn.Module) -> list[str]:
        local = norm_keys(model, params=False)
        return [k for k in super().communicated(model) if k not in local]

    def newcomer_model(self, client: Client, payload: Tensors) -> nn.Module:
        """Every learned parameter is global; only statistics are local, and a new site can compute its own."""
        return refit_norm_statistics(self.eval_model(client, payload), own_image_batches(client, self.cfg.federation.batch_size))
