"""Backbones from timm: any timm name, optional timm or local pretrained weights.

Segmentation models are named `<decoder>:<timm encoder>` (`model.name=unet:resnet18`): a
segmentation-models-pytorch decoder (`SEGMENTATION_DECODERS`) on the timm encoder through
smp's `tu-<name>` universal encoder; the name alone makes the run a segmentation run
(`raysim.client.tasks`). `joint:<encoder>` adds a grade head, and a second encoder for an OCT volume
stacked beside the fundus image (`raysim.models.joint`): a joint segmentation + grading run.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from torch import nn

from raysim.config import ConfigError, ModelConfig
from raysim.models.kinds import is_clip_model, is_segmentation_model, model_task
from raysim.seeding import derive_seed


class SliceFold(nn.Module):
    """Feeds a volume's slices to a 2D backbone: groups of `group` slices folded to 3 channels.

    As the FairFedMed reference: a learnable 5x5 convolution maps each group of 8 B-scans to
    3 channels, the backbone scores every group, and the logits are averaged over groups.
    Slices are zero-padded to a multiple of the group size.
    """

    def __init__(self, backbone: nn.Module, *, slices: int, group: int = 8) -> None:
        super().__init__()
        self.group = group
        self.groups = -(-slices // group)
        self.fold = nn.Conv2d(group, 3, kernel_size=5, padding=2)
        self.backbone = backbone
        self.pretrained_cfg = getattr(backbone, "pretrained_cfg", {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, slices, height, width = x.shape
        pad = self.groups * self.group - slices
        if pad:
            x = torch.cat([x, x.new_zeros(batch, pad, height, width)], dim=1)
        logits = self.backbone(self.fold(x.reshape(batch * self.groups, self.group, height, width)))
        return logits.reshape(batch, self.groups, -1).mean(dim=1)


def clip_class_names(cfg: ModelConfig, source_names: Sequence[str], num_classes: int) -> list[str]:
    """The names a CLIP host's prompts use: `model.class_names`, else the source's, else "class k"."""
    names = list(cfg.class_names or source_names) or [f"class {k}" for k in range(num_classes)]
    if len(names) != num_classes:
        key = "model.class_names" if cfg.class_names else f"model.name={cfg.name}"
        raise ConfigError(f"{key}: {len(names)} class names for {num_classes} classes")
    return names


def with_volume_front_end(model: nn.Module, slices: int | None, seed: int) -> nn.Module:
    """`model` itself for 2D data; for a volume, behind a SliceFold (its fold convolution drawn
    from the seed), as FairFedMed runs CLIP on OCT: every group of B-scans scored, scores averaged."""
    if not slices:
        return model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "slice-fold"))
        return SliceFold(model, slices=slices)


def build_model(
    cfg: ModelConfig,
    *,
    num_classes: int,
    in_chans: int,
    seed: int,
    slices: int | None = None,
    weights_key: str = "model.weights",
    mask_classes: int | None = None,
    class_names: Sequence[str] = (),
) -> nn.Module:
    """A timm model; initialisation depends only on `seed` (every actor builds the same one).

    With `slices` (a volume), the backbone takes 3 channels behind a SliceFold front end.
    `weights_key` names the config key of `cfg.weights` in errors. A segmentation name
    (`unet:<encoder>`) builds `build_segmentation_model`'s U-Net with `num_classes` mask classes;
    a joint name (`joint:<encoder>`) `build_joint_model`'s U-Net with `mask_classes` mask classes
    and a `num_classes` grade head (the last `slices` channels an OCT volume for its second encoder).
    A CLIP name (`clip:<open_clip architecture>`) builds `raysim.models.clip`'s classifier, one
    prompt per class of `class_names` (default: "class 0", "class 1", ...).
    """
    if is_clip_model(cfg.name):
        from raysim.models.clip import build_clip_classifier  # open_clip loads only here

        names = clip_class_names(cfg, class_names, num_classes)
        return with_volume_front_end(build_clip_classifier(cfg, class_names=names, in_chans=3 if slices else in_chans, seed=seed, weights_key=weights_key), slices, seed)
    if model_task(cfg.name) == "joint":
        from raysim.models.joint import build_joint_model  # segmentation-models-pytorch loads only here

        return build_joint_model(cfg, num_classes=num_classes, mask_classes=mask_classes or 0, in_chans=in_chans, slices=slices, seed=seed, weights_key=weights_key)
    if is_segmentation_model(cfg.name):
        from raysim.models.segmentation import build_segmentation_model

        return build_segmentation_model(cfg, num_classes=num_classes, in_chans=in_chans, seed=seed, weights_key=weights_key)
    if cfg.name not in timm.list_models() and not timm.is_model(cfg.name):
        raise ConfigError(f"model.name {cfg.name!r} is not a timm model (see timm.list_models())")
    kwargs: dict = {"num_classes": num_classes, "in_chans": 3 if slices else in_chans}
    if cfg.weights:
        path = Path(cfg.weights).expanduser()
        check_weights(weights_key, cfg, num_classes=num_classes, in_chans=kwargs["in_chans"])
        # timm adapts a local file's stem to in_chans and drops a head of the wrong size.
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    elif cfg.pretrained:
        kwargs["pretrained"] = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            backbone = timm.create_model(cfg.name, **kwargs)
            return SliceFold(backbone, slices=slices) if slices else backbone
        except (OSError, RuntimeError) as err:
            if cfg.pretrained and not cfg.weights:
                raise ConfigError(
                    f"model.pretrained=true: timm could not load weights for {cfg.name} ({err}); "
                    "raysim needs no network: pass model.weights=PATH to a local file"
                ) from err
            raise


def check_weights(key: str, cfg: ModelConfig, *, num_classes: int, in_chans: int) -> None:
    """A local weights file that does not fit `cfg.name` fails here, in one line naming the
    key, the file and the model.

    timm drops a head of another size and adapts the stem to `in_chans`, but it skips missing
    or unexpected tensors with only a log line (a resnet18 file "loads" into a resnet34). So
    the file is compared with the model first, tensor by tensor: every tensor but the head's
    must be there with the model's shape (the stem's input channels may differ).
    """
    if not cfg.weights:
        return
    path = Path(cfg.weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}={path} is not a file (weights for {cfg.name})")
    try:
        given = {k: tuple(v.shape) for k, v in timm.models.load_state_dict(str(path), weights_only=True).items()}
    except (RuntimeError, OSError, ValueError, KeyError, EOFError, AttributeError, pickle.UnpicklingError) as err:
        raise ConfigError(f"{key}={path} is not a weights file timm can read (for {cfg.name}): {' '.join(str(err).split())[:200]}") from err
    if cfg.name not in timm.list_models() and not timm.is_model(cfg.name):
        return  # build_model says so
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        fresh = timm.create_model(cfg.name, num_classes=num_classes, in_chans=in_chans)
    heads, stem = _head_and_stem(fresh)
    expected = {k: tuple(v.shape) for k, v in fresh.state_dict().items() if not k.startswith(heads)}
    given = {k: v for k, v in given.items() if not k.startswith(heads)}
    wrong = [(k, given[k], shape) for k, shape in expected.items() if k in given and not _same_shape(k, given[k], shape, stem)]
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    problems = [f"{len(wrong)} tensors of another shape (e.g. {k}: {f} in the file, {m} in the model)" for k, f, m in wrong[:1]]
    problems += [f"{len(missing)} of its tensors missing from the file (e.g. {missing[0]})"] if missing else []
    problems += [f"{len(unexpected)} tensors in the file it does not have (e.g. {unexpected[0]})"] if unexpected else []
    if problems:
        raise ConfigError(f"{key}={path} does not fit {cfg.name}: " + "; ".join(problems))


def _head_and_stem(model: nn.Module) -> tuple[tuple[str, ...], str]:
    """Key prefixes of the classifier head(s) and of the first convolution (timm's pretrained_cfg)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    heads = cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    return tuple(f"{h}." for h in heads), f"{cfg.get('first_conv') or ''}."


def _same_shape(key: str, given: tuple[int, ...], expected: tuple[int, ...], stem: str) -> bool:
    """Equal shapes; the stem's input-channel dimension may differ (timm adapts it)."""
    if key.startswith(stem) and len(given) == len(expected) == 4:
        return given[0] == expected[0] and given[2:] == expected[2:]
    return given == expected


def normalization(model: nn.Module, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/std the model expects, shaped (1, C, 1, 1), for pixel values in [0, 1]."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = torch.tensor(cfg.get("mean", (0.5, 0.5, 0.5)), dtype=torch.float32)
    std = torch.tensor(cfg.get("std", (0.25, 0.25, 0.25)), dtype=torch.float32)
    if channels != len(mean):  # e.g. grayscale into an RGB-normalised backbone
        mean, std = mean.mean().repeat(channels), std.mean().repeat(channels)
    return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)


def train_mode(model: nn.Module) -> nn.Module:
    """`model.train()`, except layers whose statistics are frozen (adapter methods' BatchNorm)."""
    model.train()
    for module in model.modules():
        if getattr(module, "frozen_stats", False):
            module.eval()
    return model


def exchangeable_keys(model: nn.Module) -> list[str]:
    """State-dict keys that can change in training: trainable parameters and the float
    buffers of layers that still track statistics (frozen BatchNorm's are constants)."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    live = {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        if not getattr(module, "frozen_stats", False)
        for name, b in module.named_buffers(recurse=False)
        if b.is_floating_point()
    }
    return [k for k in model.state_dict() if k in trainable or k in live]
