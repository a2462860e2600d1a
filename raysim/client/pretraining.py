"""`python -m raysim.pretrain`: a backbone trained centrally on the synthetic public pool.

    python -m raysim.pretrain                                  # resnet18 at 64 px, into the cache
    python -m raysim.pretrain --model test_resnet --img-size 16 --out backbone.pth

Adapter methods (LoRA-style) adapt a pretrained backbone, and raysim needs no network: a run
of a method with `needs_pretrained = True` and neither `model.weights` nor `model.pretrained`
uses this command's checkpoint, built once per (model, image size, pool and training
settings) under `cache_root()/pretrained/` (`resolve_weights`, `ensure_pretrained`).

The pool is the synthetic generator's `population="public"`: its own patients (own seed
namespace, `public_*.npz` files), scanner styles and a majority-dominated group mix, and the
same disease mechanism; nothing in it belongs to a client. Training is plain, non-federated
Adam with cross-entropy, deterministic given the seed (fixed torch threads); the pool's own
test split gives the held-out AUC printed per epoch. The checkpoint is a timm state_dict with
3 input channels, trained on the grey pool repeated to 3 channels and normalised as a
1-channel run normalises: timm's stem adaptation (summing the 3 channels) then gives a
1-channel run exactly the trained function, and RGB / OCT-fold runs a usable start. timm
drops the 2-class head at load time (its size differs from the model's default), so a run
gets the backbone and a fresh head. A JSON sidecar (`<file>.json`) records the settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from raysim import console
from raysim.client.pretrain_files import ensure_built, public_pool_kwargs, torch_threads, write_checkpoint
from raysim.client.training import Batch, forward, make_optimizer, train_epochs
from raysim.config import ConfigError, ExperimentConfig, FederationConfig, ModelConfig
from raysim.console import Echo
from raysim.datasets import synthetic
from raysim.datasets.cache import cache_root
from raysim.datasets.imaging import resize_chw
from raysim.datasets.oph_schema import NUM_SITES, SPLITS
from raysim.models.backbones import build_model, is_segmentation_model, normalization
from raysim.models.kinds import is_clip_model
from raysim.seeding import derive_seed

FORMAT_VERSION = 1
IN_CHANS = 3  # see the module docstring
SMALL_IMAGE = 32  # at or below this size the default pool is small (tests, quick looks)


@dataclass(frozen=True)
class PretrainSettings:
    """Everything that decides the checkpoint (its cache key); None: the default for img_size."""

    model: str = "resnet18"
    img_size: int = 64
    patients: int | None = None  # public pool size (1500; 600 at <= 32 px)
    epochs: int | None = None  # 4; 6 at <= 32 px
    seed: int = 0  # pool draw, initialisation and data order
    lr: float = 1e-3
    batch_size: int = 32
    threads: int | None = None  # torch threads, fixed so the result does not depend on the machine (2; 1 at <= 32 px)

    def resolved(self) -> PretrainSettings:
        small = self.img_size <= SMALL_IMAGE
        return dataclasses.replace(
            self,
            patients=self.patients if self.patients is not None else (600 if small else 1500),
            epochs=self.epochs if self.epochs is not None else (6 if small else 4),
            threads=self.threads if self.threads is not None else (1 if small else 2),
        )

    def validate(self) -> None:
        for key in ("img_size", "patients", "epochs", "batch_size", "threads", "lr"):
            value = getattr(self, key)
            if value is not None and not 0 < value < math.inf:
                raise ConfigError(f"pretrain {key} must be a positive finite number, got {value}")
        if self.batch_size < 2:
            raise ConfigError(f"pretrain batch_size must be >= 2 (BatchNorm), got {self.batch_size}")
        try:
            synthetic.generator_params(**self.pool_kwargs())
        except ValueError as err:
            raise ConfigError(f"pretrain pool: {err}") from err

    def pool_kwargs(self) -> dict[str, Any]:
        """The synthetic generator's arguments for this pool (rendered at the training size)."""
        s = self.resolved()
        return public_pool_kwargs(img_size=s.img_size, patients=s.patients, seed=s.seed)

    def key_dict(self) -> dict[str, Any]:
        s = self.resolved()
        return {
            "format": FORMAT_VERSION,
            "model": s.model,
            "img_size": s.img_size,
            "in_chans": IN_CHANS,
            "pool": synthetic.generator_params(**s.pool_kwargs()),
            "training": {"epochs": s.epochs, "seed": s.seed, "lr": s.lr, "batch_size": s.batch_size, "threads": s.threads, "optimizer": "adam"},
        }

    def cache_path(self) -> Path:
        key = hashlib.sha256(json.dumps(self.key_dict(), sort_keys=True).encode()).hexdigest()[:12]
        return cache_root() / "pretrained" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', self.model)}-{self.img_size}px-{key}.pth"


# --- data ---------------------------------------------------------------------------------------


def load_pool(root: Path, img_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> (uint8 images (N, 1, S, S), int64 labels), from the pool's site CSVs."""
    out = {}
    for split in SPLITS:
        frame = pd.concat([pd.read_csv(root / f"meta_site{k}_race_{split}.csv", dtype=str, keep_default_na=False) for k in range(1, NUM_SITES + 1)])
        images, labels = [], []
        for filename, label in zip(frame["filename"], frame["glaucoma"]):
            with np.load(root / "all" / filename) as data:
                fundus = data["slo_fundus"]
            if fundus.size:
                images.append(resize_chw(fundus, img_size, 1))
                labels.append(int(label == "yes"))
        out[split] = (np.stack(images), np.asarray(labels, dtype=np.int64))
    return out


def _batches(images: np.ndarray, labels: np.ndarray, mean: torch.Tensor, std: torch.Tensor, *, batch_size: int, seed: int | None) -> Iterator[Batch]:
    n = len(labels)
    order = torch.arange(n) if seed is None else torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size]
        if seed is not None and len(index) < 2:
            continue  # a single-sample batch breaks BatchNorm in training mode
        x = (torch.from_numpy(images[index.numpy()]).float().div_(255.0) - mean) / std
        yield Batch(x.expand(-1, IN_CHANS, -1, -1), torch.from_numpy(labels[index.numpy()]), {}, index)


@torch.no_grad()
def _auc(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> float:
    model.eval()
    scores = torch.cat([torch.softmax(forward(model, b), dim=1)[:, 1] for b in _batches(images, labels, mean, std, batch_size=256, seed=None)])
    return float(roc_auc_score(labels, scores.numpy())) if len(np.unique(labels)) == 2 else float("nan")


# --- training ------------------------------------------------------------------------------------


def pretrain(settings: PretrainSettings, out: Path, *, echo: Echo = print) -> dict[str, Any]:
    """Train on the public pool (generated into the cache once) and write `out` + `out.json`.

    Both files are written beside their target and renamed, so a reader never sees half a file.
    Returns the sidecar's content.
    """
    settings.validate()
    s = settings.resolved()
    started = time.perf_counter()
    model = build_model(ModelConfig(name=s.model, img_size=s.img_size), num_classes=2, in_chans=IN_CHANS, seed=s.seed)
    kwargs = s.pool_kwargs()
    pool_root = synthetic.ensure_generated(synthetic.cached_root(**kwargs), **kwargs)
    data = load_pool(pool_root, s.img_size)
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    echo(f"pretrain: {s.model} at {s.img_size} px on the synthetic public pool: {len(y_train)} train / {len(y_test)} held-out images ({pool_root})")
    mean, std = normalization(model, 1)
    optimizer = make_optimizer(model, FederationConfig(optimizer="adam", lr=s.lr, weight_decay=0.0))
    history = []
    per_epoch = math.ceil(len(y_train) / s.batch_size)  # batches, for the progress bar
    phase, total = f"pretrain: {s.model} backbone, batches", s.epochs * per_epoch
    with torch_threads(s.threads):
        for epoch in range(1, s.epochs + 1):
            tick = time.perf_counter()
            order_seed = derive_seed(s.seed, "pretrain-order", epoch)
            batches = console.counted(_batches(x_train, y_train, mean, std, batch_size=s.batch_size, seed=order_seed), phase, total, start=(epoch - 1) * per_epoch)
            stats = train_epochs(model, [batches], optimizer)
            auc = _auc(model, x_test, y_test, mean, std)
            history.append({"epoch": epoch, "train_loss": round(stats["loss"], 6), "pool_auc": round(auc, 6)})
            echo(f"pretrain: epoch {epoch}/{s.epochs} | train loss {stats['loss']:.4f} | held-out pool AUC {100 * auc:.1f} | {time.perf_counter() - tick:.1f} s")
    console.report(phase, total, total)  # a skipped single-sample batch would leave the bar short
    meta = {
        "created_by": "raysim.pretrain",
        **s.key_dict(),
        "pool_root": str(pool_root),
        "pool_sizes": {"train": len(y_train), "test": len(y_test)},
        "history": history,
        "final": history[-1],
        "seconds": round(time.perf_counter() - started, 1),
        "versions": {"torch": torch.__version__, "timm": _timm_version()},
    }
    write_checkpoint(out, model, meta)
    return meta


def _timm_version() -> str:
    import timm

    return str(timm.__version__)


# --- what runs use -------------------------------------------------------------------------------


def ensure_pretrained(model_cfg: ModelConfig, *, echo: Echo = print, **settings: Any) -> Path:
    """The cached checkpoint for `model_cfg`'s model and image size, built once if missing.

    `settings` override `PretrainSettings` fields (patients, epochs, seed, lr, ...); every
    field is part of the cache key, so another setting is another file.
    """
    s = PretrainSettings(model=model_cfg.name, img_size=model_cfg.img_size, **settings)
    s.validate()
    path = s.cache_path()

    def build() -> None:
        echo(f"pretrain: no cached backbone for {s.model} at {s.img_size} px; building it once (python -m raysim.pretrain)")
        pretrain(s, path, echo=echo)

    return ensure_built(path, build)


def resolve_weights(cfg: ExperimentConfig, *, needs_pretrained: bool, echo: Echo = print) -> ExperimentConfig:
    """`cfg` with model.weights set to the pretrained backbone when the method needs one.

    For a timm model, only for a method that needs one (`needs_pretrained`: `raysim.algorithms.with_backbone` asks
    the method) and neither model.weights nor model.pretrained set; otherwise `cfg` itself is returned. A segmentation model
    (`unet:<encoder>`) gets the encoder's backbone (the U-Net loads it into its encoder). A
    CLIP host on the small CLIP's architecture (`clip:RaySim-Tiny-ViT`) gets `raysim.pretrain
    --clip`'s checkpoint whatever the method (FedAvg fine-tunes it), its pool checked disjoint from the run's data; any other `clip:`
    architecture stays a seeded random initialisation (raysim downloads no CLIP weights).
    """
    if cfg.model.weights or cfg.model.pretrained:
        return cfg
    if is_clip_model(cfg.model.name):  # any method: a CLIP host means a pretrained CLIP
        return _resolve_clip(cfg, echo)
    if not needs_pretrained:
        return cfg
    backbone = cfg.model
    if is_segmentation_model(backbone.name):  # a U-Net's encoder: the classifier of that name, its head unused
        backbone = dataclasses.replace(backbone, name=backbone.name.partition(":")[2])
    path = ensure_pretrained(backbone, echo=echo)
    echo(f"model.weights: {path} (the {backbone.name} backbone at {cfg.model.img_size} px that raysim.pretrain built on the synthetic public pool; "
         "set model.weights=PATH or model.pretrained=true to use your own)")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=str(path)))


def _resolve_clip(cfg: ExperimentConfig, echo: Echo) -> ExperimentConfig:
    from raysim.client import clip_pretraining  # open_clip loads only for a CLIP host

    if not clip_pretraining.is_tiny(cfg.model.name):
        return cfg
    path = clip_pretraining.ensure_clip_pretrained(cfg.model, echo=echo)
    clip_pretraining.check_clients(path, cfg)
    echo(f"model.weights: {path} (the small CLIP {cfg.model.name} at {cfg.model.img_size} px that raysim.pretrain --clip built on the synthetic public pool; "
         "set model.weights=PATH to use your own)")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=str(path)))
