"""Decoded shards cached on local disk, so a client decodes and resizes its images once.

Shards live in *packs*, one folder per source (its fingerprint, the settings that change pixels,
the image size): `$RAYSIM_CACHE/shards/<source>-<hash>/pack-*/` holds `images.npy` (every
shard of the pack, concatenated), `masks.npy` when a segmentation run wrote it, and
`index.json` (per shard key: its rows in the pack, the kept row numbers, what was dropped).
`load_shards` looks a whole actor's clients up at once and writes what it had to decode as one
new pack: 4 fsyncs however many clients missed, where a folder per shard cost 5 each (an actor
of 5,000 clients: 75,000 fsyncs). A hit is a slice of the pack's memory map, so loading costs
the index, not the pixels, and memory grows with the clients a round touches.

The key of a shard covers the source's fingerprint (its metadata files), the sample ids and
every setting that changes pixels; `data.cache=false` turns the cache off (e.g. while editing
images in place under unchanged metadata). A pack is written fsynced in a temporary folder
renamed into place, and checked when read against the sizes and shapes it recorded: a damaged
one (e.g. a zero-length `images.npy` after a crash) is set aside and its shards decoded again,
with a warning. Packs are never changed once written; two processes that miss the same shard
both write it, and either copy serves later loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from raysim import durable
from raysim.datasets.base import ClientSpec, DataError, DataSource, Shard

FORMAT_VERSION = 2  # 1: a folder per shard (raysim <= 0.7); its entries are no longer read
log = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where raysim caches data: $RAYSIM_CACHE, else ~/.cache/raysim."""
    return Path(os.environ.get("RAYSIM_CACHE", Path.home() / ".cache" / "raysim")).expanduser()


def shard_key(source: DataSource, spec: ClientSpec, split: str) -> str:
    digest = hashlib.sha256(f"{_source_digest(source)}\n{spec.id}\n".encode())
    digest.update("\n".join(map(str, spec.splits[split].sample_ids)).encode())
    return digest.hexdigest()[:24]


def source_folder(source: DataSource) -> Path:
    """The folder of `source`'s packs (one per fingerprint, pixel settings and image size)."""
    return cache_root() / "shards" / f"{source.name}-{_source_digest(source)[:16]}"


_SOURCE_DIGESTS: weakref.WeakKeyDictionary[DataSource, str] = weakref.WeakKeyDictionary()


def _source_digest(source: DataSource) -> str:
    """The sha256 of what every shard of `source` shares (its fingerprint, the settings that
    change pixels, the image size), computed once per source object: the fingerprint reads and
    hashes its metadata files (every CSV, or a MedMNIST npz's labels), which per shard cost an
    actor of 5,000 clients 15,000 reads. A run builds its source once, so a file changed between
    runs still changes the next run's keys."""
    digest = _SOURCE_DIGESTS.get(source)
    if digest is None:
        settings = asdict(source.cfg)
        for unrelated in ("val_fraction", "attribute", "keep_unknown", "partition", "num_clients", "alpha", "ratios"):
            settings.pop(unrelated, None)  # these choose rows (in the sample ids), not pixels
        shared = {"v": FORMAT_VERSION, "source": source.name, "fingerprint": source.fingerprint(), "settings": settings, "img_size": source.img_size}
        digest = _SOURCE_DIGESTS[source] = hashlib.sha256(json.dumps(shared, sort_keys=True, default=str).encode()).hexdigest()
    return digest


def load_cached(source: DataSource, spec: ClientSpec, split: str, *, masks: bool = False) -> Shard:
    """`source.load(spec, split)` through the cache: `load_shards` of one shard."""
    return load_shards(source, [(spec, split)], masks=masks)[0]


def load_shards(source: DataSource, wanted: Sequence[tuple[ClientSpec, str]], *, masks: bool = False) -> list[Shard]:
    """The shards `wanted` ((client, split) pairs), in order, through the on-disk cache when
    `data.cache` is on: hits are memory-mapped from their packs, misses decoded (`source.load`)
    and written together as one new pack.

    `masks`: each shard also carries `source.load_masks` of its kept rows (segmentation runs); a
    shard cached without them keeps its cached pixels and gets its masks computed, then cached.
    """
    if not source.cfg.cache:
        return [_decoded(source, spec, split, masks, None) for spec, split in wanted]
    folder = source_folder(source)
    found = _index(folder)
    keys = [shard_key(source, spec, split) for spec, split in wanted]
    usable = {key: entry for key, entry in found.items() if entry.masks is not None or not masks}
    missed = {key: pair for key, pair in zip(keys, wanted) if key not in usable}
    decoded = {key: _decoded(source, spec, split, masks, found.get(key)) for key, (spec, split) in missed.items()}
    if decoded:
        _write_pack(folder, decoded, [spec.splits[split].sample_ids for spec, split in missed.values()])
    return [decoded[key] if key in decoded else usable[key].shard(spec, split, masks) for key, (spec, split) in zip(keys, wanted)]


def _decoded(source: DataSource, spec: ClientSpec, split: str, masks: bool, cached: _Entry | None) -> Shard:
    """The shard decoded (or, for masks only, the cached one) with its masks when asked for."""
    shard = cached.shard(spec, split, False) if cached is not None else source.load(spec, split)
    if not masks:
        return shard
    expected = (len(shard.table), *shard.images.shape[-2:])
    computed = source.load_masks(spec, split, shard.table.sample_ids, shard.images.shape[-1])
    if computed.shape != expected:
        raise DataError(f"{spec.id}/{split}: masks of shape {computed.shape} for images {shard.images.shape} (expected {expected})")
    return replace(shard, masks=computed)


def cached_keys() -> list[str]:
    """The key of every readable cached shard, over all sources (a key twice: two packs hold it)."""
    shards = cache_root() / "shards"
    folders = sorted(p for p in shards.iterdir() if p.is_dir()) if shards.is_dir() else []
    return [key for folder in folders for pack in sorted(folder.glob("pack-*")) for key in json.loads((pack / "index.json").read_text())["entries"]]


# --- reading packs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One shard in a pack: rows [start, start + n) of its arrays."""

    images: np.ndarray  # the pack's memory map
    masks: np.ndarray | None
    start: int
    kept: np.ndarray  # row numbers of the client's split table that survived the drop rules
    dropped: dict[str, int]

    def shard(self, spec: ClientSpec, split: str, with_masks: bool) -> Shard:
        rows = slice(self.start, self.start + len(self.kept))
        masks = self.masks[rows] if with_masks and self.masks is not None else None
        return Shard(self.images[rows], spec.splits[split].take(self.kept), dict(self.dropped), masks)


def _index(folder: Path) -> dict[str, _Entry]:
    """Every shard of every readable pack of a source folder, by key (packs with masks last, so
    they win); a damaged pack is set aside, with a warning."""
    entries: dict[str, _Entry] = {}
    if not folder.is_dir():
        return entries
    packs = sorted(p for p in folder.iterdir() if p.name.startswith("pack-"))
    opened = []
    for pack in packs:
        try:
            opened.append(_read_pack(pack))
        except (OSError, ValueError, EOFError, KeyError, TypeError, IndexError) as err:  # rebuilt by the loads that miss it
            log.warning("shard cache %s is damaged (%s: %s); decoding its shards again", pack, type(err).__name__, err)
            _discard(pack)
    for pack_entries in sorted(opened, key=lambda pack: any(e.masks is not None for e in pack.values())):
        entries.update(pack_entries)
    return entries


def _read_pack(pack: Path) -> dict[str, _Entry]:
    """A pack's entries, checked against what `_write_pack` recorded (file sizes, array shapes,
    row ranges) before any is used: a cut or emptied file raises here, not in a later round."""
    index = json.loads((pack / "index.json").read_text())
    for name, size in index["bytes"].items():
        if (pack / name).stat().st_size != size:
            raise ValueError(f"{name} has {(pack / name).stat().st_size} bytes, not {size}")
    images = np.load(pack / "images.npy", mmap_mode="r")
    masks = np.load(pack / "masks.npy", mmap_mode="r") if "masks.npy" in index["bytes"] else None
    if list(images.shape) != index["shape"] or (masks is not None and masks.shape != (images.shape[0], *images.shape[-2:])):
        raise ValueError(f"images of shape {images.shape}, masks of shape {None if masks is None else masks.shape}, recorded {index['shape']}")
    out = {}
    for key, (start, kept, dropped) in index["entries"].items():
        kept = np.asarray(kept, dtype=np.int64)
        if start < 0 or start + len(kept) > images.shape[0]:
            raise ValueError(f"shard {key} at rows {start}..{start + len(kept)} of {images.shape[0]}")
        out[key] = _Entry(images, masks, start, kept, dropped)
    return out


def _discard(folder: Path) -> None:
    """Remove a pack: renamed away first (atomic), so no loader sees half of it."""
    aside = folder.with_name(f".{folder.name}-bad-{os.getpid()}")
    try:
        folder.rename(aside)
    except OSError:
        return  # another loader moved it first
    shutil.rmtree(aside, ignore_errors=True)


# --- writing a pack ------------------------------------------------------------------------------


def _write_pack(folder: Path, shards: dict[str, Shard], all_ids: list[np.ndarray]) -> None:
    """The shards as one pack, in a temporary folder with every file fsynced and its size
    recorded, then renamed into place (and the folder fsynced): a crash leaves no pack or a whole
    one. `all_ids`: each shard's split table before the drop rules, for its kept row numbers.
    A cache that cannot be written (a full or read-only disk) costs speed, not the run."""
    entries, start = {}, 0
    for (key, shard), ids in zip(shards.items(), all_ids, strict=True):
        position = {sid: i for i, sid in enumerate(ids)}
        entries[key] = [start, [position[s] for s in shard.table.sample_ids], dict(shard.dropped)]
        start += len(shard.table)
    with_masks = all(s.masks is not None for s in shards.values())
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".pack-", dir=folder))
        images = np.concatenate([s.images for s in shards.values()])
        sizes = {"images.npy": _save(tmp / "images.npy", images)}
        if with_masks:
            sizes["masks.npy"] = _save(tmp / "masks.npy", np.concatenate([s.masks for s in shards.values()]))  # type: ignore[misc]
        index = json.dumps({"bytes": sizes, "shape": list(images.shape), "entries": entries})
        with open(tmp / "index.json", "w") as f:
            f.write(index)
            f.flush()
            os.fsync(f.fileno())
        durable.fsync_dir(tmp)
        tmp.rename(folder / f"pack-{tmp.name.removeprefix('.pack-')}")
        durable.fsync_dir(folder)
        tmp = None
    except OSError as err:
        log.warning("shard cache %s not written (%s: %s); the shards are decoded again next time", folder, type(err).__name__, err)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _save(path: Path, array: np.ndarray) -> int:
    """`np.save`, fsynced; the file's size."""
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array))
        f.flush()
        os.fsync(f.fileno())
        return f.tell()
