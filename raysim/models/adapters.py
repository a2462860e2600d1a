"""LoRA and FairLoRA adapters, injected into a timm backbone by layer name.

Both wrap a frozen layer W0 (linear, or a convolution of any kernel size) and add a low-rank
path: `y = W0·x + (alpha/r)·(x·A)·B` (LoRA) or `y = W0·x + (alpha/r)·((x·A) ⊙ π(g)S)·B`
(FairLoRA: one row of singular values per group in S, mixed by the sample's group). For a
k×k convolution A is a k×k convolution to r channels with W0's stride and padding, and B a
1×1 convolution back. Rules, initialisation and defaults: specs/fairfedmed.md.

The group reaches every FairLoRA layer through `use_groups(model, codes)` before a forward
pass; unknown codes (-1) and unset groups mix the groups uniformly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

# Per-architecture defaults: block class name -> the child layers that carry an adapter.
# The stem, attention and downsampling paths are never adapted.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "Bottleneck": ("conv1", "conv3"),  # timm ResNet bottleneck blocks: the 1x1 convs
    "BasicBlock": ("conv1", "conv2"),  # timm ResNet basic blocks
    "Mlp": ("fc1", "fc2"),  # timm ViT MLPs
    "ResidualAttentionBlock": ("mlp.c_fc", "mlp.c_proj"),  # open_clip ViT blocks (clip: hosts): the MLP's two linears
}
# Per-architecture (rank, alpha) from the paper: ViT r=12, alpha=2; ResNet r=32, alpha=8.
DEFAULT_RANK = {"VisionTransformer": (12, 2.0), "ResNet": (32, 8.0), "ModifiedResNet": (32, 8.0)}  # open_clip's: the same classes' names / CLIP RN50
FALLBACK_RANK = (8, 8.0)


class LowRankAdapter(nn.Module):
    """W0 (frozen) plus a rank-r path; subclasses decide how the r channels are scaled."""

    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"adapter rank must be >= 1, got {rank}")
        self.base = base
        self.rank = rank
        self.scale = alpha / rank
        if isinstance(base, nn.Linear):
            self.lora_A = nn.Parameter(torch.empty(base.in_features, rank))
            self.lora_B = nn.Parameter(torch.empty(rank, base.out_features))
        elif isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise ValueError("adapters on grouped (e.g. depthwise) convolutions are not supported; exclude the layer from algorithm.targets")
            self.lora_A = nn.Parameter(torch.empty(rank, base.in_channels, *base.kernel_size))
            self.lora_B = nn.Parameter(torch.empty(base.out_channels, rank, 1, 1))
        else:
            raise TypeError(f"adapters wrap nn.Linear or nn.Conv2d, not {type(base).__name__}")

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """x·A: (..., r) for a linear layer, (B, r, H', W') for a convolution."""
        if isinstance(self.base, nn.Linear):
            return x @ self.lora_A
        conv = self.base
        return F.conv2d(x, self.lora_A, stride=conv.stride, padding=conv.padding, dilation=conv.dilation)

    def down_weight(self) -> torch.Tensor:
        """A as a view in torch's layer layout, (r, fan-in): Linear (r, in), Conv2d (r, in·k·k).

        Initialisers read the fan-in from dimension 1: on the stored (in, r) linear A it would
        be r, not in_features.
        """
        return self.lora_A.T if isinstance(self.base, nn.Linear) else self.lora_A.view(self.rank, -1)

    def up(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.lora_B if isinstance(self.base, nn.Linear) else F.conv2d(h, self.lora_B)

    def channel_scale(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.up(self.channel_scale(self.down(x)))


class LoRA(LowRankAdapter):
    """Plain LoRA: A random (Kaiming with a = √5 as in PEFT: bound 1/√fan-in), B zero, so
    training starts at W0."""

    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        super().__init__(base, rank, alpha)
        nn.init.kaiming_uniform_(self.down_weight(), a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)


class FairLoRA(LowRankAdapter):
    """Per-group singular values S (G x r) between shared A and B.

    `own_weight` is π's weight on the sample's own group (0.7 smooths as the reference code
    does, 1.0 is the paper's one-hot); the rest is spread evenly over the other groups.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, *, num_groups: int, own_weight: float = 0.7) -> None:
        validate_fair_rank(rank, num_groups)
        super().__init__(base, rank, alpha)
        if not 0.0 < own_weight <= 1.0:
            raise ValueError(f"FairLoRA own-group weight must be in (0, 1], got {own_weight}")
        self.num_groups = num_groups
        self.own_weight = own_weight
        self.lora_S = nn.Parameter(initial_singular_values(rank, num_groups))
        nn.init.zeros_(self.lora_A)
        nn.init.normal_(self.lora_B)
        self.codes: torch.Tensor | None = None  # set per batch by use_groups()

    def mixing(self, n: int, device: torch.device) -> torch.Tensor:
        """π(g) per sample, (n, G); the uniform mix for unknown or unset groups."""
        G = self.num_groups
        if self.codes is None:
            return torch.full((n, G), 1.0 / G, device=device)
        codes = self.codes.to(device)
        if n != len(codes):  # e.g. SliceFold scores several slice groups per volume
            codes = codes.repeat_interleave(n // len(codes))
        other = (1.0 - self.own_weight) / (G - 1) if G > 1 else 0.0
        pi = torch.full((n, G), other, device=device)
        known = codes >= 0
        pi[known] = pi[known].scatter(1, codes[known].view(-1, 1), self.own_weight if G > 1 else 1.0)
        pi[~known] = 1.0 / G
        return pi

    def channel_scale(self, h: torch.Tensor) -> torch.Tensor:
        s = self.mixing(h.shape[0], h.device).to(self.lora_S.dtype) @ self.lora_S  # (n, r)
        shape = (h.shape[0], self.rank, 1, 1) if h.dim() == 4 and isinstance(self.base, nn.Conv2d) else (h.shape[0],) + (1,) * (h.dim() - 2) + (self.rank,)
        return h * s.view(shape)


class ParallelAdapter(nn.Module):
    """AdaptFormer's AdaptMLP (Chen et al., NeurIPS 2022): a bottleneck beside a transformer
    block's MLP, `mlp(x) + scale · up(ReLU(down(x)))`, fed the MLP's own (normalised) input.
    Initialised as AdaptFormer's: down Kaiming-uniform (a = √5), up and both biases zero, so the
    adapted block starts as the pretrained one. Only the bottleneck trains (`untrained_parts`)."""

    def __init__(self, mlp: nn.Module, bottleneck: int, scale: float) -> None:
        super().__init__()
        width = next((m.in_features for m in mlp.modules() if isinstance(m, nn.Linear)), None)
        if width is None:
            raise ValueError(f"a parallel adapter needs an MLP with a linear layer, not {type(mlp).__name__}")
        self.mlp = mlp
        self.scale = scale
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def untrained_parts(self) -> tuple[nn.Module, ...]:
        return (self.down, self.up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + self.scale * self.up(F.relu(self.down(x)))


# Transformer blocks and the attribute holding their MLP: timm ViT `Block.mlp`, open_clip `ResidualAttentionBlock.mlp`.
MLP_BLOCKS = {"Block": "mlp", "ResidualAttentionBlock": "mlp"}


def transformer_mlps(model: nn.Module) -> list[str]:
    """Names of the MLPs of a model's transformer blocks (a CLIP host's image tower only: its
    text tower, when present, is `transformer`, outside `visual`)."""
    root = "visual" if isinstance(getattr(model, "visual", None), nn.Module) else ""
    scope = model.get_submodule(root) if root else model
    names = [f"{name}.{MLP_BLOCKS[type(m).__name__]}" if name else MLP_BLOCKS[type(m).__name__] for name, m in scope.named_modules() if type(m).__name__ in MLP_BLOCKS]
    return [f"{root}.{n}" if root else n for n in names]


def validate_fair_rank(rank: int, num_groups: int) -> None:
    if num_groups < 1:
        raise ValueError(f"FairLoRA needs at least one group, got {num_groups}")
    if rank % 2 or rank < 2 * num_groups:
        raise ValueError(f"FairLoRA rank must be even and >= 2 x groups ({2 * num_groups} for {num_groups} groups), got {rank}")


def initial_singular_values(rank: int, num_groups: int) -> torch.Tensor:
    """S[g] = concat(v, 0.2·roll(v, -g·((r/2)//G))), v = linspace(0.5, 0.1, r/2)."""
    half = rank // 2
    v = torch.linspace(0.5, 0.1, half)
    step = half // num_groups
    return torch.stack([torch.cat([v, 0.2 * torch.roll(v, -g * step)]) for g in range(num_groups)])


def use_groups(model: nn.Module, codes: torch.Tensor | None) -> None:
    """Tell every FairLoRA layer the group codes of the next batch (None: uniform mix)."""
    for module in fair_layers(model):
        module.codes = codes


def fair_layers(model: nn.Module) -> list[FairLoRA]:
    cached = model.__dict__.get("_fair_layers")
    if cached is None:
        cached = [m for m in model.modules() if isinstance(m, FairLoRA)]
        model.__dict__["_fair_layers"] = cached
    return cached


def default_targets(model: nn.Module) -> list[str]:
    """Names of the layers the architecture's defaults adapt (see DEFAULT_TARGETS)."""
    names = []
    for name, module in model.named_modules():
        for child in DEFAULT_TARGETS.get(type(module).__name__, ()):
            try:
                layer = module.get_submodule(child)
            except AttributeError:
                continue
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                names.append(f"{name}.{child}" if name else child)
    return names


def matching_layers(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Linear / Conv2d layers whose full name matches one of the regular expressions."""
    compiled = [re.compile(p) for p in patterns]
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and any(c.fullmatch(n) for c in compiled)]


def default_rank(model: nn.Module) -> tuple[int, float]:
    for module in model.modules():
        if type(module).__name__ in DEFAULT_RANK:
            return DEFAULT_RANK[type(module).__name__]
    return FALLBACK_RANK


def inject(model: nn.Module, names: Iterable[str], make: type[LowRankAdapter] | object, **kwargs: object) -> list[str]:
    """Replace each named layer by `make(layer, **kwargs)`; returns the names replaced."""
    replaced = []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(getattr(parent, child), **kwargs))  # type: ignore[operator]
        replaced.append(name)
    model.__dict__.pop("_fair_layers", None)
    if not replaced:
        raise ValueError("no layer matched the adapter targets; set algorithm.targets to regular expressions over the model's layer names")
    return replaced


# Every torch normalisation layer: _NormBase covers BatchNorm*/SyncBatchNorm/InstanceNorm*
# (timm's BatchNormAct2d subclasses BatchNorm2d); timm's LayerNorm2d/GroupNorm1 subclass these.
NORM_LAYERS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def freeze_backbone(model: nn.Module, *, train_norm: bool = True) -> None:
    """Train only adapters, the classifier head, a SliceFold front end, a model's
    `untrained_parts()` (a U-Net's decoder and segmentation head) and, with `train_norm`, the
    backbone's normalisation-layer affine parameters (BatchNorm, LayerNorm and GroupNorm alike;
    `algorithm.train_norm`).

    Every backbone BatchNorm keeps its running statistics (it stays in eval mode while training;
    see `raysim.models.train_mode`), so a frozen backbone's statistics never drift.
    """
    trainable: set[int] = set()
    # Parts a model declares never pretrained (a U-Net's decoder and head): trained whole, and
    # their BatchNorm layers keep tracking statistics.
    # (asked of every module: a CLIP prompt head may sit behind a SliceFold front end)
    fresh = {id(m) for owner in model.modules() for part in getattr(owner, "untrained_parts", tuple)() for m in part.modules()}
    for module in model.modules():
        if id(module) in fresh:
            trainable.update(id(p) for p in module.parameters(recurse=False))
        elif isinstance(module, LowRankAdapter):
            trainable.update(id(p) for n, p in module.named_parameters() if n.startswith("lora_"))
        elif isinstance(module, NORM_LAYERS):
            if train_norm:
                trainable.update(id(p) for p in module.parameters(recurse=False))
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.frozen_stats = True
        if hasattr(module, "get_classifier"):
            heads = module.get_classifier()  # a tuple for distilled ViTs and joint models
            trainable.update(id(p) for head in (heads if isinstance(heads, tuple) else (heads,)) for p in head.parameters())
        if hasattr(module, "fold"):  # SliceFold's front end is new, never pretrained
            trainable.update(id(p) for p in module.fold.parameters())
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
