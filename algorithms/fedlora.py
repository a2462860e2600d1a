"""FedLoRA: a frozen pretrained backbone with LoRA adapters; adapters, head and BatchNorm
affine parameters are trained and averaged as FedAvg does (each of A and B independently)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from raysim import adapters
from raysim.algorithms.base import Algorithm, register_algorithm
from raysim.config import ConfigError
from raysim.datasets.base import DataSource


@dataclass
class LoRAParams:
    rank: int | None = None  # adapter rank r; None: the architecture's default (ViT 12, ResNet 32)
    alpha: float | None = None  # the low-rank path is scaled by alpha / r; None: ViT 2, ResNet 8
    targets: list[str] = field(default_factory=list)  # regexes over layer names; empty: the architecture's defaults

    def __post_init__(self) -> None:
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"algorithm.rank must be >= 1, got {self.rank}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"algorithm.alpha must be > 0, got {self.alpha}")
        for pattern in self.targets:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"algorithm.targets: {pattern!r} is not a regular expression ({err})") from err

    def rank_alpha(self, model: nn.Module) -> tuple[int, float]:
        rank, alpha = adapters.default_rank(model)
        return (self.rank or rank, self.alpha or alpha)


@register_algorithm("fedlora")
class FedLoRA(Algorithm):
    Params = LoRAParams
    needs_pretrained = True

    def adapt(self, model: nn.Module, source: DataSource) -> nn.Module:
        rank, alpha = self.params.rank_alpha(model)
        self.inject(model, adapters.LoRA, rank=rank, alpha=alpha)
        return model

    def inject(self, model: nn.Module, make: type[adapters.LowRankAdapter], **kwargs: object) -> None:
        """Adapters on the target layers, everything else frozen; bad settings are config errors."""
        try:
            adapters.inject(model, self.target_layers(model), make, **kwargs)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"algorithm {self.name}: {err}") from err
        adapters.freeze_backbone(model)

    def target_layers(self, model: nn.Module) -> list[str]:
        return adapters.matching_layers(model, self.params.targets) if self.params.targets else adapters.default_targets(model)
