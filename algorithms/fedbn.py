"""FedBN (Li et al., ICLR 2021): FedAvg of everything except the normalisation layers, which
(affine parameters and running statistics) stay with each client."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from raysim.algorithms.base import Algorithm, register_algorithm
from raysim.client.training import Batch, forward
from raysim.models.adapters import NORM_LAYERS  # every torch normalisation layer (re-exported)
from raysim.types import Tensors

if TYPE_CHECKING:
    from raysim.client.client import Client


def norm_keys(model: nn.Module, *, params: bool = True, buffers: bool = True) -> set[str]:
    """State-dict keys of the normalisation layers' own parameters and/or buffers."""
    keys: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, NORM_LAYERS):
            names = [n for n, _ in module.named_parameters(recurse=False)] if params else []
            names += [n for n, _ in module.named_buffers(recurse=False)] if buffers else []
            keys.update(f"{prefix}.{n}" if prefix else n for n in names)
    return keys


def refit_norm_statistics(model: nn.Module, batches: Iterable[Batch]) -> nn.Module:
    """Every BatchNorm's running mean / var re-estimated as the plain average over `batches`
    (AdaBN: forward passes with only the norm layers in training mode, no gradient, no label);
    learned parameters stay as they are. Layers whose statistics an adapter method froze
    (`frozen_stats`: pretrained statistics) are left alone. The model ends in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and not getattr(m, "frozen_stats", False)]
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # None: a cumulative average over every batch, whatever their number
        m.train()
    try:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    return model


def own_image_batches(client: Client, batch_size: int) -> Iterable[Batch]:
    """The client's training images in order, for `refit_norm_statistics` (a lone last image is
    left out: a norm layer in training mode needs two values per channel)."""
    n = client.num_train
    return (b for b in client.batches("train", batch_size=batch_size) if len(b.x) > 1 or n == 1)


@register_algorithm("fedbn")
class FedBN(Algorithm):
    """Normalisation layers are never sent, so the base client keeps them in its own state."""

    newcomer = (
        "the shared layers with the norm layers' affine parameters at their initial values (FedBN's server holds none) "
        "and BatchNorm statistics re-estimated on the site's own training images (label-free forward passes, no training)"
    )

    def communicated(self, model: nn.Module) -> list[str]:
        local = norm_keys(model)
        return [k for k in super().communicated(model) if k not in local]

    def newcomer_model(self, client: Client, payload: Tensors) -> nn.Module:
        """The payload over the initial model, its BatchNorm statistics those of the site's own
        images: a model trained with per-site statistics meets a new site's images with theirs,
        not with the initial 0 / 1. Nothing is kept: the site's state stays as it was."""
        return refit_norm_statistics(self.eval_model(client, payload), own_image_batches(client, self.cfg.federation.batch_size))
