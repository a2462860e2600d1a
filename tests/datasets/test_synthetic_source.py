"""The registered `synthetic` source: generated on first use, cached, then read by the real loader."""

from __future__ import annotations

from pathlib import Path

import pytest

from raysim.config import DataConfig
from raysim.datasets import DATASETS, DataError


def make(**kw):
    return DATASETS.get("synthetic")(DataConfig(name="synthetic", patients=150, **kw), img_size=16, seed=0)


def test_generates_into_the_cache_once_and_reuses_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYSIM_CACHE", str(tmp_path / "cache"))
    source = make()
    specs = source.client_specs()
    root = source.root
    assert root.parent == tmp_path / "cache" and (root / "truth.json").exists()
    assert [s.id for s in specs] == ["site1", "site2", "site3"]
    stamp = (root / "truth.json").stat().st_mtime_ns
    again = make().client_specs()
    assert (root / "truth.json").stat().st_mtime_ns == stamp  # reused, not regenerated
    assert [list(s.splits["test"].sample_ids) for s in again] == [list(s.splits["test"].sample_ids) for s in specs]
    assert make(generator_seed=1).root != root  # another set, another cache entry
    shard = source.load(specs[0], "test")
    assert shard.images.shape[1:] == (1, 16, 16)


def test_explicit_root_is_generated_there_but_never_over_foreign_files(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    make(root=str(target)).client_specs()
    assert (target / "meta_site1_race_train.csv").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="holds files but no synthetic set"):
        make(root=str(foreign)).client_specs()
    assert (foreign / "notes.txt").read_text() == "keep me"
