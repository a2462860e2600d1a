"""The foundation-model backends that answer in this process: `timm` (a classifier built from a
timm name and a local state dict) and `callable` (a user's function named "package.module:function").
Their options are listed in `raysim.models.foundation`; both register on import.
"""

from __future__ import annotations

import importlib
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.models import load_pretrained
from torch import nn

from raysim import console
from raysim.config import ConfigError, ModelConfig
from raysim.models.backbones import build_model, normalization
from raysim.models.foundation_base import FoundationModel, check_positive, register_foundation_model

log = logging.getLogger(__name__)


@register_foundation_model("timm")
@dataclass
class TimmModel(FoundationModel):
    model: str
    weights: str | None = None
    img_size: int | None = None
    batch_size: int = 64
    device: str | None = None

    def __post_init__(self) -> None:
        if not timm.is_model(self.model):
            raise ConfigError(f"{self.label}: model {self.model!r} is not a timm model (see timm.list_models())")
        if self.weights is not None and not Path(self.weights).expanduser().is_file():
            raise ConfigError(f"{self.label}: weights {self.weights} is not a file")
        if self.img_size is not None:
            check_positive(self.label, "img_size", self.img_size)
        check_positive(self.label, "batch_size", self.batch_size)
        # Built on first use: in_chans and num_classes come with the images.
        self._networks: dict[tuple[int, int], nn.Module] = {}

    @property
    def label(self) -> str:
        return f"foundation model 'timm' ({self.model})"

    def predict(self, images: np.ndarray, num_classes: int) -> np.ndarray:
        channels = images.shape[1]
        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        net = self._network(channels, num_classes).to(device).eval()
        mean, std = (t.to(device) for t in normalization(net, channels))
        out = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                console.report(f"asking {self.label}, images", start, len(images))
                x = torch.from_numpy(np.array(images[start : start + self.batch_size], dtype=np.float32)).to(device).div_(255.0)
                if self.img_size and tuple(x.shape[-2:]) != (self.img_size, self.img_size):
                    x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", antialias=True, align_corners=False)
                out.append(torch.softmax(net((x - mean) / std).double(), dim=1).cpu().numpy())
        console.report(f"asking {self.label}, images", len(images), len(images))
        return np.concatenate(out)

    def _network(self, channels: int, num_classes: int) -> nn.Module:
        key = (channels, num_classes)
        if key not in self._networks:
            net = build_model(ModelConfig(name=self.model, img_size=self.img_size or 64), num_classes=num_classes, in_chans=channels, seed=0)
            if self.weights is None:
                log.warning("%s has no weights: its predictions are random (fine for tests only)", self.label)
            else:
                self._load_weights(net, channels, num_classes)
            self._networks[key] = net
        return self._networks[key]

    def _load_weights(self, net: nn.Module, channels: int, num_classes: int) -> None:
        # Not build_model's weights path: that drops a head whenever K differs from the timm
        # default (1000), and a foundation model's head is the part that answers. Declaring
        # num_classes=K makes timm keep the head and load strictly; the stem is still adapted
        # to the image channels.
        path = Path(self.weights or "").expanduser()
        cfg = {**net.pretrained_cfg, "file": str(path), "num_classes": num_classes, "source": ""}
        try:
            load_pretrained(net, pretrained_cfg=cfg, num_classes=num_classes, in_chans=channels, strict=True)
        except (RuntimeError, OSError, ValueError, KeyError, pickle.UnpicklingError) as err:
            raise ConfigError(f"{self.label}: weights {path} do not fit {self.model} with num_classes={num_classes}, in_chans={channels}: {err}") from err


def resolve_target(target: str, label: str) -> Callable[..., Any]:
    """The object named by "package.module:attribute" (dots after the colon walk attributes)."""
    module_name, _, attribute = target.partition(":") if isinstance(target, str) else ("", "", "")
    if not module_name or not attribute:
        raise ConfigError(f"{label}: target {target!r} must look like 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{label}: cannot import module {module_name!r} of target {target!r} ({err})") from err
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{label}: target {target!r}: {module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{label}: target {target!r} is not callable ({type(obj).__name__})")
    return obj


@register_foundation_model("callable")
@dataclass
class CallableModel(FoundationModel):
    target: str

    def __post_init__(self) -> None:
        self._function = resolve_target(self.target, f"foundation model {self.name!r}")

    @property
    def label(self) -> str:
        return f"foundation model 'callable' ({self.target})"

    answers_maps = True  # on a segmentation run the function is asked for (N, K, H, W) maps

    def predict(self, images: np.ndarray, num_classes: int) -> Any:
        view = images.view()
        view.flags.writeable = False  # the function must not change the public set
        return self._function(view, num_classes)

    def predict_maps(self, images: np.ndarray, num_classes: int) -> Any:
        return self.predict(images, num_classes)  # the same call: a function configured for a segmentation run answers maps
