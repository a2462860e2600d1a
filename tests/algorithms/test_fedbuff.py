"""FedBuff's and FedAsync's server steps on hand-built cases: stale deltas weighted by staleness,
buffers averaged (never a stale difference), FedAsync's mixing."""

from __future__ import annotations

import pytest
import torch

from raysim.algorithms import build
from raysim.types import Update

from helpers import load_config


def method(name: str, *overrides: str):  # type: ignore[no-untyped-def]
    return build(load_config(None, [f"algorithm.name={name}", "data.name=synthetic", "system.simulate=true", *overrides]))


def state() -> dict:
    """Version 0 and the current version 1: a trainable `w` and a running variance `var`."""
    v0 = {"w": torch.tensor([0.0, 0.0]), "var": torch.tensor([4.0])}
    v1 = {"w": torch.tensor([1.0, 1.0]), "var": torch.tensor([1.0])}
    return {"weights": v1, "stepped": ["w"], "version": 1, "history": {0: v0, 1: v1}}


def update(cid: str, w: list[float], var: float, base: int, staleness: int, n: int = 10) -> Update:
    return Update(cid, {"w": torch.tensor(w), "var": torch.tensor([var])}, n, {}, {"base_version": base, "staleness": staleness})


def test_fedbuff_steps_by_staleness_weighted_deltas_and_averages_the_buffers() -> None:
    fedbuff = method("fedbuff", "algorithm.server_lr=0.5")  # uniform weights, s(τ) = (1 + τ)^-0.5
    # a: fresh (on version 1), delta (+2, 0); b: stale by 1 (on version 0), delta (+1, +3), its var 0.5 would be 1 + (0.5 - 4) < 0 as a delta
    new = fedbuff.aggregate(2, [update("a", [3.0, 1.0], 2.0, 1, 0), update("b", [1.0, 3.0], 0.5, 0, 1)], state())
    s = 2**-0.5
    expected = torch.tensor([1.0 + 0.5 * (2.0 + s * 1.0) / 2, 1.0 + 0.5 * (0.0 + s * 3.0) / 2])
    assert torch.allclose(new["weights"]["w"], expected, atol=1e-6)
    assert new["weights"]["var"].item() == pytest.approx((2.0 + 0.5) / 2)  # the mean of what arrived, never negative
    assert new["version"] == 2 and set(new["history"]) == {0, 1, 2}
    assert fedbuff.keep_versions(new, set())["history"].keys() == {2}


def test_fedbuff_example_weights_without_staleness_average_like_fedavg() -> None:
    fedbuff = method("fedbuff", "algorithm.weighting=examples", "algorithm.staleness=none")
    new = fedbuff.aggregate(2, [update("a", [3.0, 1.0], 2.0, 1, 0, n=30), update("b", [1.0, 5.0], 6.0, 1, 0, n=10)], state())
    assert torch.allclose(new["weights"]["w"], torch.tensor([2.5, 2.0]), atol=1e-6)  # (30·x_a + 10·x_b) / 40
    assert new["weights"]["var"].item() == pytest.approx(3.0)


def test_fedasync_mixes_each_update_in_by_its_staleness() -> None:
    fedasync = method("fedasync", "algorithm.alpha=0.5", "algorithm.staleness=hinge", "algorithm.staleness_a=1", "algorithm.staleness_b=0")
    new = fedasync.aggregate(2, [update("b", [3.0, 5.0], 3.0, 0, 1)], state())  # α_t = 0.5 / (1 · (1 - 0) + 1) = 0.25
    assert torch.allclose(new["weights"]["w"], torch.tensor([0.75 * 1 + 0.25 * 3, 0.75 * 1 + 0.25 * 5]), atol=1e-6)
    assert new["weights"]["var"].item() == pytest.approx(0.75 * 1 + 0.25 * 3)
