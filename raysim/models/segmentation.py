"""Segmentation models: a segmentation-models-pytorch decoder on a timm encoder (`unet:<encoder>`).

segmentation-models-pytorch (maintained; any timm encoder through its `tu-<name>` universal
encoder) rather than a hand-written U-Net. Imported only when a segmentation model is built.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import segmentation_models_pytorch as smp
import timm
import torch
from torch import nn

from raysim.config import ConfigError, ModelConfig
from raysim.models.kinds import SEGMENTATION_DECODERS

DECODER_CHANNELS = (256, 128, 64, 32, 16)  # smp's U-Net defaults, deepest first; the last `depth` are used


def split_segmentation_name(name: str) -> tuple[str, str]:
    """`unet:resnet18` -> ("unet", "resnet18"); a ConfigError for an unknown decoder or encoder."""
    decoder, _, encoder = name.partition(":")
    if decoder not in SEGMENTATION_DECODERS:
        raise ConfigError(f"model.name {name!r}: unknown decoder {decoder!r} (choices: {', '.join(SEGMENTATION_DECODERS)})")
    if encoder not in timm.list_models() and not timm.is_model(encoder):
        raise ConfigError(f"model.name {name!r}: encoder {encoder!r} is not a timm model (see timm.list_models())")
    return decoder, encoder


def encoder_depth(img_size: int) -> int:
    """U-Net depth at `img_size`: 5 stages (smp's default) where the image allows, fewer below
    32 px; the image side must be a multiple of 2**depth (the skip connections' sizes)."""
    depth = max(1, min(5, img_size.bit_length() - 1))
    if img_size % 2**depth:
        raise ConfigError(f"model.img_size={img_size}: a U-Net of depth {depth} needs a multiple of {2**depth} pixels (e.g. {img_size - img_size % 2**depth or 2**depth})")
    return depth


def build_segmentation_model(cfg: ModelConfig, *, num_classes: int, in_chans: int, seed: int, weights_key: str = "model.weights") -> nn.Module:
    """A U-Net (segmentation-models-pytorch) on a timm encoder, seeded like `build_model`.

    No network: smp's encoder weights are never downloaded (`encoder_weights=None`); a local
    `model.weights` file holds a timm checkpoint of the encoder (a classifier's; its head is
    ignored), `model.pretrained` asks timm for the encoder's weights (cached locally). Depth
    follows `encoder_depth(img_size)`, decoder channels smp's defaults. The model carries the
    encoder's `pretrained_cfg` (its normalisation) and `get_classifier()` returns the
    segmentation head (FedPer's personal layer); `untrained_parts()` (decoder and head) stay
    trainable under adapter methods' frozen backbones.
    """
    _, encoder = split_segmentation_name(cfg.name)
    depth = encoder_depth(cfg.img_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = UNet(
                encoder_name=f"tu-{encoder}",
                encoder_weights="imagenet" if cfg.pretrained and not cfg.weights else None,
                encoder_depth=depth,
                decoder_channels=DECODER_CHANNELS[5 - depth :],
                in_channels=in_chans,
                classes=num_classes,
            )
        except (OSError, RuntimeError) as err:
            if cfg.pretrained and not cfg.weights:
                raise ConfigError(f"model.pretrained=true: no local weights for the encoder {encoder} ({' '.join(str(err).split())[:200]}); pass model.weights=PATH to a timm checkpoint") from err
            raise
    model.pretrained_cfg = dict(getattr(model.encoder.model, "pretrained_cfg", None) or {})
    if cfg.weights:
        load_encoder_weights(model.encoder, model.pretrained_cfg, cfg, weights_key)
    return model


def load_encoder_weights(encoder: nn.Module, pretrained_cfg: dict, cfg: ModelConfig, key: str) -> None:
    """A timm checkpoint of the encoder into a U-Net's (smp `tu-`) encoder: every encoder tensor
    must be in the file with its shape (the stem's input channels may differ: adapted as timm
    does; the file's classifier head and unused final layers are ignored)."""
    path = Path(cfg.weights or "").expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}={path} is not a file (encoder weights for {cfg.name})")
    try:
        given = timm.models.load_state_dict(str(path), weights_only=True)
    except (RuntimeError, OSError, ValueError, KeyError, EOFError, AttributeError, pickle.UnpicklingError) as err:
        raise ConfigError(f"{key}={path} is not a weights file timm can read (for {cfg.name}): {' '.join(str(err).split())[:200]}") from err
    target = encoder.model.state_dict()
    stem = f"{pretrained_cfg.get('first_conv') or ''}."
    for k, v in list(given.items()):  # the stem's input channels adapted as timm does (RGB <-> grayscale)
        if k.startswith(stem) and k in target and v.dim() == 4 and v.shape[0] == target[k].shape[0] and v.shape[2:] == target[k].shape[2:]:
            given[k] = timm.models.adapt_input_conv(target[k].shape[1], v)
    missing = [k for k in target if k not in given]
    wrong = [k for k in target if k in given and tuple(given[k].shape) != tuple(target[k].shape)]
    if missing or wrong:
        problem = f"{len(missing)} encoder tensors missing from the file (e.g. {missing[0]})" if missing else f"{len(wrong)} tensors of another shape (e.g. {wrong[0]})"
        raise ConfigError(f"{key}={path} does not fit the encoder of {cfg.name}: {problem}")
    encoder.model.load_state_dict({k: given[k] for k in target}, strict=True)


class UNet(smp.Unet):
    """smp's U-Net with the two hooks raysim's methods look for."""

    def get_classifier(self) -> nn.Module:
        """The segmentation head (a 3x3 convolution to the mask classes): FedPer's personal layer."""
        return self.segmentation_head

    def untrained_parts(self) -> tuple[nn.Module, ...]:
        """Never pretrained, so trained (with live BatchNorm statistics) under a frozen backbone."""
        return (self.decoder, self.segmentation_head)
