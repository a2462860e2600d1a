"""The on-disk shard cache: decode once, memory-map afterwards, never serve stale pixels."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raysim.config import DataConfig
from raysim.datasets.cache import cached_keys, load_cached, load_shards
from raysim.datasets.fairfedmed_oph import FairFedMedOph


def source(root: Path, **kw) -> FairFedMedOph:
    return FairFedMedOph(DataConfig(name="fairfedmed_oph", root=str(root), **kw), img_size=16, seed=0)


def test_second_load_is_memory_mapped_and_identical(oph_copy: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RAYSIM_CACHE", str(tmp_path / "cache"))
    src = source(oph_copy)
    spec = src.client_specs()[0]
    first = load_cached(src, spec, "train")
    assert not isinstance(first.images, np.memmap)
    second = load_cached(source(oph_copy), spec, "train")
    assert isinstance(second.images, np.memmap)
    assert np.array_equal(first.images, second.images)
    assert list(first.table.sample_ids) == list(second.table.sample_ids) and first.dropped == second.dropped
    assert len(cached_keys()) == 1


def test_changed_metadata_or_size_misses_the_cache(oph_copy: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RAYSIM_CACHE", str(tmp_path / "cache"))
    src = source(oph_copy)
    spec = src.client_specs()[0]
    load_cached(src, spec, "test")
    other_size = FairFedMedOph(src.cfg, img_size=8, seed=0)
    assert load_cached(other_size, spec, "test").images.shape[-1] == 8
    csv = oph_copy / "meta_site1_race_test.csv"
    frame = pd.read_csv(csv)
    frame.loc[0, "glaucoma"] = "no" if frame.loc[0, "glaucoma"] == "yes" else "yes"
    frame.to_csv(csv, index=False)
    changed = source(oph_copy)
    assert not isinstance(load_cached(changed, changed.client_specs()[0], "test").images, np.memmap)
    assert len(cached_keys()) == 3


def test_cache_off_always_decodes(oph_root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RAYSIM_CACHE", str(tmp_path / "cache"))
    src = source(oph_root, cache=False)
    spec = src.client_specs()[0]
    load_cached(src, spec, "val")
    assert not isinstance(load_cached(src, spec, "val").images, np.memmap)
    assert not (tmp_path / "cache" / "shards").exists()


def test_a_source_reads_its_metadata_for_the_cache_key_once_not_per_shard(oph_copy: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An actor of thousands of clients keys every shard by the source's fingerprint; computing it
    per shard re-read every metadata CSV 3 x clients times (issue 29)."""
    monkeypatch.setenv("RAYSIM_CACHE", str(tmp_path / "cache"))
    src = source(oph_copy)
    calls = []
    fingerprint = src.fingerprint
    monkeypatch.setattr(src, "fingerprint", lambda: calls.append(1) or fingerprint())
    for spec in src.client_specs():
        for split in spec.splits:
            load_cached(src, spec, split)
    assert len(calls) == 1
    assert len(set(cached_keys())) == 3 * len(src.client_specs())
    fresh = source(oph_copy)  # the same files: the same keys, every shard a hit
    assert all(isinstance(load_cached(fresh, spec, split).images, np.memmap) for spec in fresh.client_specs() for split in spec.splits)


def test_an_actors_misses_are_written_as_one_pack_and_its_hits_decode_nothing(oph_copy: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Issue 29: a folder per shard cost an actor of 5,000 clients 75,000 fsyncs; a pack costs 4
    however many shards it holds, and a hit is a slice of its memory map (no pixels read)."""
    monkeypatch.setenv("RAYSIM_CACHE", str(tmp_path / "cache"))
    src = source(oph_copy)
    wanted = [(spec, split) for spec in src.client_specs() for split in spec.splits]
    fsyncs = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(fd) or real_fsync(fd))
    first = load_shards(src, wanted)
    assert len(fsyncs) == 4 and len(wanted) == 9  # images, index, the pack's folder, the source's folder
    monkeypatch.setattr(FairFedMedOph, "load", lambda *_: pytest.fail("a cached shard was decoded again"))
    again = load_shards(source(oph_copy), wanted[::-1])
    for shard, cached in zip(first, again[::-1], strict=True):
        assert isinstance(cached.images, np.memmap) and np.array_equal(shard.images, cached.images)
        assert list(shard.table.sample_ids) == list(cached.table.sample_ids) and shard.dropped == cached.dropped
    assert len({id(s.images.base) for s in again}) == 1  # every shard a view of the one mapped pack


def test_a_cache_that_cannot_be_written_costs_speed_not_the_run(oph_copy: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    monkeypatch.setenv("RAYSIM_CACHE", str(tmp_path / "cache"))
    src = source(oph_copy)
    spec = src.client_specs()[0]
    shard = load_cached(src, spec, "train")
    assert np.array_equal(shard.images, src.load(spec, "train").images)
    assert "not written" in caplog.text
