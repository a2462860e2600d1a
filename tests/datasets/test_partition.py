"""Partitioners for sources without sites: seeded, disjoint, complete, never empty, bounded."""

from __future__ import annotations

import numpy as np
import pytest

from raysim.config import DataConfig
from raysim.datasets.partition import PARTITIONERS, partition

LABELS = np.repeat(np.arange(4), [50, 30, 15, 5])  # 100 samples, imbalanced classes
KWARGS = {"dirichlet": {"num_clients": 5, "alpha": 0.5}, "quantity": {"num_clients": 4, "ratios": [0.4, 0.3, 0.2, 0.1]}, "iid": {"num_clients": 5}}


def split(name: str, seed: int, labels: np.ndarray = LABELS, **kw: object) -> list[np.ndarray]:
    args = {"num_clients": None, "alpha": 0.5, "ratios": None, **KWARGS[name], **kw}
    return PARTITIONERS[name](labels, rng=np.random.default_rng(seed), **args)


def assert_valid(parts: list[np.ndarray], n: int) -> None:
    assert all(len(p) > 0 for p in parts)
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)  # sorted, no repeats
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))  # disjoint and complete


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_every_partitioner_is_seeded_disjoint_and_complete(name: str) -> None:
    a, b, other = split(name, 0), split(name, 0), split(name, 1)
    assert_valid(a, len(LABELS))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, other))


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_more_clients_than_samples_is_a_clear_error(name: str) -> None:
    extra = {"ratios": [1 / 6] * 6, "num_clients": 6} if name == "quantity" else {"num_clients": 6}
    with pytest.raises(ValueError, match="cannot split 5 samples into 6"):
        split(name, 0, LABELS[:5], **extra)


@pytest.mark.parametrize("seed", range(5))
def test_dirichlet_tiny_alpha_many_clients_terminates_without_empty_clients(seed: int) -> None:
    labels = np.repeat(np.arange(3), [40, 25, 15])
    parts = split("dirichlet", seed, labels, num_clients=60, alpha=0.01)
    assert len(parts) == 60
    assert_valid(parts, len(labels))
    # exactly as many clients as samples is still possible: one each
    parts = split("dirichlet", seed, labels, num_clients=len(labels), alpha=0.01)
    assert [len(p) for p in parts] == [1] * len(labels)


def test_dirichlet_small_alpha_skews_labels_large_alpha_does_not() -> None:
    labels = np.repeat(np.arange(2), 1000)

    def majority_share(alpha: float) -> float:
        parts = split("dirichlet", 0, labels, num_clients=4, alpha=alpha)
        return float(np.mean([np.bincount(labels[p], minlength=2).max() / len(p) for p in parts]))

    assert majority_share(0.05) > 0.8
    assert majority_share(1000.0) < 0.6


def test_quantity_sizes_follow_the_ratios() -> None:
    ratios = [0.6, 0.2, 0.08, 0.06, 0.04, 0.02]
    labels = np.zeros(1003, dtype=np.int64)
    parts = split("quantity", 0, labels, num_clients=6, ratios=ratios)
    assert_valid(parts, len(labels))
    for part, ratio in zip(parts, ratios):
        assert abs(len(part) - ratio * len(labels)) <= 1


def test_quantity_errors_name_what_to_change() -> None:
    with pytest.raises(ValueError, match="ratio 0.01 of client 1 gives it no sample out of 20"):
        split("quantity", 0, LABELS[:20], num_clients=3, ratios=[0.98, 0.01, 0.01])
    with pytest.raises(ValueError, match="num_clients=3 but ratios has 4 shares"):
        split("quantity", 0, num_clients=3)
    with pytest.raises(ValueError, match="needs ratios"):
        split("quantity", 0, ratios=None)
    with pytest.raises(ValueError, match="positive"):
        split("quantity", 0, num_clients=2, ratios=[1.5, -0.5])
    # num_clients=None means: as many clients as shares
    assert len(split("quantity", 0, num_clients=None)) == 4


def test_iid_sizes_differ_by_at_most_one() -> None:
    sizes = [len(p) for p in split("iid", 0, num_clients=7)]
    assert sum(sizes) == len(LABELS) and max(sizes) - min(sizes) <= 1


def test_partition_reads_the_config_and_defaults_to_dirichlet() -> None:
    cfg = DataConfig(name="medmnist", num_clients=4, alpha=0.3)
    default = partition(LABELS, cfg, np.random.default_rng(7))
    named = split("dirichlet", 7, num_clients=4, alpha=0.3)
    assert all(np.array_equal(x, y) for x, y in zip(default, named))
    quantity = partition(LABELS, DataConfig(name="medmnist", partition="quantity", num_clients=2, ratios=[0.7, 0.3]), np.random.default_rng(0))
    assert [len(p) for p in quantity] == [70, 30]
    with pytest.raises(ValueError, match="unknown partition 'shards'; choose one of: dirichlet, quantity, iid"):
        partition(LABELS, DataConfig(name="medmnist", partition="shards"), np.random.default_rng(0))
