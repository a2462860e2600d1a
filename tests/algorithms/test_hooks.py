"""The engine hooks methods build on (issue 15), on real clients of the tiny set, no Ray:
round-dependent trained subsets, batch transforms, element-wise local values, values sent
with the payload, the sampling hook, and the untrained weights a subset round leaves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raysim.algorithms.base import Algorithm
from raysim.client.training import Batch, only_trainable
from raysim.seeding import rng

from helpers import make_host, start


def test_only_trainable_freezes_inside_the_block_and_gives_each_flag_back() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[1].bias.requires_grad_(False)  # frozen before: stays frozen after
    with only_trainable(model, frozen={"0.weight", "1.bias"}):
        assert [p.requires_grad for p in model.parameters()] == [False, True, True, False]
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, False]
    with pytest.raises(RuntimeError), only_trainable(model, frozen={"0.bias"}):
        raise RuntimeError("a failed round")
    assert model[0].bias.requires_grad


def test_a_round_trains_and_sends_only_its_trained_keys(oph_root: Path) -> None:
    host = make_host(oph_root, "fedavg")
    state, payload = start(host)
    keys = list(payload)
    trained = [k for k in keys if k.startswith("fc.")]
    host.algorithm.trained_keys = lambda round_, names: [k for k in names if k in trained]  # type: ignore[method-assign]
    update = host.fit("site1", payload, 1)
    assert sorted(update.tensors) == sorted(trained)
    assert not torch.equal(update.tensors["fc.weight"], payload["fc.weight"])
    model = host.clients["site1"].model
    frozen = [k for k, p in model.named_parameters() if k not in trained]
    assert all(torch.equal(model.state_dict()[k], payload[k]) for k in frozen)  # frozen ones did not move
    assert all(p.requires_grad for p in model.parameters())  # and train again in the next round
    new = host.algorithm.aggregate(1, [update], state)
    assert list(new["weights"]) == keys  # untrained weights kept, in their order
    assert torch.equal(new["weights"]["fc.weight"], update.tensors["fc.weight"])
    assert all(new["weights"][k] is state["weights"][k] for k in keys if k not in trained)


def test_the_batch_transform_changes_every_training_batch(oph_root: Path) -> None:
    host = make_host(oph_root, "fedavg")
    _, payload = start(host)
    seen: list[int] = []

    def zero_images(batch: Batch) -> Batch:
        seen.append(len(batch.y))
        return Batch(torch.zeros_like(batch.x), batch.y, batch.groups, batch.index, batch.group)

    plain = host.fit("site1", payload, 1)
    host.clients["site1"].set_state({"own_state": {}, "memory": {}})
    host.algorithm.batch_transform = lambda client, round_: zero_images  # type: ignore[method-assign]
    changed = host.fit("site1", payload, 1)
    assert len(seen) == changed.metrics["steps"] == plain.metrics["steps"]  # every training batch went through it
    assert any(not torch.equal(plain.tensors[k], changed.tensors[k]) for k in plain.tensors)


def test_element_wise_local_values_overlay_what_the_server_sends_and_are_saved(oph_root: Path) -> None:
    host = make_host(oph_root, "fedavg")
    _, payload = start(host)
    client = host.clients["site1"]
    host.fit("site1", payload, 1)
    key = next(k for k in payload if payload[k].is_floating_point() and payload[k].dim() > 1)
    mine = client.model.state_dict()[key].clone()
    mask = torch.zeros_like(mine, dtype=torch.bool)
    mask.view(-1)[::3] = True
    client.keep_elements({key: mask})
    loaded = client.load(payload).state_dict()[key]
    assert torch.equal(loaded[mask], mine[mask]) and torch.equal(loaded[~mask], payload[key][~mask])
    saved = client.state()
    other = host.clients["site2"]
    other.set_state(saved)  # a checkpoint's round trip
    assert torch.equal(other.load(payload).state_dict()[key][mask], mine[mask])
    client.keep_elements({})
    assert torch.equal(client.load(payload).state_dict()[key], payload[key])
    with pytest.raises(ValueError, match=f"mask of {key}"):
        client.keep_elements({key: mask.float()})


def test_values_sent_with_the_payload_reach_the_method_in_the_actor(oph_root: Path) -> None:
    host = make_host(oph_root, "fedavg")
    _, payload = start(host)
    host.set_payload(payload, {"lambda": [0.25, 0.75]})
    assert host.algorithm.received == {"lambda": [0.25, 0.75]}
    host.set_payload(payload)
    assert host.algorithm.received == {}


def test_the_default_sampler_is_seeded_by_seed_and_round_alone(oph_root: Path) -> None:
    host = make_host(oph_root, "fedavg")
    algorithm: Algorithm = host.algorithm
    clients = [f"c{i:02d}" for i in range(20)]
    first = algorithm.sample_clients(3, clients, 5, {})
    assert first == sorted(first) and len(set(first)) == 5
    assert first == algorithm.sample_clients(3, clients, 5, {"anything": 1})  # state plays no part
    expected = sorted(rng(algorithm.cfg.seed, "sample", 3).choice(20, size=5, replace=False))
    assert first == [clients[i] for i in expected]  # the selections 0.2.0 made
    assert algorithm.sample_clients(3, clients, 50, {}) == clients


def test_an_actor_sets_all_its_clients_up_in_one_call_with_each_clients_own_result(oph_root: Path) -> None:
    """Issue 29: `setup_clients` is the driver's one call per actor before round 1 (a call per
    client cost 10,000 clients 10,000 round trips); each result is the client's own `setup`."""
    batched, single = make_host(oph_root, "fedrdn"), make_host(oph_root, "fedrdn")
    shared = batched.setup_clients(["site2", "site1"])
    assert list(shared) == ["site2", "site1"]
    for cid in ("site1", "site2"):
        one = single.setup(cid)
        assert one.keys() == shared[cid].keys() and one  # FedRDN shares its channel statistics
        assert all(torch.equal(torch.as_tensor(one[k]), torch.as_tensor(shared[cid][k])) for k in one)
    assert batched.changed == single.changed == {"site1", "site2"}  # statistics kept: state to save
