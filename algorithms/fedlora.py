"""FedLoRA: a frozen pretrained backbone with LoRA adapters; adapters, head and the backbone's
normalisation-layer affine parameters (`train_norm`: BatchNorm, LayerNorm alike) are trained
and averaged as FedAvg does (each of A and B independently).

`ema` > 0 blends each new global with the previous one on FairLoRA's schedule (the same code),
so the two methods can be compared under one server step; 0 (the default) is FedAvg's rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from raysim.algorithms.aggregation import WeightedSum
from raysim.algorithms.base import Algorithm, ServerState, register_algorithm
from raysim.algorithms.prompt_head import PromptHeadParams, build_prompted_host, freeze_text_tower, prompted_host, without_local_prompts
from raysim.config import ConfigError
from raysim.datasets.base import DataSource
from raysim.models import adapters
from raysim.models.kinds import is_clip_model
from raysim.types import Tensors

# open_clip ModifiedResNet (CLIP RN50): the attention pool's linears get plain LoRA whatever
# the method's adapter (specs/fairfedmed.md), beside the bottlenecks' 1x1 convolutions.
ATTENTION_POOL_LINEARS = ("q_proj", "k_proj", "v_proj", "c_proj")


@dataclass
class LoRAParams(PromptHeadParams):
    rank: int | None = None  # adapter rank r; None: the architecture's default (ViT 12, ResNet 32)
    alpha: float | None = None  # the low-rank path is scaled by alpha / r; None: ViT 2, ResNet 8
    targets: list[str] = field(default_factory=list)  # regexes over layer names; empty: the architecture's defaults
    ema: float = 0.0  # server EMA: new global = (1-β_t)·average + β_t·previous, β_t = ema·(t−1)/T; 0 = FedAvg
    train_norm: bool = True  # the backbone's normalisation-layer affine parameters (BatchNorm, LayerNorm alike) train and travel
    # The CLIP prompt head, on a `clip:` host only (PromptHeadParams): FairFedMed's shipped
    # FairLoRA scripts (`scripts/fairfedlora_fairfedmed*.sh`: NCTX=4, NUM_PROMPT=2, OT=None
    # i.e. the mean similarity, EPS=0.1, TOP_PERCENT=0.8) for what OT settings they carry.
    n_ctx: int = 4
    ot: str = "mean"
    ot_eps: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"algorithm.rank must be >= 1, got {self.rank}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"algorithm.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"algorithm.ema must be in [0, 1), got {self.ema}")
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
    params: LoRAParams
    needs_pretrained = True
    on_clip = True  # FairFedMed's host: the CLIP prompt head, adapters on the image tower's MLPs

    def build_host(self, source: DataSource) -> nn.Module:
        if not is_clip_model(self.cfg.model.name):
            return super().build_host(source)
        self.task.check(source, self.cfg)
        return build_prompted_host(self, source, self.params)

    def communicated(self, model: nn.Module) -> list[str]:
        return without_local_prompts(super().communicated(model))

    def adapt(self, model: nn.Module, source: DataSource) -> nn.Module:
        rank, alpha = self.params.rank_alpha(model)
        self.inject(model, adapters.LoRA, rank=rank, alpha=alpha)
        return model

    def inject(self, model: nn.Module, make: type[adapters.LowRankAdapter], **kwargs: object) -> None:
        """Adapters on the target layers, everything else frozen; bad settings are config errors."""
        try:
            adapters.inject(model, self.target_layers(model), make, **kwargs)
            pool_linears = self.attention_pool_linears(model)
            if pool_linears:
                adapters.inject(model, pool_linears, adapters.LoRA, rank=kwargs["rank"], alpha=kwargs["alpha"])
        except (ValueError, TypeError) as err:
            raise ConfigError(f"algorithm {self.name}: {err}") from err
        adapters.freeze_backbone(model, train_norm=self.params.train_norm)
        freeze_text_tower(model)  # (a CLIP host's; nothing on other models)

    def target_layers(self, model: nn.Module) -> list[str]:
        if self.params.targets:
            return adapters.matching_layers(model, self.params.targets)
        visual = image_tower(model)
        if visual is not None:  # a CLIP host: the image tower's blocks only, the text tower is never adapted
            return [f"{visual}.{name}" for name in adapters.default_targets(model.get_submodule(visual))]
        return adapters.default_targets(model)

    def attention_pool_linears(self, model: nn.Module) -> list[str]:
        """CLIP RN50's attention-pool linears (plain LoRA), with the default targets on a CLIP host."""
        visual = image_tower(model)
        pool = getattr(model.get_submodule(visual), "attnpool", None) if visual is not None else None
        if self.params.targets or pool is None:
            return []
        return [f"{visual}.attnpool.{name}" for name in ATTENTION_POOL_LINEARS if isinstance(getattr(pool, name, None), nn.Linear)]

    def finalize(self, round_: int, fold: WeightedSum, state: ServerState) -> ServerState:
        # A round that trained a subset (`trained_keys`, e.g. DEeR's A or B) leaves the rest as it was.
        return {**state, "weights": {**state["weights"], **self.server_blend(round_, fold.mean(), state["weights"])}}

    def server_blend(self, round_: int, averaged: Tensors, previous: Tensors) -> dict[str, torch.Tensor]:
        """The round's average blended with the previous global by the EMA schedule."""
        return ema(averaged, previous, ema_beta(self.params.ema, round_, self.cfg.federation.rounds))


def image_tower(model: nn.Module) -> str | None:
    """The module name of a CLIP prompt host's image tower (`visual`, or `backbone.visual`
    behind a SliceFold); None for any other model."""
    host = prompted_host(model)
    if host is None:
        return None
    return next(name for name, m in model.named_modules() if m is host.visual)


def ema_beta(strength: float, round_: int, rounds: int) -> float:
    """β_t = strength·(t−1)/T for rounds t = 1..T (`algorithm.ema`; specs/fairfedmed.md).

    β_1 = 0: the reference code counts epochs from 0, so the first round takes the clients'
    average unblended. T is the configured number of rounds, so resuming or stopping early
    does not change the schedule.
    """
    if not 1 <= round_ <= rounds:
        raise ValueError(f"EMA schedule: round {round_} is outside 1..{rounds} (federation.rounds)")
    return strength * (round_ - 1) / rounds


def ema(new: Tensors, previous: Tensors, beta: float) -> dict[str, torch.Tensor]:
    """w = (1 - β)·new + β·previous for float tensors (integer buffers take the new value)."""
    if beta == 0:
        return dict(new)  # not even a float64 round trip: bit for bit the plain average
    return {k: ((1 - beta) * v.to(torch.float64) + beta * previous[k].to(torch.float64)).to(v.dtype) if v.is_floating_point() else v for k, v in new.items()}
