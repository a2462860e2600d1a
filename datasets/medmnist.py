"""MedMNIST v2/v3: 2D classification sets in one npz per set, split into synthetic clients.

Datasheet
- Files: ``{flag}.npz`` (28 px) or ``{flag}_{64|128|224}.npz`` (MedMNIST+), keys exactly
  ``train_images, train_labels, val_images, val_labels, test_images, test_labels``; images
  uint8 (N, H, W) gray or (N, H, W, 3) RGB, labels (N, 1) or (N,). ``data.flag`` names the
  file (``pneumoniamnist``, ``dermamnist_64``); null: the only MedMNIST-looking npz in
  ``data.root``.
- Examples: pneumoniamnist (binary, 1 channel, 4,708/524/624 train/val/test), dermamnist
  (7 classes, 3 channels, 7,007/1,003/2,005). num_classes (max label + 1, at least 2) and
  channels come from the file.
- Labels are class indices 0..K-1: a file in which fewer than half of 0..(largest label)
  occur (e.g. a stray 255) is a DataError rather than a model with that many outputs.
- Not supported (a DataError says so): multi-label chestmnist (labels (N, 14)), the 3D sets
  (images (N, D, D, D)). retinamnist is read as plain 5-class classification, not as the
  ordinal regression of its benchmark.
- Clients: no natural sites and no demographics (``group_names`` is empty; accuracy metrics
  only). The official train split is partitioned by ``data.partition`` (null: dirichlet;
  see ``partition.py``) over ``data.num_clients`` clients, seeded by ``(seed, "partition")``;
  each client's validation set is carved from its own train part (``data.val_fraction``,
  stratified, seeded per client), so the official val split is not used; the official test
  split is partitioned IID over the same clients, seeded. Sample ids: ``train_000123``.
- Licence: CC BY 4.0 (MedMNIST; source datasets keep their own licences); users download
  the npz files themselves (https://medmnist.com, zenodo). raysim never downloads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raysim.datasets.arrays import check_size, image_pixel_limit, npz_header, open_npz, read_npz_array
from raysim.datasets.base import SPLITS, ClientSpec, DataError, DataSource, SampleTable, Shard, carve_validation, path_problem, register_dataset
from raysim.datasets.imaging import resize_chw
from raysim.datasets.partition import partition
from raysim.seeding import rng

if TYPE_CHECKING:
    from raysim.config import DataConfig


KEYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))
FILE_PATTERN = re.compile(r"^[a-z0-9]+mnist(3d)?(_(64|128|224))?\.npz$")
IMAGE_CACHE_BYTES = 1 << 30  # per process; larger files (MedMNIST+ at 224 px) are read per client


@dataclass(frozen=True)
class _Meta:
    """What the driver and each actor need before any pixels: labels and image geometry."""

    labels: Mapping[str, np.ndarray]  # official split -> int64 labels
    channels: int
    num_classes: int


@register_dataset("medmnist")
class MedMNIST(DataSource):
    name = "medmnist"
    root_hint = "the directory holding the MedMNIST npz files"
    label_name = "label"
    default_attribute = None

    @property
    def group_names(self) -> Mapping[str, Mapping[int, str]]:
        return {}

    @property  # type: ignore[override]
    def num_classes(self) -> int:
        return self._meta.num_classes

    @property  # type: ignore[override]
    def channels(self) -> int:
        return self._meta.channels

    @cached_property
    def path(self) -> Path:
        """The npz file: ``data.root/{data.flag}.npz``, else the only MedMNIST-looking npz there."""
        root = self.root
        found = sorted(p.name for p in root.glob("*.npz"))
        if self.cfg.flag:
            flag = self.cfg.flag.removesuffix(".npz")
            if path_problem(flag) or "/" in flag or "\\" in flag:
                raise DataError(f"data.flag={self.cfg.flag!r}: expected the name of an npz file in data.root ({root}), e.g. pneumoniamnist or dermamnist_64, not a path")
            path = root / f"{flag}.npz"
            if not path.is_file():
                raise DataError(f"data.flag={self.cfg.flag!r}: {path} not found (npz files in {root}: {', '.join(found) or 'none'})")
            return path
        candidates = [name for name in found if FILE_PATTERN.match(name)]
        if len(candidates) != 1:
            what = "no MedMNIST npz file" if not candidates else f"{len(candidates)} MedMNIST npz files ({', '.join(candidates)})"
            raise DataError(f"{root}: {what}; set data.flag to one of them, e.g. pneumoniamnist or dermamnist_64 (npz files found: {', '.join(found) or 'none'})")
        return root / candidates[0]

    def client_specs(self) -> list[ClientSpec]:
        meta = self._meta
        train_labels, test_labels = meta.labels["train"], meta.labels["test"]
        try:
            train_parts = partition(train_labels, self.cfg, rng(self.seed, "partition"))
            test_parts = partition(test_labels, _iid(self.cfg, len(train_parts)), rng(self.seed, "partition", "test"))
        except ValueError as err:
            raise DataError(f"{self.path}: cannot split {len(train_labels)} train / {len(test_labels)} test samples into clients: {err}") from err
        width = len(str(len(train_parts) - 1))
        specs = []
        for k, (train_index, test_index) in enumerate(zip(train_parts, test_parts)):
            client_id = f"client{k:0{width}d}"
            if len(train_index) < 2:
                raise DataError(f"{client_id} got {len(train_index)} training sample(s) from the partition; it needs 2 (train and val): raise data.alpha or lower data.num_clients")
            train, val = carve_validation(_table("train", train_index, train_labels), self.cfg.val_fraction, rng(self.seed, "val", client_id))
            train, val = _at_least_one(train, val, rng(self.seed, "val", client_id, "min"))
            if len(train) == 0:
                raise DataError(f"{client_id}: data.val_fraction={self.cfg.val_fraction} leaves none of its {len(train_index)} training samples for training")
            test = _table("test", test_index, test_labels)
            specs.append(ClientSpec(client_id, {"train": train, "val": val, "test": test}, source_info={"path": str(self.path)}))
        return specs

    def load(self, spec: ClientSpec, split: str) -> Shard:
        table = spec.splits[split]
        official, rows = _rows(table.sample_ids)
        picked = self._split_images(official)[rows]
        resized = [resize_chw(image, self.img_size, self.channels) for image in picked]
        out = np.stack(resized) if resized else np.empty((0, self.channels, self.img_size, self.img_size), dtype=np.uint8)
        return Shard(out, table)

    def fingerprint(self) -> dict[str, Any]:
        meta = self._meta
        digest = hashlib.sha256()
        for split in SPLITS:
            digest.update(meta.labels[split].tobytes())
        sizes = {split: len(meta.labels[split]) for split in SPLITS}
        return {"name": self.name, "root": str(self.path.parent), "file": self.path.name, "bytes": self.path.stat().st_size, "sizes": sizes, "labels_sha256": digest.hexdigest()}

    # --- metadata ---------------------------------------------------------------------------

    @cached_property
    def _meta(self) -> _Meta:
        """Labels of every split and image shapes read from the npz headers (no pixels)."""
        with self._open() as data:
            missing = [key for key in KEYS if key not in data.files]
            if missing:
                raise DataError(f"{self.path}: missing keys {', '.join(missing)}; a MedMNIST npz has exactly {', '.join(KEYS)} (has: {', '.join(data.files)})")
            labels = {split: self._labels(data, split) for split in SPLITS}
        shapes = {split: self._image_header(split) for split in SPLITS}
        for split in SPLITS:
            if shapes[split][0] != len(labels[split]):
                raise DataError(f"{self.path}: {split}_images has {shapes[split][0]} images but {split}_labels has {len(labels[split])} labels")
        geometry = {shape[1:] for shape in shapes.values()}
        if len(geometry) != 1:
            raise DataError(f"{self.path}: image shapes differ between splits: {', '.join(f'{s} {shapes[s]}' for s in SPLITS)}")
        num_classes = max(2, max(int(v.max()) + 1 if len(v) else 0 for v in labels.values()))
        present = np.unique(np.concatenate(list(labels.values())))
        if num_classes > 2 and 2 * len(present) < num_classes:
            raise DataError(
                f"{self.path}: labels run up to {num_classes - 1}, but only {len(present)} distinct values occur ({', '.join(map(str, present[:10]))}"
                f"{', ...' if len(present) > 10 else ''}); MedMNIST labels are class indices 0..K-1, and most of 0..{num_classes - 1} never occur"
            )
        channels = 1 if len(shapes["train"]) == 3 else 3
        return _Meta(labels, channels, num_classes)

    def _labels(self, data: Any, split: str) -> np.ndarray:
        key = f"{split}_labels"
        labels = self._array(data, key)
        if labels.ndim == 2 and labels.shape[1] > 1:
            raise DataError(f"{self.path}: {key} has shape {labels.shape}: multi-label sets (chestmnist) are not supported; raysim reads single-label (N, 1) MedMNIST files")
        if labels.ndim not in (1, 2) or labels.dtype.kind not in "iu":
            raise DataError(f"{self.path}: {key} must be integer labels of shape (N, 1) or (N,), got {labels.dtype} {labels.shape}")
        labels = labels.reshape(-1).astype(np.int64)
        if len(labels) and labels.min() < 0:
            raise DataError(f"{self.path}: {key} has negative label {labels.min()}; expected class indices 0..K-1")
        return labels

    def _image_header(self, split: str) -> tuple[int, ...]:
        """Shape of ``{split}_images`` from its .npy header, checked to be 2D gray or RGB uint8 and
        each image within PIL's pixel limit (`datasets.arrays`: no pixels read)."""
        key = f"{split}_images"
        with self._open() as data:
            shape, dtype, payload = npz_header(data, key, self.path)
        if len(shape) == 4 and shape[3] != 3:
            raise DataError(f"{self.path}: {key} has shape {shape}: 3D MedMNIST sets (N, D, D, D) are not supported; raysim reads 2D images (N, H, W) or (N, H, W, 3)")
        if len(shape) not in (3, 4) or dtype != np.uint8:
            raise DataError(f"{self.path}: {key} must be uint8 images (N, H, W) or (N, H, W, 3), got {dtype} {shape}")
        check_size(f"{self.path}: {key}", shape, dtype, payload, max_values=image_pixel_limit(), per_item=True, corrupt=f"{self.path}: array {key!r}")
        return tuple(shape)

    # --- file access --------------------------------------------------------------------------

    def _split_images(self, official: str) -> np.ndarray:
        """All images of an official split. Kept in memory (up to IMAGE_CACHE_BYTES over the
        splits) because a process loads many clients from one file: decompressing the whole
        array per client made loading grow with clients x file size."""
        cache: dict[str, np.ndarray] = self.__dict__.setdefault("_image_cache", {})
        if official in cache:
            return cache[official]
        with self._open() as data:
            images = self._array(data, f"{official}_images")
        if sum(a.nbytes for a in cache.values()) + images.nbytes <= IMAGE_CACHE_BYTES:
            cache[official] = images
        return images

    def _open(self) -> Any:
        return open_npz(self.path, f"with keys {', '.join(KEYS)}")

    def _array(self, data: Any, key: str) -> np.ndarray:
        """One array, its header checked before it is read (images: PIL's pixel limit per image)."""
        if key not in data.files:
            raise DataError(f"{self.path}: missing key {key!r}; expected keys {', '.join(KEYS)} (has: {', '.join(data.files)})")
        images = key.endswith("_images")
        return read_npz_array(data, key, self.path, max_values=image_pixel_limit() if images else None, per_item=images)


def _iid(cfg: DataConfig, num_clients: int) -> DataConfig:
    """The data config with the IID partition over `num_clients` (used for the test split)."""
    return dataclasses.replace(cfg, partition="iid", num_clients=num_clients, ratios=None)


def _table(official: str, index: np.ndarray, labels: np.ndarray) -> SampleTable:
    ids = np.array([f"{official}_{i:06d}" for i in index], dtype=str)
    return SampleTable(ids, labels[index], {})


def _rows(sample_ids: np.ndarray) -> tuple[str, np.ndarray]:
    """``train_000123`` ids -> ("train", rows); every id of one table names one official split."""
    officials = {str(s).rsplit("_", 1)[0] for s in sample_ids}
    if len(officials) > 1:
        raise DataError(f"sample ids mix official splits {sorted(officials)}")
    official = officials.pop() if officials else "train"
    return official, np.array([int(str(s).rsplit("_", 1)[1]) for s in sample_ids], dtype=np.int64)


def _at_least_one(train: SampleTable, val: SampleTable, generator: np.random.Generator) -> tuple[SampleTable, SampleTable]:
    """A client too small for a stratified val sample still gets one of its train samples."""
    if len(val) or len(train) < 2:
        return train, val
    moved = int(generator.integers(len(train)))
    keep = np.delete(np.arange(len(train)), moved)
    merged = np.concatenate([val.sample_ids, train.sample_ids[[moved]]])
    order = np.argsort(merged)
    return train.take(keep), SampleTable(merged[order], np.concatenate([val.labels, train.labels[[moved]]])[order], {})
