"""FairFedMed-Oph (and `synthetic`) with `data.partition`: the 3 sites pooled and re-split into clients."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raysim.config import DataConfig
from raysim.datasets import DATASETS, DataError
from raysim.datasets.base import SampleTable
from raysim.datasets.cache import cached_keys, load_cached
from raysim.datasets.fairfedmed_oph import FairFedMedOph
from raysim.datasets.partition import split_pool

FEDHELP_RATIOS = [0.6, 0.2, 0.08, 0.06, 0.04, 0.02]


@pytest.fixture(scope="module")
def oph300(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic set big enough for FedHelp's six quantity-skew clients (treat as read-only)."""
    from raysim.datasets.synthetic import generate

    root = tmp_path_factory.mktemp("oph300")
    generate(root, patients=300, seed=3, fundus_size=16, oct_shape=(4, 8, 8))
    return root


def source(root: Path, seed: int = 0, **kw) -> FairFedMedOph:
    return FairFedMedOph(DataConfig(name="fairfedmed_oph", root=str(root), **kw), img_size=16, seed=seed)


def pooled_csv(root: Path, split: str) -> pd.DataFrame:
    return pd.concat([pd.read_csv(root / f"meta_site{k}_race_{split}.csv") for k in (1, 2, 3)], ignore_index=True)


def rows(spec, *splits: str) -> list[str]:
    return [str(s) for split in splits for s in spec.splits[split].sample_ids]


def test_quantity_pools_the_sites_and_follows_the_ratios(oph300: Path) -> None:
    specs = source(oph300, partition="quantity", ratios=FEDHELP_RATIOS).client_specs()
    assert [s.id for s in specs] == [f"client{k}" for k in range(1, 7)]
    train_csv, test_csv = pooled_csv(oph300, "train"), pooled_csv(oph300, "test")
    # train + val of the clients: disjoint, together exactly the pooled train rows, sized by the ratios
    owned = [rows(s, "train", "val") for s in specs]
    assert sum(map(len, owned)) == len({r for o in owned for r in o}) == len(train_csv)
    assert sorted(r for o in owned for r in o) == sorted(train_csv["filename"])
    for share, own in zip(FEDHELP_RATIOS, owned):
        assert abs(len(own) - share * len(train_csv)) <= 1
    # test rows: disjoint, covering the pooled test rows, IID (sizes differ by at most one)
    tested = [rows(s, "test") for s in specs]
    assert sorted(r for t in tested for r in t) == sorted(test_csv["filename"])
    assert max(map(len, tested)) - min(map(len, tested)) <= 1
    # every client has train, val and test rows, and labels/attributes travel with the rows
    labels = dict(zip(train_csv["filename"], train_csv["glaucoma"].map({"yes": 1, "no": 0})))
    race = dict(zip(train_csv["filename"], train_csv["race"].map({"asian": 0, "black": 1, "white": 2})))
    for spec in specs:
        assert min(len(spec.splits[s]) for s in ("train", "val", "test")) >= 1
        train = spec.splits["train"]
        assert list(train.labels) == [labels[f] for f in train.sample_ids]
        assert list(train.attributes["race"]) == [race[f] for f in train.sample_ids]


def test_split_is_the_shared_partition_of_the_site_ordered_pool(oph300: Path) -> None:
    src = source(oph300, seed=5, partition="dirichlet", num_clients=4, alpha=0.3)
    specs = src.client_specs()
    pool = SampleTable.concat([src._read_split(k, "train") for k in (1, 2, 3)])
    test_pool = SampleTable.concat([src._read_split(k, "test") for k in (1, 2, 3)])
    for spec, (train_index, test_index) in zip(specs, split_pool(pool.labels, len(test_pool), src.cfg, 5), strict=True):
        assert sorted(rows(spec, "train", "val")) == sorted(map(str, pool.sample_ids[train_index]))
        assert rows(spec, "test") == list(map(str, test_pool.sample_ids[test_index]))


def test_split_is_seeded(oph300: Path) -> None:
    def split(seed: int) -> list[list[str]]:
        return [rows(s, "train", "val", "test") for s in source(oph300, seed=seed, partition="quantity", ratios=FEDHELP_RATIOS).client_specs()]

    assert split(0) == split(0)
    assert split(0) != split(1)


def test_null_partition_keeps_the_three_sites(oph_root: Path) -> None:
    plain = source(oph_root).client_specs()
    ignored = source(oph_root, num_clients=6, ratios=FEDHELP_RATIOS).client_specs()  # no partition: sites
    assert [s.id for s in plain] == [s.id for s in ignored] == ["site1", "site2", "site3"]
    for a, b in zip(plain, ignored):
        for split in ("train", "val", "test"):
            assert list(a.splits[split].sample_ids) == list(b.splits[split].sample_ids)
        csv = pd.read_csv(oph_root / f"meta_{a.id}_race_test.csv")
        assert sorted(rows(a, "test")) == sorted(csv["filename"])


def test_synthetic_source_accepts_a_partition(oph300: Path) -> None:
    make = DATASETS.get("synthetic")
    specs = make(DataConfig(name="synthetic", root=str(oph300), partition="iid", num_clients=4), img_size=16, seed=0).client_specs()
    assert [s.id for s in specs] == ["client1", "client2", "client3", "client4"]
    sizes = [len(s.splits["train"]) + len(s.splits["val"]) for s in specs]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(pooled_csv(oph300, "train"))
    default = make(DataConfig(name="synthetic", root=str(oph300), partition="dirichlet"), img_size=16, seed=0).client_specs()
    assert [s.id for s in default] == ["client1", "client2", "client3"]  # dirichlet: 3 clients unless data.num_clients


def test_too_small_client_is_a_clear_data_error(oph_root: Path) -> None:
    n = sum(len(s.splits["train"]) + len(s.splits["val"]) for s in source(oph_root).client_specs())
    ratios = [1 - 1.2 / n, 1.2 / n]  # the second client gets exactly one training row
    with pytest.raises(DataError, match=r"client2 got 1 train and \d+ test rows .*data.partition=quantity.*raise its share \(data.ratios"):
        source(oph_root, partition="quantity", ratios=ratios).client_specs()
    with pytest.raises(DataError, match=r"cannot split the pooled \d+ train / \d+ test rows of the 3 sites into clients: .*use at most"):
        source(oph_root, partition="iid", num_clients=500).client_specs()


def test_cache_never_serves_another_partitions_shard(oph300: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RAYSIM_CACHE", str(tmp_path / "cache"))
    first, second = source(oph300, partition="quantity", ratios=FEDHELP_RATIOS), source(oph300, partition="iid", num_clients=6)
    for cached, src in ((False, first), (False, second), (True, first), (True, second)):  # same client id, other rows
        spec = src.client_specs()[0]
        shard = load_cached(src, spec, "train")
        direct = src.load(spec, "train")
        assert isinstance(shard.images, np.memmap) == cached
        assert list(shard.table.sample_ids) == list(direct.table.sample_ids)
        assert np.array_equal(shard.images, direct.images)
    assert len(cached_keys()) == 2
