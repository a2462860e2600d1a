"""CKSP-style shared / preserved convolutions (specs/methods.md "CKSP"): each adapted layer computes
`y = W·x + (alpha/r)·B_k(A_k·x)` with a **shared** full-rank kernel W, trained by every client and
averaged as FedAvg does, and a **preserved** rank-r path (A_k, B_k) that belongs to client k. Every
normalisation layer (BatchNorm affine parameters and running statistics) is per client too, as
in FedBN (a ViT's LayerNorms likewise). What is personal never travels: the update and the
payload carry W and every other trained tensor (the unadapted convolutions, the head), never
A_k, B_k or a normalisation tensor; those stay in the client's own state between rounds
(`client.keep`) and score the client at evaluation. It is FairLoRA's "shared + private low-rank" split
applied per client instead of per group, with LoRA's initialisation.

Adapted layers (`targets`, default): the convolutions of every residual block (timm's
BasicBlock / Bottleneck `convN`; not the stem, not the downsampling paths); a network without
such convolutions (a ViT) gets the MLP layers LoRA adapts. A is Kaiming-uniform and B zero, so
each client starts from the shared model; A_k is the same draw for every client (the seed's).
The rank and scale default to FairFedMed's per-architecture values (ResNet r=32, alpha=8).

Not an adapter on a frozen backbone (`needs_pretrained` is False): W is shared *and* trained,
so the method runs from the configured initialisation like FedAvg and FedBN do; a pretrained
backbone (`model.pretrained`, `model.weights`) is used when given. The CKSP paper itself could
not be consulted for this implementation: the rules above are the spec's and its defaults are
the FairFedMed ones, not the paper's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from raysim.algorithms.base import Algorithm, register_algorithm
from raysim.algorithms.fedbn import norm_keys, own_image_batches, refit_norm_statistics
from raysim.client.client import Client
from raysim.config import ConfigError
from raysim.datasets.base import DataSource
from raysim.models import adapters
from raysim.types import Tensors

BLOCKS = ("BasicBlock", "Bottleneck")  # timm's residual blocks: their `convN` children are adapted by default


@dataclass
class CKSPParams:
    rank: int | None = None  # rank r of each client's preserved path; None: the architecture's default (ViT 12, ResNet 32; FairFedMed)
    alpha: float | None = None  # the preserved path is scaled by alpha / r; None: ViT 2, ResNet 8 (FairFedMed)
    targets: list[str] = field(default_factory=list)  # regexes over layer names; empty: the residual blocks' convolutions (else LoRA's defaults)

    def __post_init__(self) -> None:
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"algorithm.rank must be an integer >= 1 (or null for the architecture's default), got {self.rank!r}")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < float("inf")):
            raise ValueError(f"algorithm.alpha must be a finite number > 0 (or null for the architecture's default), got {self.alpha!r}")
        if not isinstance(self.targets, list):
            raise ValueError(f"algorithm.targets must be a list of regular expressions, got {self.targets!r}")
        for pattern in self.targets:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as err:
                raise ValueError(f"algorithm.targets: {pattern!r} is not a regular expression ({err})") from err


class PreservedConv(adapters.LoRA):
    """W (`base`, shared and trained) plus the client's rank-r path (`lora_A`, `lora_B`, never sent).
    A convolution, or a linear layer where the network has no block convolutions (a ViT's MLPs)."""


def block_convolutions(model: nn.Module) -> list[str]:
    """Names of the `convN` convolutions of every residual block (the stem and downsampling paths are not)."""
    return [
        f"{name}.{child}" if name else child
        for name, module in model.named_modules()
        if type(module).__name__ in BLOCKS
        for child, layer in module.named_children()
        if isinstance(layer, nn.Conv2d) and re.fullmatch(r"conv\d+", child)
    ]


def preserved_keys(model: nn.Module) -> set[str]:
    """State-dict keys of what stays with each client: the preserved paths and every normalisation layer."""
    keys = norm_keys(model)
    for name, module in model.named_modules():
        if isinstance(module, PreservedConv):
            keys.update(f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False))
    return keys


@register_algorithm("cksp")
class CKSP(Algorithm):
    Params = CKSPParams
    newcomer = (
        "the shared kernels W and head, preserved paths at their initial (zero-B) values, norm layers' affine parameters "
        "at their initial values and BatchNorm statistics re-estimated on the site's own training images, as FedBN's newcomer"
    )

    def adapt(self, model: nn.Module, source: DataSource) -> nn.Module:
        default_rank, default_alpha = adapters.default_rank(model)
        rank, alpha = self.params.rank or default_rank, self.params.alpha or default_alpha
        try:
            adapters.inject(model, self.target_layers(model), PreservedConv, rank=rank, alpha=alpha)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"algorithm cksp: {err}") from err
        return model

    def target_layers(self, model: nn.Module) -> list[str]:
        if self.params.targets:
            return adapters.matching_layers(model, self.params.targets)
        return block_convolutions(model) or adapters.default_targets(model)

    def newcomer_model(self, client: Client, payload: Tensors) -> nn.Module:
        """A site that never trained has no preserved path or norm layers of its own: the shared
        payload over the initial model, with BatchNorm statistics of the site's own images (0.5.0
        scored it with the initial 0 / 1 statistics)."""
        return refit_norm_statistics(self.eval_model(client, payload), own_image_batches(client, self.cfg.federation.batch_size))

    def communicated(self, model: nn.Module) -> list[str]:
        local = preserved_keys(model)
        return [k for k in super().communicated(model) if k not in local]
