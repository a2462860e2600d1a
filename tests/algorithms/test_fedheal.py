"""FedHEAL's two rules on a hand-built case (a 2-input linear model, two clients, two rounds):
FPHL masks the elements whose update sign disagrees with the client's history; FAEL weights
clients by how far (masked) they moved, with momentum; the global moves by the weighted masked
mean. The expected values below are worked out by hand from the rules in algorithms/fedheal.py
(and FedHEAL's `federated_model.py`)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from raysim.algorithms import ALGORITHMS
from raysim.algorithms import params as algorithm_params
from raysim.config import ConfigError
from raysim.types import Update

from helpers import load_config

BETA = 0.4


def fedheal(*overrides: str):  # type: ignore[no-untyped-def]
    cfg = load_config(None, ["algorithm.name=fedheal", "data.name=synthetic", "federation.rounds=4", *overrides])
    return ALGORITHMS.get("fedheal")(algorithm_params(cfg), cfg)


def update(cid: str, weight: list[float], bias: float, n: int = 10) -> Update:
    return Update(cid, {"weight": torch.tensor([weight]), "bias": torch.tensor([bias])}, n)


def test_round_one_keeps_everything_and_weights_clients_by_their_distance() -> None:
    algorithm = fedheal()
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.zero_(), model.bias.zero_()
    state = algorithm.init_state(model)
    a, b = update("a", [1.0, -1.0], 2.0, n=10), update("b", [-1.0, -1.0], 0.0, n=990)  # example counts play no part
    new = algorithm.aggregate(1, [a, b], state)
    d_a, d_b = math.sqrt(2) + 2.0, math.sqrt(2)  # Σ over tensors of ‖θ − θ_k‖
    w_a, w_b = 0.5 + BETA * d_a / (d_a + d_b), 0.5 + BETA * d_b / (d_a + d_b)  # 1/K + β d_k / Σ d
    expected = (w_a * torch.tensor([1.0, -1.0, 2.0]) + w_b * torch.tensor([-1.0, -1.0, 0.0])) / (w_a + w_b)
    got = torch.cat([new["weights"]["weight"].flatten(), new["weights"]["bias"]])
    assert torch.allclose(got, expected, atol=1e-6)
    heal = new["heal"]
    assert heal["weight"]["a"] == pytest.approx(w_a) and heal["increment"]["b"] == pytest.approx(BETA * d_b / (d_a + d_b))
    assert torch.equal(heal["history"]["a"]["weight"], torch.tensor([[0.0, 1.0]]))  # [θ − θ_k ≥ 0]
    assert heal["seen"] == {"a": 1, "b": 1}


def test_round_two_discards_elements_against_their_history_and_carries_the_weights_momentum() -> None:
    algorithm = fedheal()
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.zero_(), model.bias.zero_()
    state = algorithm.aggregate(1, [update("a", [1.0, -1.0], 2.0), update("b", [-1.0, -1.0], 0.0)], algorithm.init_state(model))
    g_w, g_b = state["weights"]["weight"].flatten().double(), float(state["weights"]["bias"])
    # a's history: weight [0, 1], bias 0 (it rose, fell, rose); b's: [1, 1], 1.
    # round 2, a moves +0.5, +0.5 and bias +1: u = θ − θ_a < 0 everywhere, consistency = 1 − h = [1, 0], 1
    # b moves −0.2, +0.3 and bias 0: u = [+0.2, −0.3], 0 ≥ 0: consistency = [h, 1 − h] = [1, 0], bias h = 1
    # -> element weight[1] is discarded for both clients (and stays where it was).
    a = Update("a", {"weight": (g_w + torch.tensor([0.5, 0.5], dtype=torch.float64)).float().view(1, 2), "bias": torch.tensor([g_b + 1.0])}, 10)
    b = Update("b", {"weight": (g_w + torch.tensor([-0.2, 0.3], dtype=torch.float64)).float().view(1, 2), "bias": torch.tensor([g_b])}, 10)
    new = algorithm.aggregate(2, [a, b], state)
    d_a, d_b = 0.5 + 1.0, 0.2  # masked: a keeps weight[0] and the bias, b weight[0] only (its bias did not move)
    inc_a = (1 - BETA) * state["heal"]["increment"]["a"] + BETA * d_a / (d_a + d_b)
    inc_b = (1 - BETA) * state["heal"]["increment"]["b"] + BETA * d_b / (d_a + d_b)
    w_a, w_b = state["heal"]["weight"]["a"] + inc_a, state["heal"]["weight"]["b"] + inc_b
    weight = new["weights"]["weight"].flatten().double()
    assert weight[0].item() == pytest.approx(g_w[0].item() + (w_a * 0.5 + w_b * -0.2) / (w_a + w_b), abs=1e-6)
    assert weight[1].item() == pytest.approx(g_w[1].item(), abs=1e-6)  # every client's element masked: unchanged
    assert float(new["weights"]["bias"]) == pytest.approx(g_b + (w_a * 1.0 + w_b * 0.0) / (w_a + w_b), abs=1e-6)
    assert new["heal"]["weight"]["a"] == pytest.approx(w_a) and new["heal"]["increment"]["b"] == pytest.approx(inc_b)
    assert torch.allclose(new["heal"]["history"]["a"]["weight"], torch.tensor([[0.0, 0.5]]))  # (h·1 + [u ≥ 0]) / 2
    assert new["heal"]["seen"] == {"a": 2, "b": 2}


@pytest.mark.parametrize(("override", "message"), [("algorithm.beta=0", r"algorithm.beta must be in \(0, 1\]"), ("algorithm.threshold=1", r"algorithm.threshold must be in \[0, 1\)")])
def test_bad_settings_are_one_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        fedheal(override)
