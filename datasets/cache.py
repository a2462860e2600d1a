"""Decoded shards cached on local disk, so a client decodes and resizes its images once.

The first load of a (source, client, split, size) writes `images.npy` plus the kept rows
(and `masks.npy` for a segmentation run, whenever it first asks);
later loads, in this run or the next, memory-map the array instead of decoding again. The
key covers the source's fingerprint (its metadata files), the sample ids and every setting
that changes pixels; `data.cache=false` turns the cache off (e.g. while editing images in
place under unchanged metadata). An entry is written fsynced in a temporary folder renamed
into place, and checked on every read against the sizes and shape it recorded: a damaged one
(e.g. a zero-length `images.npy` after a crash) is decoded again, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from raysim import durable
from raysim.datasets.base import ClientSpec, DataError, DataSource, Shard

FORMAT_VERSION = 1
log = logging.getLogger(__name__)


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
    if folder.exists():
        try:
            return _read(folder, spec, split), folder
        except (OSError, ValueError, EOFError, KeyError, TypeError, IndexError) as err:  # a damaged entry: rebuilt below
            log.warning("shard cache %s is damaged (%s: %s); decoding the shard again", folder, type(err).__name__, err)
            _discard(folder)
    shard = source.load(spec, split)
    _write(folder, shard, spec.splits[split].sample_ids)
    return shard, folder


def _read(folder: Path, spec: ClientSpec, split: str) -> Shard:
    """A cached shard, checked against what `_write` recorded (sizes, shape, dtype) before it is
    used: a cut or emptied file raises here instead of in every later run's actor."""
    meta = json.loads((folder / "meta.json").read_text())
    for name, size in meta.get("bytes", {}).items():  # entries of raysim <= 0.5.0 have no sizes
        if (folder / name).stat().st_size != size:
            raise ValueError(f"{name} has {(folder / name).stat().st_size} bytes, not {size}")
    kept = np.load(folder / "kept.npy")
    images = np.load(folder / "images.npy", mmap_mode="r")
    if kept.ndim != 1 or images.shape[:1] != kept.shape or list(images.shape) != meta.get("shape", list(images.shape)):
        raise ValueError(f"images of shape {images.shape} for {kept.shape[0]} kept rows")
    return Shard(images, spec.splits[split].take(kept), meta["dropped"])


def _discard(folder: Path) -> None:
    """Remove a cache entry: renamed away first (atomic), so no loader sees half of it."""
    aside = folder.with_name(f".{folder.name}-bad-{os.getpid()}")
    try:
        folder.rename(aside)
    except OSError:
        return  # another loader moved it first
    shutil.rmtree(aside, ignore_errors=True)


def _load_masks(source: DataSource, spec: ClientSpec, split: str, shard: Shard, folder: Path | None) -> np.ndarray:
    """The masks of the shard's rows, in its order (same drop rules: the kept ids are asked for);
    a cached `masks.npy` that does not load or has the wrong shape is computed again."""
    path = folder / "masks.npy" if folder is not None else None
    expected = (len(shard.table), *shard.images.shape[-2:])
    if path is not None and path.exists():
        try:
            masks = np.load(path, mmap_mode="r")
            if masks.shape == expected:
                return masks
        except (OSError, ValueError, EOFError):
            pass
        log.warning("shard cache %s is damaged; computing the masks again", path)
    masks = source.load_masks(spec, split, shard.table.sample_ids, shard.images.shape[-1])
    if masks.shape != expected:
        raise DataError(f"{spec.id}/{split}: masks of shape {masks.shape} for images {shard.images.shape} (expected {expected})")
    if path is not None and folder is not None and folder.is_dir():
        tmp = folder / f".masks-{os.getpid()}.npy.tmp"
        _save(tmp, masks)
        durable.replace_durably(tmp, path)  # atomic: a concurrent loader sees all of it or nothing
    return masks


def _write(folder: Path, shard: Shard, all_ids: np.ndarray) -> None:
    """The entry in a temporary folder, every file fsynced with its size recorded, then renamed
    into place (and the parent fsynced): a crash leaves no entry or a whole one."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        position = {sid: i for i, sid in enumerate(all_ids)}
        sizes = {
            "kept.npy": _save(tmp / "kept.npy", np.asarray([position[s] for s in shard.table.sample_ids], dtype=np.int64)),
            "images.npy": _save(tmp / "images.npy", shard.images),
        }
        meta = json.dumps({"dropped": dict(shard.dropped), "bytes": sizes, "shape": list(shard.images.shape)})
        with open(tmp / "meta.json", "w") as f:
            f.write(meta)
            f.flush()
            os.fsync(f.fileno())
        durable.fsync_dir(tmp)
        tmp.rename(folder)
        durable.fsync_dir(folder.parent)
    except OSError:
        if not (folder / "meta.json").exists():  # not another process winning the same race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save(path: Path, array: np.ndarray) -> int:
    """`np.save`, fsynced; the file's size."""
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array))
        f.flush()
        os.fsync(f.fileno())
        return f.tell()
