"""CKSP (shared / preserved convolutions), AFL (agnostic FL) and FedFB (FairBatch-style group weights):
formula tests in plain torch / numpy and client halves on the tiny set in an in-process actor body (no Ray;
the registry loops in test_methods_engine.py and test_fold.py run them through actors and the fold)."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

from raysim.algorithms import ALGORITHMS
from raysim.algorithms import params as algorithm_params
from raysim.algorithms.afl import AFL, AFLParams, ascent_step, project_to_simplex
from raysim.algorithms.afl import LAMBDA_KEY as AFL_LAMBDA
from raysim.algorithms.aggregation import weighted_average
from raysim.algorithms.cksp import CKSP, CKSPParams, PreservedConv, preserved_keys
from raysim.algorithms.fedfb import LAMBDA_KEY as FEDFB_LAMBDA
from raysim.algorithms.fedfb import SHARES_KEY, lambda_step, weighted_cross_entropy
from raysim.algorithms.qffl import LOSS_KEY, loss_at
from raysim.config import ConfigError
from raysim.datasets import DATASETS
from raysim.engine.client_actor import ClientHost
from raysim.types import Update

from helpers import load_config, tiny_overrides

CLIENTS = ["a", "b", "c", "d"]


def make_host(root: Path, name: str, **extra: object) -> ClientHost:
    """Two clients of the tiny set in one in-process actor body, running method `name`."""
    cfg = load_config(None, tiny_overrides(root, **{"algorithm.name": name, "resources.clients_per_actor": 2, **extra}))
    source = DATASETS.get("fairfedmed_oph")(cfg.data, img_size=16, seed=0)
    return ClientHost(cfg, source.client_specs()[:2])


def prepared_state(host: ClientHost) -> dict:
    """The server state after `setup_state`, from both clients' `client_setup`, as the driver builds it."""
    state = host.algorithm.init_state(host.clients["site1"].model)
    return host.algorithm.setup_state(state, {cid: host.setup(cid) for cid in host.clients})


def afl(**federation: object) -> AFL:
    cfg = load_config(None, ["algorithm.name=afl", "data.name=synthetic", *(f"federation.{k}={v}" for k, v in federation.items())])
    return AFL(algorithm_params(cfg), cfg)


def toy_update(cid: str, value: float, **extra: object) -> Update:
    return Update(cid, {"w": torch.full((3,), value)}, 10, {"loss": 0.5, "steps": 1.0}, dict(extra))


@pytest.mark.parametrize(
    ("name", "key", "value", "needle"),
    [("afl", "lambda_lr", "0", "algorithm.lambda_lr must be a finite number > 0"), ("afl", "lambda_lr", ".nan", "algorithm.lambda_lr"),
     ("fedfb", "alpha", "-0.1", "algorithm.alpha must be a finite number >= 0"), ("cksp", "rank", "0", "algorithm.rank must be an integer >= 1"),
     ("cksp", "targets", "['(']", "algorithm.targets")],
)  # fmt: skip
def test_bad_hyperparameters_name_the_key(name: str, key: str, value: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [f"algorithm.name={name}", "data.name=synthetic", f"algorithm.{key}={value}"])


def test_defaults_follow_their_sources() -> None:
    assert ALGORITHMS.get("afl").Params().lambda_lr == 0.01 and ALGORITHMS.get("fedfb").Params().alpha == 0.005
    assert CKSPParams().rank is None and not CKSP.needs_pretrained


# --- CKSP ------------------------------------------------------------------------------------------


def test_cksp_adapts_the_block_convolutions_and_starts_from_the_shared_model() -> None:
    cfg = load_config(None, ["algorithm.name=cksp", "data.name=synthetic", "model.name=test_resnet"])
    method = CKSP(algorithm_params(cfg), cfg)
    torch.manual_seed(0)
    plain = timm.create_model("test_resnet", num_classes=2).eval()
    adapted = method.adapt(copy.deepcopy(plain), source=None).eval()  # type: ignore[arg-type]  # the default targets need no source
    names = {n for n, m in adapted.named_modules() if isinstance(m, PreservedConv)}
    assert names == {"layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2", "layer3.0.conv1", "layer3.0.conv2", "layer3.0.conv3", "layer4.0.conv1", "layer4.0.conv2"}
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(adapted(x), plain(x))  # B = 0: every client starts from the shared model
    sent, kept = set(method.communicated(adapted)), preserved_keys(adapted)
    assert "layer1.0.conv1.base.weight" in sent and "conv1.0.weight" in sent and "fc.weight" in sent
    assert {"layer1.0.conv1.lora_A", "layer1.0.conv1.lora_B", "bn1.running_mean", "layer1.0.bn1.weight"} <= kept and not sent & kept


def test_cksp_personal_parts_never_travel_and_survive_between_rounds(oph_root: Path) -> None:
    host = make_host(oph_root, "cksp")
    site1, site2 = host.clients["site1"], host.clients["site2"]
    personal = preserved_keys(site1.model)
    low_rank = sorted(k for k in personal if k.endswith(("lora_A", "lora_B")))
    state = host.algorithm.init_state(site1.model)
    payload = dict(host.algorithm.payload(state, 1))
    assert low_rank and not set(payload) & personal
    updates = [host.fit("site1", payload, 1), host.fit("site2", payload, 1)]
    assert all(set(u.tensors) == set(payload) for u in updates)  # never a personal tensor in an update
    kept = {k: site1.own_state[k].clone() for k in low_rank if k.endswith("lora_B")}
    assert len(kept) == len(low_rank) // 2 and all(v.abs().sum() > 0 for v in kept.values())  # trained from B = 0
    assert all(not torch.equal(site1.own_state[k], site2.own_state[k]) for k in kept)  # each client its own
    merged = host.algorithm.aggregate(1, updates, state)
    payload2 = dict(host.algorithm.payload(merged, 2))
    assert set(payload2) == set(payload)
    model = site1.load(payload2)  # round 2 starts from site1's own preserved paths, untouched by site2's round
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], site1.own_state[k]) for k in personal if k in site1.own_state)
    assert all(torch.equal(loaded[k], payload2[k]) for k in payload2)
    host.fit("site1", payload2, 2)
    assert all(not torch.equal(site1.own_state[k], kept[k]) for k in kept)  # trained on in round 2
    host.evaluate("site2", payload2, ["test"])  # scored with the shared weights and its own preserved parts
    loaded = site2.model.state_dict()
    assert all(torch.equal(loaded[k], site2.own_state[k]) for k in personal if k in site2.own_state)


# --- AFL -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "total", "expected"),
    [([0.2, 0.3, 0.5], 1.0, [0.2, 0.3, 0.5]), ([2.0, 0.0, 0.0], 1.0, [1.0, 0.0, 0.0]), ([0.6, 0.6, -0.2], 1.0, [0.5, 0.5, 0.0]),
     ([0.5, 0.5, 0.5], 1.0, [1 / 3] * 3), ([1.0, 3.0], 0.5, [0.0, 0.5])],
)  # fmt: skip
def test_simplex_projection(values: list[float], total: float, expected: list[float]) -> None:
    np.testing.assert_allclose(project_to_simplex(values, total), expected, atol=1e-15)


def test_simplex_projection_is_the_nearest_point() -> None:
    gen = np.random.default_rng(0)
    for _ in range(50):
        v = gen.normal(size=6)
        x = project_to_simplex(v)
        assert (x >= 0).all() and x.sum() == pytest.approx(1.0, abs=1e-12)
        for _ in range(20):  # no other point of the simplex is closer
            y = gen.dirichlet(np.ones(6))
            assert np.linalg.norm(v - x) <= np.linalg.norm(v - y) + 1e-12


def test_afl_full_participation_weights_the_model_by_lambda_and_raises_the_high_loss_client() -> None:
    method = afl()
    state = method.setup_state({"weights": {"w": torch.zeros(3)}, AFL_LAMBDA: {}}, {cid: {} for cid in CLIENTS[:3]})
    state[AFL_LAMBDA] = {"a": 0.5, "b": 0.3, "c": 0.2}
    assert method.sample_clients(1, CLIENTS[:3], 3, state) == CLIENTS[:3]  # everyone trains
    losses = {"a": 0.2, "b": 0.5, "c": 1.5}
    updates = [toy_update(cid, v, **{LOSS_KEY: losses[cid]}) for cid, v in zip(CLIENTS[:3], (1.0, 2.0, 4.0))]
    new = method.aggregate(1, updates, state)
    assert torch.allclose(new["weights"]["w"], torch.full((3,), 0.5 * 1 + 0.3 * 2 + 0.2 * 4))  # Σ λ_k θ_k, not by examples
    lam = new[AFL_LAMBDA]
    assert sum(lam.values()) == pytest.approx(1.0, abs=1e-12) and min(lam.values()) >= 0
    expected = project_to_simplex([0.5 + 0.01 * 0.2, 0.3 + 0.01 * 0.5, 0.2 + 0.01 * 1.5])  # λ + γ L, projected
    np.testing.assert_allclose([lam[c] for c in "abc"], expected, rtol=0, atol=1e-15)
    assert lam["c"] > 0.2 and lam["a"] < 0.5
    far = AFL(AFLParams(lambda_lr=10.0), method.cfg).aggregate(1, updates, state)[AFL_LAMBDA]
    assert far == {"a": 0.0, "b": 0.0, "c": 1.0}  # a large step puts all mass on the worst client


def test_afl_state_checkpoints_plainly_and_the_step_projects_onto_the_whole_simplex() -> None:
    lam = {"a": 0.4, "b": 0.4, "c": 0.2}
    moved = ascent_step(lam, {"a": 1.0, "b": 0.1}, 0.05)  # c reported nothing: g_c = 0
    np.testing.assert_allclose([moved[c] for c in "abc"], project_to_simplex([0.45, 0.405, 0.2]), rtol=0, atol=1e-15)
    assert moved["c"] < 0.2 and moved["a"] > 0.4 and sum(moved.values()) == pytest.approx(1.0, abs=1e-15)
    assert all(type(v) is float for v in moved.values())


def _one_round(method: AFL, state: dict, losses: dict[str, float]) -> tuple[list[str], dict[str, float], dict[str, float]]:
    """The first round whose cohort is as `losses` asks (by size), its fold weights and the new λ."""
    want = len(losses)
    round_ = next(r for r in range(1, 200) if len(method.sample_clients(r, CLIENTS, method.cfg.federation.clients_per_round, state)) == want)
    cohort = method.sample_clients(round_, CLIENTS, method.cfg.federation.clients_per_round, state)
    draws = method.fold_start(round_, state, {}).weights
    named = dict(zip(cohort, losses.values()))
    new = method.aggregate(round_, [toy_update(cid, 1.0, **{LOSS_KEY: named[cid]}) for cid in cohort], state)
    return cohort, draws, new[AFL_LAMBDA]


def test_afl_lambda_moves_with_one_client_per_round() -> None:
    """Issue 24.6: at clients_per_round=1 the cohort projection froze λ (0.5.0); the importance-
    weighted gradient L_k / λ_k on the whole simplex moves it toward a high-loss client."""
    method = afl(clients_per_round=1)
    lam = {"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}
    state = {"weights": {"w": torch.zeros(3)}, AFL_LAMBDA: lam}
    (drawn,), _, new = _one_round(method, state, {"x": 2.0})
    expected = project_to_simplex([lam[c] + 0.01 * (2.0 / lam[c] if c == drawn else 0.0) for c in CLIENTS])
    np.testing.assert_allclose([new[c] for c in CLIENTS], expected, rtol=0, atol=1e-15)
    assert new[drawn] > 0.25 and all(new[c] < 0.25 for c in CLIENTS if c != drawn)
    assert sum(new.values()) == pytest.approx(1.0, abs=1e-12)


def test_afl_lambda_moves_toward_the_high_loss_client_when_both_draws_repeat() -> None:
    """k = 2 with both draws on one client: 0.5.0 kept λ fixed; now g = L·m/(k·λ) = L/λ for it."""
    method = afl(clients_per_round=2)
    lam = {"a": 0.1, "b": 0.6, "c": 0.2, "d": 0.1}
    state = {"weights": {"w": torch.zeros(3)}, AFL_LAMBDA: lam}
    (drawn,), draws, new = _one_round(method, state, {"x": 1.5})
    assert draws == {drawn: 2.0}
    expected = project_to_simplex([lam[c] + 0.01 * (1.5 * 2 / (2 * lam[c]) if c == drawn else 0.0) for c in CLIENTS])
    np.testing.assert_allclose([new[c] for c in CLIENTS], expected, rtol=0, atol=1e-15)
    assert new[drawn] > lam[drawn]
    # two distinct clients, the high-loss one gains λ relative to the other
    method3 = afl(clients_per_round=2)
    cohort, draws, new = _one_round(method3, state, {"x": 0.1, "y": 3.0})
    low, high = cohort
    assert new[high] - lam[high] > new[low] - lam[low]


def test_afl_sampler_is_a_function_of_seed_round_and_lambda_only() -> None:
    method = afl(clients_per_round=2)
    state = {"weights": {"w": torch.zeros(2)}, AFL_LAMBDA: {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}}
    chosen = [method.sample_clients(r, CLIENTS, 2, state) for r in range(1, 9)]
    assert all(c == sorted(c) and 1 <= len(c) <= 2 for c in chosen)
    other = {**state, "weights": {"w": torch.ones(2)}, "something": 3}  # anything but λ changes nothing
    assert [afl(clients_per_round=2).sample_clients(r, CLIENTS, 2, other) for r in range(1, 9)] == chosen
    assert len({tuple(c) for c in chosen}) > 1  # the round matters
    reseeded = afl(clients_per_round=2)
    reseeded.cfg.seed += 1
    assert [reseeded.sample_clients(r, CLIENTS, 2, state) for r in range(1, 9)] != chosen  # so does the seed
    one_hot = {**state, AFL_LAMBDA: {"a": 0.0, "b": 0.0, "c": 1.0, "d": 0.0}}
    assert all(method.sample_clients(r, CLIENTS, 2, one_hot) == ["c"] for r in range(1, 9))  # so does λ
    single = afl(clients_per_round=1)
    drawn = Counter(cid for r in range(1, 3001) for cid in single.sample_clients(r, CLIENTS, 1, state))
    for cid, p in state[AFL_LAMBDA].items():
        assert drawn[cid] / 3000 == pytest.approx(p, abs=0.03)


def test_afl_partial_participation_weighs_each_client_by_its_draws() -> None:
    method = afl(clients_per_round=3)
    state = {"weights": {"w": torch.zeros(3)}, AFL_LAMBDA: {"a": 0.1, "b": 0.6, "c": 0.3, "d": 0.0}}
    round_ = next(r for r in range(1, 100) if len(method.sample_clients(r, CLIENTS, 3, state)) == 2)  # a round with a repeat
    cohort = method.sample_clients(round_, CLIENTS, 3, state)
    fold = method.fold_start(round_, state, {})
    assert sorted(fold.weights) == cohort and sum(fold.weights.values()) == 3  # draw counts
    values = {"a": 1.0, "b": 2.0, "c": 4.0}
    new = method.aggregate(round_, [toy_update(cid, values[cid], **{LOSS_KEY: 0.5}) for cid in cohort], state)
    expected = sum(fold.weights[cid] * values[cid] for cid in cohort) / 3
    assert torch.allclose(new["weights"]["w"], torch.full((3,), expected))
    assert new[AFL_LAMBDA]["d"] == 0.0 and sum(new[AFL_LAMBDA].values()) == pytest.approx(1.0, abs=1e-12)


def test_afl_client_reports_its_loss_at_the_received_model(oph_root: Path) -> None:
    host = make_host(oph_root, "afl")
    state = prepared_state(host)
    assert state[AFL_LAMBDA] == {"site1": 0.5, "site2": 0.5}
    payload = dict(host.algorithm.payload(state, 1))
    expected = loss_at(host.clients["site1"], host.clients["site1"].load(payload))
    update = host.fit("site1", payload, 1)
    assert update.extra[LOSS_KEY] == expected and update.metrics["steps"] > 0


# --- FedFB -----------------------------------------------------------------------------------------


def test_fedfb_loss_weights_match_hand_computation() -> None:
    logits, labels = torch.randn(5, 2), torch.tensor([0, 1, 1, 0, 1])
    groups, weights = torch.tensor([0, 1, -1, 2, 1]), torch.tensor([2.0, 0.5, 1.5])
    per = nn.functional.cross_entropy(logits, labels, reduction="none")
    expected = (per * torch.tensor([2.0, 0.5, 1.0, 1.5, 0.5])).sum() / 5  # the unknown group (-1) weighs 1
    torch.testing.assert_close(weighted_cross_entropy(logits, labels, groups, weights), expected)


def test_fedfb_lambda_moves_toward_the_group_with_the_higher_mean_loss() -> None:
    lam = [0.5, 0.3, 0.2]
    # group 0: mean 0.1 over 100; group 1: mean 0.5 over 10 (a smaller sum, a higher mean); group 2: mean 0.3
    stepped = lambda_step(lam, [10.0, 5.0, 6.0], [100, 10, 20], alpha=0.05)
    assert sum(stepped) == pytest.approx(1.0, abs=1e-12) and min(stepped) >= 0
    assert stepped[1] > lam[1] and stepped[0] < lam[0]
    mu = np.array([0.1, 0.5, 0.3]) - 0.3
    np.testing.assert_allclose(stepped, np.array(lam) + 0.05 * mu / np.linalg.norm(mu), atol=1e-15)  # α μ/‖μ‖, inside Δ
    assert lambda_step(lam, [10.0, 5.0, 6.0], [100, 10, 20], alpha=0.0) == lam  # α = 0: bit for bit
    assert lambda_step(lam, [1.0, 2.0, 0.0], [10, 20, 0], alpha=0.05) == lam  # equal losses (group 2 absent): no move
    assert lambda_step([0.01, 0.99], [0.0, 9.0], [10, 10], alpha=0.5) == [0.0, 1.0]  # projected back onto Δ


def test_fedfb_with_alpha_zero_is_fedavg_bit_for_bit(oph_root: Path) -> None:
    fedavg, fedfb = make_host(oph_root, "fedavg"), make_host(oph_root, "fedfb", **{"algorithm.alpha": 0.0})
    state = prepared_state(fedfb)
    train = [fedfb.clients[c].shards["train"].table.attributes["race"] for c in ("site1", "site2")]
    counts = np.array([[int((codes == g).sum()) for g in range(3)] for codes in train]).sum(axis=0)
    np.testing.assert_allclose(state[SHARES_KEY], counts / counts.sum(), rtol=1e-15)
    assert state[FEDFB_LAMBDA] == state[SHARES_KEY]
    payload = dict(fedfb.algorithm.payload(state, 1))
    fedfb.set_payload(payload, fedfb.algorithm.round_values(state, 1))
    assert fedfb.algorithm.received["fedfb_weights"] == [1.0, 1.0, 1.0]
    expected = [fedavg.fit(cid, payload, 1) for cid in ("site1", "site2")]
    updates = [fedfb.fit(cid, None, 1) for cid in ("site1", "site2")]
    for got, want in zip(updates, expected):
        assert got.tensors.keys() == want.tensors.keys() == payload.keys()
        assert all(torch.equal(got.tensors[k], want.tensors[k]) for k in payload)
        assert sum(got.extra["group_counts"]) == fedfb.clients[got.client_id].num_train - int((train[0 if got.client_id == "site1" else 1] < 0).sum())
    new = fedfb.algorithm.aggregate(1, updates, state)
    fedavg_mean = weighted_average([u.tensors for u in expected], [u.num_examples for u in expected])
    assert all(torch.equal(new["weights"][k], fedavg_mean[k]) for k in fedavg_mean)
    assert new[FEDFB_LAMBDA] == state[FEDFB_LAMBDA]
    # α > 0: λ moves toward the group the received model serves worst, and the reweighted loss trains differently
    moving = make_host(oph_root, "fedfb", **{"algorithm.alpha": 0.1})
    stepped = moving.algorithm.aggregate(1, updates, state)[FEDFB_LAMBDA]
    sums, n = np.sum([u.extra["group_losses"] for u in updates], axis=0), np.sum([u.extra["group_counts"] for u in updates], axis=0)
    worst = int(np.argmax(np.where(n > 0, sums / np.maximum(n, 1), -np.inf)))
    assert stepped[worst] > state[FEDFB_LAMBDA][worst] and sum(stepped) == pytest.approx(1.0, abs=1e-12)
    moved_state = {**state, FEDFB_LAMBDA: stepped}
    moving.set_payload(payload, moving.algorithm.round_values(moved_state, 2))
    reweighted = moving.fit("site1", None, 1)
    assert any(not torch.equal(reweighted.tensors[k], expected[0].tensors[k]) for k in payload)
