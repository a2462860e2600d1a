"""Algorithms without Ray: aggregation by hand, FedAvg's client half on real data, registries."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from raysim.algorithms import ALGORITHMS, Algorithm, register_algorithm
from raysim.algorithms.aggregation import AggregationError, non_finite, weighted_average
from raysim.datasets import DATASETS
from raysim.engine.client_actor import ClientHost

from helpers import load_config, tiny_overrides


def test_weighted_average_matches_hand_computation() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(8)}
    out = weighted_average([a, b], [1, 3], ["a", "b"])
    # (1*[1,2] + 3*[3,6]) / 4 = [2.5, 5.0]; integer buffers: floor((1*4 + 3*8) / 4) = 7
    assert torch.equal(out["w"], torch.tensor([2.5, 5.0]))
    assert out["n"].item() == 7 and out["n"].dtype == torch.int64


@pytest.mark.parametrize(
    ("tensors", "weights", "needle"),
    [
        ([{"w": torch.ones(2)}, {"v": torch.ones(2)}], [1, 1], "client b: tensor names differ"),
        ([{"w": torch.ones(2)}, {"w": torch.ones(3)}], [1, 1], "client b: w has shape (3,), expected (2,)"),
        ([{"w": torch.ones(2)}, {"w": torch.ones(2)}], [1, 0], "client b: weight must be positive"),
        ([], [], "no client updates"),
    ],
)
def test_aggregation_rejects_bad_updates(tensors, weights, needle) -> None:
    with pytest.raises(AggregationError, match=re.escape(needle)):
        weighted_average(tensors, weights, ["a", "b"][: len(tensors)])


def test_non_finite_names_the_tensor() -> None:
    assert non_finite({"ok": torch.ones(2), "bad": torch.tensor([1.0, float("nan")])}) == ["bad"]
    assert non_finite({"inf": torch.tensor([1.0, float("inf")]), "both": torch.tensor([float("inf"), float("-inf")])}) == ["inf", "both"]
    # huge finite values whose float32 sum overflows are still finite (the fast check is confirmed)
    assert non_finite({"huge": torch.full((4,), 3e38)}) == []


def test_duplicate_registration_is_an_error() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_algorithm("fedavg")(type("Other", (Algorithm,), {}))
    assert "fedavg" in ALGORITHMS and "fairfedmed_oph" in DATASETS


def test_fedavg_client_fit_sends_trained_weights_only(oph_root: Path) -> None:
    cfg = load_config(None, tiny_overrides(oph_root, **{"resources.clients_per_actor": 2}))
    source = DATASETS.get("fairfedmed_oph")(cfg.data, img_size=16, seed=0)
    specs = source.client_specs()[:2]
    host = ClientHost(cfg, specs)  # the actor's body, run in-process
    algorithm = host.algorithm
    state = algorithm.init_state(host.clients["site1"].model)
    payload = algorithm.payload(state, 1)
    assert "bn1.num_batches_tracked" not in payload  # integer counters stay local
    update = host.fit("site1", payload, 1)
    assert update.tensors.keys() == payload.keys()
    assert update.num_examples == len(host.clients["site1"].shards["train"].table) > 0 and update.nbytes > 0 and update.metrics["steps"] > 0
    assert any(not torch.equal(update.tensors[k], payload[k]) for k in payload)
    # the second client in the same actor starts from the payload, not from site1's training
    host.clients["site2"].load(payload)
    loaded = host.clients["site2"].model.state_dict()
    assert all(torch.equal(loaded[k], payload[k]) for k in payload)
    again = host.fit("site1", payload, 1)
    assert all(torch.equal(again.tensors[k], update.tensors[k]) for k in payload)  # same seed, same round
    merged = algorithm.aggregate(1, [update, host.fit("site2", payload, 1)], state)
    assert merged["weights"].keys() == payload.keys()
