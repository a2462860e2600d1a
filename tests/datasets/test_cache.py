"""The on-disk shard cache: decode once, memory-map afterwards, never serve stale pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raysim.config import DataConfig
from raysim.datasets.cache import cache_root, load_cached
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
    assert len(list((cache_root() / "shards").iterdir())) == 1


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
    assert len(list((cache_root() / "shards").iterdir())) == 3


def test_cache_off_always_decodes(oph_root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RAYSIM_CACHE", str(tmp_path / "cache"))
    src = source(oph_root, cache=False)
    spec = src.client_specs()[0]
    load_cached(src, spec, "val")
    assert not isinstance(load_cached(src, spec, "val").images, np.memmap)
    assert not (tmp_path / "cache" / "shards").exists()
