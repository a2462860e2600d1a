"""Decoded shards cached on local disk, so a client decodes and resizes its images once.

The first load of a (source, client, split, size) writes `images.npy` plus the kept rows;
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
from dataclasses import asdict
from pathlib import Path

import numpy as np

from raysim.datasets.base import ClientSpec, DataSource, Shard

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


def load_cached(source: DataSource, spec: ClientSpec, split: str) -> Shard:
    """`source.load(spec, split)`, through the on-disk cache when `data.cache` is on."""
    if not source.cfg.cache:
        return source.load(spec, split)
    folder = cache_root() / "shards" / f"{source.name}-{spec.id}-{split}-{shard_key(source, spec, split)}"
    if (folder / "meta.json").exists():
        meta = json.loads((folder / "meta.json").read_text())
        kept = np.load(folder / "kept.npy")
        return Shard(np.load(folder / "images.npy", mmap_mode="r"), spec.splits[split].take(kept), meta["dropped"])
    shard = source.load(spec, split)
    _write(folder, shard, spec.splits[split].sample_ids)
    return shard


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
