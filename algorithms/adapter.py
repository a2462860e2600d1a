"""Bottleneck adapters (AdaptFormer, Chen et al., NeurIPS 2022) in a ViT image tower, averaged
by FedAvg: raysim's stand-in for FairFedMed's "ViT-Adapter" row, whose public code has no
adapter baseline to check against.

Each transformer block's MLP gets a parallel bottleneck (`raysim.models.adapters.ParallelAdapter`:
width → `bottleneck` → width with ReLU, scaled by `scale`; AdaptFormer's 64 and 0.1), everything
pretrained stays frozen. On a timm ViT the classifier head trains too; on a `clip:` ViT host the
classifier is CLIP's fixed text head (one prompt per class, computed once), so only the adapters
train and travel: 2 x 12 x (768·64 + 64 + 64·768 + 768) floats for ViT-B/16, about 4.7 MB.
Norm-layer affine parameters train with `train_norm` (off: AdaptFormer trains the adapters and
the head only). Hosts without transformer blocks (ResNets, CLIP RN50) are refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from raysim.algorithms.base import Algorithm, register_algorithm
from raysim.config import ConfigError
from raysim.datasets.base import DataSource
from raysim.models import adapters


@dataclass
class AdapterParams:
    bottleneck: int = 64  # AdaptFormer's bottleneck width
    scale: float = 0.1  # AdaptFormer's scaling of the adapter branch
    train_norm: bool = False  # also train the image tower's norm-layer affine parameters

    def __post_init__(self) -> None:
        if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck < 1:
            raise ValueError(f"algorithm.bottleneck must be an integer >= 1, got {self.bottleneck!r}")
        if not self.scale > 0:
            raise ValueError(f"algorithm.scale must be > 0, got {self.scale}")


@register_algorithm("adapter")
class Adapter(Algorithm):
    Params = AdapterParams
    params: AdapterParams
    needs_pretrained = True
    on_clip = True  # a clip: ViT host with CLIP's fixed text head
    tasks = ("classification",)

    def adapt(self, model: nn.Module, source: DataSource) -> nn.Module:
        names = adapters.transformer_mlps(model)
        if not names:
            raise ConfigError(f"algorithm adapter puts bottleneck adapters in transformer blocks; model.name={self.cfg.model.name} has none (use a ViT: a timm vit_* or clip:ViT-B-16)")
        adapters.inject(model, names, adapters.ParallelAdapter, bottleneck=self.params.bottleneck, scale=self.params.scale)
        adapters.freeze_backbone(model, train_norm=self.params.train_norm)
        return model
