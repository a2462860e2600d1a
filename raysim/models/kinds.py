"""What a model name makes, and what a joint model returns: light (no timm, no smp), so tasks,
run readers and checks can ask without building a model."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch


class JointOutput(NamedTuple):
    """What a joint model (`joint:<encoder>`, raysim.models.joint) returns: both tasks' logits."""

    masks: torch.Tensor  # (B, mask classes, H, W)
    grade: torch.Tensor  # (B, classes)


# `<decoder>:<timm encoder>` names (model.name; raysim.models.segmentation, raysim.models.joint) -> the task
# (raysim.client.tasks) such a model makes; any other name is a timm classifier.
DECODER_TASKS = {"unet": "segmentation", "joint": "joint"}
SEGMENTATION_DECODERS = tuple(DECODER_TASKS)


def is_clip_model(name: str) -> bool:
    """True for `clip:<open_clip architecture>` (raysim.models.clip): a classifier by text prompts."""
    return name.startswith("clip:")


def is_segmentation_model(name: str) -> bool:
    """True for a `<decoder>:<encoder>` name with a known decoder (`unet:resnet18`, `joint:resnet18`):
    a model that outputs masks."""
    decoder, colon, _ = name.partition(":")
    return bool(colon) and decoder in SEGMENTATION_DECODERS


def model_task(name: str) -> str:
    """The task (raysim.client.tasks) a model name makes: classification for a timm name."""
    decoder, colon, _ = name.partition(":")
    return DECODER_TASKS.get(decoder, "classification") if colon else "classification"
