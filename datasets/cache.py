"""Decoded shards cached on local disk, so a client decodes and resizes its images once.

The first load of a (source, client, split, size) writes `images.npy` plus the kept rows
(and `masks.npy` for a segmentation run, whenever it first asks);
later loads, in this run or the next, memory-map the array instead of decoding again. The
key covers the source's fingerprint (its metadata files), the sample ids and every setting
that changes pixels; `data.cache=false` turns the cache off (e.g. while editing images in
place under unchanged metadata).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from raysim.datasets.base import ClientSpec, DataError, DataSource, Shard

FORMAT_VERSION = 1


def cache_root() -> Path:
    """Where raysim caches data: $RAYSIM_CACHE, else ~/.cache/raysim."""
    return Path(os.environ.get("RAYSIM_CACHE", Path.home() / ".cache" / "raysim")).expanduser()


def shard_key(source: DataSource, spec: ClientSpec, split: str) -> str:
    table = spec.splits[split]
    settings = asdict(source.cfg)
    for unrelated in ("val_fraction", "attribute", "keep_unknown", "partition", "num_clients", "alpha", "ratios"):
        settings.pop(unrelated, None)  # these choose rows (in the sample ids below), not pixels
    blob = json.dumps(
        {"v": FORMAT_VERSION, "source": source.name, "fingerprint": source.fingerprint(), "settings": settings, "img_size": source.img_size, "client": spec.id},
        sort_keys=True,
        default=str,
    ).encode()
    digest = hashlib.sha256(blob)
    digest.update("\n".join(map(str, table.sample_ids)).encode())
    return digest.hexdigest()[:24]


def load_cached(source: DataSource, spec: ClientSpec, split: str, *, masks: bool = False) -> Shard:
    """`source.load(spec, split)`, through the on-disk cache when `data.cache` is on.

    `masks`: the shard also carries `source.load_masks` of its kept rows (segmentation runs),
    cached as `masks.npy` beside the images; a folder a classification run wrote gets them on
    the first segmentation load.
    """
    shard, folder = _load_images(source, spec, split)
    if not masks:
        return shard
    return replace(shard, masks=_load_masks(source, spec, split, shard, folder))


def _load_images(source: DataSource, spec: ClientSpec, split: str) -> tuple[Shard, Path | None]:
    if not source.cfg.cache:
        return source.load(spec, split), None
    folder = cache_root() / "shards" / f"{source.name}-{spec.id}-{split}-{shard_key(source, spec, split)}"
    if (folder / "meta.json").exists():
        meta = json.loads((folder / "meta.json").read_text())
        kept = np.load(folder / "kept.npy")
        return Shard(np.load(folder / "images.npy", mmap_mode="r"), spec.splits[split].take(kept), meta["dropped"]), folder
    shard = source.load(spec, split)
    _write(folder, shard, spec.splits[split].sample_ids)
    return shard, folder


def _load_masks(source: DataSource, spec: ClientSpec, split: str, shard: Shard, folder: Path | None) -> np.ndarray:
    """The masks of the shard's rows, in its order (same drop rules: the kept ids are asked for)."""
    path = folder / "masks.npy" if folder is not None else None
    if path is not None and path.exists():
        masks = np.load(path, mmap_mode="r")
    else:
        masks = source.load_masks(spec, split, shard.table.sample_ids, shard.images.shape[-1])
        if path is not None and folder is not None and folder.is_dir():
            tmp = folder / f".masks-{os.getpid()}.npy.tmp"
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(masks))
            tmp.replace(path)  # atomic: a concurrent loader sees all of it or nothing
    expected = (len(shard.table), *shard.images.shape[-2:])
    if masks.shape != expected:
        raise DataError(f"{spec.id}/{split}: masks of shape {masks.shape} for images {shard.images.shape} (expected {expected})")
    return masks


def _write(folder: Path, shard: Shard, all_ids: np.ndarray) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        position = {sid: i for i, sid in enumerate(all_ids)}
        np.save(tmp / "kept.npy", np.asarray([position[s] for s in shard.table.sample_ids], dtype=np.int64))
        np.save(tmp / "images.npy", np.ascontiguousarray(shard.images))
        (tmp / "meta.json").write_text(json.dumps({"dropped": dict(shard.dropped)}))
        tmp.rename(folder)
    except OSError:
        if not (folder / "meta.json").exists():  # not another process winning the same race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
