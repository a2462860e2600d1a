"""FedProx, Ditto, FedBN, SiloBN, FedPer, local and FedRDN: client halves on real data, no Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

from raysim.algorithms import ALGORITHMS
from raysim.algorithms import params as algorithm_params
from raysim.algorithms.fedrdn import PREFIX
from raysim.client.training import Batch
from raysim.config import ConfigError
from raysim.engine.client_actor import ClientHost
from raysim.models.backbones import SliceFold, exchangeable_keys

from helpers import load_config, make_host, start, tiny_overrides

SGD = {"federation.optimizer": "sgd", "federation.momentum": 0.0, "federation.lr": 0.01}






def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum((a[k].double() - b[k].double()).pow(2).sum() for k in a) ** 0.5)


@pytest.mark.parametrize(("name", "key", "value"), [("fedprox", "mu", -1), ("fedprox", "mu", "true"), ("ditto", "lam", ".nan"), ("ditto", "lam", "-0.5")])
def test_bad_hyperparameters_name_the_field(oph_root: Path, name: str, key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"{key} must be a finite number >= 0"):
        load_config(None, tiny_overrides(oph_root, **{"algorithm.name": name, f"algorithm.{key}": value}))


def test_defaults_follow_the_spec(oph_root: Path) -> None:
    assert ALGORITHMS.get("fedprox").Params().mu == 0.01 and ALGORITHMS.get("ditto").Params().lam == 1e-3


# --- FedProx -------------------------------------------------------------------------------------


def test_fedprox_with_mu_zero_is_fedavg_bit_for_bit(oph_root: Path) -> None:
    fedavg, fedprox = make_host(oph_root, "fedavg"), make_host(oph_root, "fedprox", **{"algorithm.mu": 0})
    _, payload = start(fedavg)
    expected, got = fedavg.fit("site1", payload, 1), fedprox.fit("site1", payload, 1)
    assert got.tensors.keys() == expected.tensors.keys() == payload.keys()
    assert all(torch.equal(got.tensors[k], expected.tensors[k]) for k in payload)
    pulled = make_host(oph_root, "fedprox", **{"algorithm.mu": 100.0, **SGD}).fit("site1", payload, 1)
    free = make_host(oph_root, "fedavg", **SGD).fit("site1", payload, 1)
    assert distance(pulled.tensors, payload) < distance(free.tensors, payload)  # the term acts in client_fit


def test_fedprox_loss_and_gradient_match_hand_computation(oph_root: Path) -> None:
    cfg = load_config(None, tiny_overrides(oph_root, **{"algorithm.name": "fedprox", "algorithm.mu": 0.5}))
    algorithm = ALGORITHMS.get("fedprox")(algorithm_params(cfg), cfg)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    model[0].requires_grad_(False)  # frozen parameters are not trained, so not pulled either
    anchor = {k: v + torch.randn_like(v) for k, v in model.state_dict().items()}
    algorithm.anchor = anchor
    batch = Batch(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]), {}, torch.arange(4))
    loss = algorithm.loss(model, batch)
    loss.backward()
    w, b = model[1].weight, model[1].bias
    ce = nn.functional.cross_entropy(model(batch.x), batch.y)
    ce_w, ce_b = torch.autograd.grad(ce, [w, b])
    prox = ((w - anchor["1.weight"]) ** 2).sum() + ((b - anchor["1.bias"]) ** 2).sum()
    torch.testing.assert_close(loss, ce + 0.25 * prox)
    torch.testing.assert_close(w.grad, ce_w + 0.5 * (w - anchor["1.weight"]))  # d/dθ (μ/2)‖θ−θg‖² = μ(θ−θg)
    torch.testing.assert_close(b.grad, ce_b + 0.5 * (b - anchor["1.bias"]))
    assert model[0].weight.grad is None


# --- FedBN, SiloBN, FedPer: which keys stay home ------------------------------------------------


def shared_keys(name: str, model: nn.Module) -> set[str]:
    """What the spec says each method averages, written out for test_resnet from shapes and names."""
    params = {k: p for k, p in model.named_parameters()}
    if name == "fedbn":  # conv and linear weights plus the head bias; every BatchNorm tensor stays local
        return {k for k, p in params.items() if p.dim() > 1} | {"fc.bias"}
    if name == "silobn":  # every parameter, BN affine included; no running statistics
        return set(params)
    assert name == "fedper"  # everything that trains, running statistics too, except the head
    return {k for k in model.state_dict() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("name", ["fedbn", "silobn", "fedper"])
def test_personal_keys_stay_with_the_client(oph_root: Path, name: str) -> None:
    host = make_host(oph_root, name)
    site1, site2 = host.clients["site1"], host.clients["site2"]
    expected = shared_keys(name, site1.model)
    state, payload = start(host)
    personal = set(exchangeable_keys(site1.model)) - expected
    assert personal and set(payload) == expected
    updates = [host.fit("site1", payload, 1), host.fit("site2", payload, 1)]
    assert all(set(u.tensors) == expected for u in updates)
    # the personal tensors were trained, and each client kept its own
    assert all(not torch.equal(site1.own_state[k], site1.initial_state[k]) for k in personal if "running_var" in k or k.startswith("fc."))
    assert any(not torch.equal(site1.own_state[k], site2.own_state[k]) for k in personal)
    merged = host.algorithm.aggregate(1, updates, state)
    assert set(merged["weights"]) == expected
    host.evaluate("site1", host.algorithm.payload(merged, 1), ["test"])
    loaded = site1.model.state_dict()
    assert all(torch.equal(loaded[k], site1.own_state[k]) for k in personal)  # scored with its own
    assert all(torch.equal(loaded[k], merged["weights"][k]) for k in expected)


def test_fedper_finds_the_head_inside_a_slice_fold(oph_root: Path) -> None:
    cfg = load_config(None, tiny_overrides(oph_root, **{"algorithm.name": "fedper"}))
    algorithm = ALGORITHMS.get("fedper")(algorithm_params(cfg), cfg)
    model = SliceFold(timm.create_model("test_resnet", num_classes=2), slices=8)
    sent = set(algorithm.communicated(model))
    assert "fold.weight" in sent and "backbone.conv1.0.weight" in sent
    assert set(exchangeable_keys(model)) - sent == {"backbone.fc.weight", "backbone.fc.bias"}
    with pytest.raises(ValueError, match="get_classifier"):
        algorithm.communicated(nn.Sequential(nn.Linear(2, 2)))


# --- Ditto ---------------------------------------------------------------------------------------


def test_ditto_sends_the_fedavg_global_and_scores_with_the_personal_model(oph_root: Path) -> None:
    fedavg, ditto = make_host(oph_root, "fedavg"), make_host(oph_root, "ditto", **{"algorithm.lam": 0.1})
    _, payload = start(fedavg)
    payload.update({k: v + 0.1 for k, v in trainable(fedavg.clients["site1"].model).items()})  # a global unlike the initial model
    expected, update = fedavg.fit("site1", payload, 1), ditto.fit("site1", payload, 1)
    assert update.tensors.keys() == payload.keys()
    assert all(torch.equal(update.tensors[k], expected.tensors[k]) for k in payload)  # no personal weights in it
    personal = ditto.clients["site1"].memory["ditto_personal"]
    assert personal.keys() == ditto.clients["site1"].model.state_dict().keys()
    assert any(not torch.equal(personal[k].cpu(), update.tensors[k]) for k in payload)  # two different models
    # first participation: the personal model starts from the received global (2 Adam steps of lr 1e-3 away)
    assert max((personal[k].cpu() - payload[k]).abs().max().item() for k in trainable(ditto.clients["site1"].model)) < 0.01
    scored = ditto.evaluate("site1", payload, ["test"])[0]
    loaded = ditto.clients["site1"].model.state_dict()
    assert all(torch.equal(loaded[k], personal[k]) for k in personal)
    assert not np.allclose(scored.scores, fedavg.evaluate("site1", payload, ["test"])[0].scores)
    # a client that never trained is scored with the global model
    ditto.evaluate("site2", payload, ["test"])
    assert all(torch.equal(ditto.clients["site2"].model.state_dict()[k], payload[k]) for k in payload)


def test_ditto_personal_model_follows_the_global_one_as_lambda_grows(oph_root: Path) -> None:
    """SGD with lr 0.01: λ = 100 (lr·λ = 1, the largest stable value) undoes all earlier drift at every step."""
    drift = {}
    for lam in (0.0, 20.0, 100.0):
        host = make_host(oph_root, "ditto", **{"algorithm.lam": lam, "federation.local_epochs": 3, **SGD})
        _, payload = start(host)
        for round_ in (1, 2, 3):  # the personal model persists between rounds, the global one is fixed here
            host.fit("site1", payload, round_)
        personal = host.clients["site1"].memory["ditto_personal"]
        drift[lam] = distance({k: personal[k] for k in trainable(host.clients["site1"].model)}, payload)
    assert drift[0.0] > drift[20.0] > drift[100.0] > 0 and drift[100.0] < 0.5 * drift[0.0]


# --- local ---------------------------------------------------------------------------------------


def test_local_sends_nothing_and_scores_with_its_own_model(oph_root: Path) -> None:
    host = make_host(oph_root, "local")
    site1, site2 = host.clients["site1"], host.clients["site2"]
    state, payload = start(host)
    assert payload == {}
    update = host.fit("site1", payload, 1)
    assert update.tensors == {} and update.nbytes == 0 and update.metrics["steps"] > 0
    assert host.algorithm.aggregate(1, [update], state) is state
    assert site1.own_state.keys() == site1.initial_state.keys()
    assert any(not torch.equal(site1.own_state[k], site1.initial_state[k]) for k in site1.own_state)
    host.evaluate("site1", payload, ["test"])
    assert all(torch.equal(v, site1.own_state[k]) for k, v in site1.model.state_dict().items())
    host.evaluate("site2", payload, ["test"])  # site1's training never reaches site2
    assert all(torch.equal(v, site2.initial_state[k]) for k, v in site2.model.state_dict().items())


# --- FedRDN --------------------------------------------------------------------------------------


def numpy_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = images.astype(np.float64) / 255.0
    return x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3))


def fedrdn_start(host: ClientHost) -> tuple[dict, dict]:
    """(server state, round-1 payload) after the driver's set-up step: every client's `setup` gathered."""
    shared = {cid: host.setup(cid) for cid in sorted(host.clients)}
    state = host.algorithm.setup_state(host.algorithm.init_state(host.clients["site1"].model), shared)
    return state, dict(host.algorithm.payload(state, 1))


def test_fedrdn_shares_every_clients_channel_statistics_before_round_1(oph_root: Path) -> None:
    host = make_host(oph_root, "fedrdn")
    for cid, client in host.clients.items():
        mean, std = numpy_stats(client.shards["train"].images)
        shared = host.setup(cid)
        assert set(shared) == {"mean", "std"}  # the statistics only: no pixels leave the client
        np.testing.assert_allclose(shared["mean"], mean, rtol=1e-12)
        np.testing.assert_allclose(shared["std"], std, rtol=1e-12)
    state, payload = fedrdn_start(host)
    assert {k for k in payload if k.startswith(PREFIX)} == {PREFIX + "site1", PREFIX + "site2"}  # already in round 1
    assert torch.equal(payload[PREFIX + "site2"], torch.tensor([host.setup("site2")["mean"], host.setup("site2")["std"]], dtype=torch.float64))
    updates = [host.fit(cid, payload, 1) for cid in ("site1", "site2")]
    assert all(u.tensors.keys() == state["weights"].keys() for u in updates)  # the statistics do not reach load() nor go back up
    merged = host.algorithm.aggregate(1, updates, state)
    assert merged["stats"] == state["stats"] and host.algorithm.payload(merged, 2).keys() == payload.keys()


def test_fedrdn_draws_statistics_per_image(oph_root: Path) -> None:
    host = make_host(oph_root, "fedrdn", **{"federation.local_epochs": 4})
    algorithm, client = host.algorithm, host.clients["site1"]
    algorithm.use_own_stats(client)
    pool = [torch.tensor([[m] * client.mean.numel(), [s] * client.mean.numel()], dtype=torch.float64) for m, s in ((0.1, 0.2), (0.5, 0.3), (0.9, 0.4))]

    def drawn(round_: int) -> list[list[int]]:
        """Per batch, which pool entry each image was normalised with, read back from its pixels."""
        epochs = client.train_epochs(round_, 4, 16, host.cfg.seed)
        plain = [b.x * client.std + client.mean for batches in client.train_epochs(round_, 4, 16, host.cfg.seed) for b in batches]
        shifted = [b.x for batches in algorithm.randomly_normalised(client, epochs, pool, round_) for b in batches]
        return [
            [next(i for i, ms in enumerate(pool) if torch.allclose(x * float(ms[1, 0]) + float(ms[0, 0]), raw, atol=1e-5)) for x, raw in zip(batch, raws, strict=True)]
            for batch, raws in zip(shifted, plain, strict=True)
        ]

    first = drawn(1)
    full = [batch for batch in first if len(batch) == 16]
    assert full and all(len(set(batch)) > 1 for batch in full)  # the images of one batch get different clients' statistics
    assert drawn(1) == first and drawn(2) != first  # seeded by (seed, round, client id, step)
    # in client_fit: other clients' statistics change the training, and twice is bit-identical
    _, payload = start(host)
    others = {**payload, PREFIX + "zzz": pool[2]}
    own_only, with_others, again = (host.fit("site1", p, 1) for p in (payload, others, others))
    assert all(torch.equal(with_others.tensors[k], again.tensors[k]) for k in payload)
    assert any(not torch.equal(with_others.tensors[k], own_only.tensors[k]) for k in payload)


def test_fedrdn_evaluates_with_the_clients_own_statistics(oph_root: Path) -> None:
    host = make_host(oph_root, "fedrdn")
    _, payload = start(host)
    payload[PREFIX + "other"] = torch.tensor([[0.9], [0.1]], dtype=torch.float64).expand(2, host.clients["site1"].mean.numel()).clone()
    scored = host.evaluate("site1", payload, ["test"])[0]
    client = host.clients["site1"]
    mean, std = numpy_stats(client.shards["train"].images)
    images = torch.from_numpy(np.array(client.shards["test"].images, dtype=np.float32)) / 255.0
    x = (images - torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)) / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    with torch.no_grad():
        probs = torch.softmax(client.model.eval()(x), dim=1)[:, 1].numpy()
    np.testing.assert_allclose(scored.scores, probs, rtol=1e-4, atol=1e-6)


# --- a rejected update rolls the client back ----------------------------------------------------


def test_a_rejected_update_rolls_the_client_back_to_before_the_round(oph_root: Path) -> None:
    """FedBN keeps its BatchNorm statistics at home: round 2's `fit` changes them; when the driver
    rejects that update (non-finite values) or the call fails, `rollback` restores round 1's."""
    host = make_host(oph_root, "fedbn")
    _, payload = start(host)
    host.fit("site1", payload, 1)  # round 1: the client now holds trained statistics
    before = {k: v.clone() for k, v in host.clients["site1"].own_state.items()}
    host.set_payload({k: v + 0.05 if v.is_floating_point() else v for k, v in payload.items()})
    host.fit("site1", None, 2)
    assert any(not torch.equal(host.clients["site1"].own_state[k], before[k]) for k in before)
    host.rollback("site1")
    after = host.clients["site1"].own_state
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    host.set_payload(payload)  # the next round commits: nothing is left to roll back
    host.rollback("site1")
    assert all(torch.equal(host.clients["site1"].own_state[k], before[k]) for k in before)
