"""Every registered method's server step is a fold that holds no update: loops over the registry,
so a newly registered method is checked without anyone writing a test (no Ray, toy tensors)."""

from __future__ import annotations

import copy
import gc
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from raysim.algorithms import ALGORITHMS, Algorithm
from raysim.algorithms import params as algorithm_params
from raysim.algorithms.cksp import PreservedConv
from raysim.algorithms.fairfed import STATS_KEY
from raysim.algorithms.fedbm_concepts import attach_concept_head, concept_stats, synthetic_embeddings
from raysim.algorithms.fedhelp import DualHead
from raysim.algorithms.ffa_lora import freeze_down
from raysim.algorithms.qffl import LOSS_KEY
from raysim.models import adapters
from raysim.types import Update

from helpers import load_config

ROUND, CLIENTS, GROUPS = 2, ("c0", "c1", "c2"), 2


class Tiny(nn.Module):
    """conv -> BatchNorm -> pool -> fc: parameters, float and integer buffers, a classifier head (FedPer)."""

    num_features = 4

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).mean(dim=(2, 3)))


def tiny_model(name: str) -> nn.Module:
    """What the method's `adapt` / `build_model` would make of a network, on Tiny (seeded: the same every time)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _adapted(Tiny(), name)


def _adapted(model: nn.Module, name: str) -> nn.Module:
    if name == "fedlora":
        adapters.inject(model, ["fc"], adapters.LoRA, rank=2, alpha=2.0)
        adapters.freeze_backbone(model)
    elif name == "fairlora":  # one row of singular values per group
        adapters.inject(model, ["fc"], adapters.FairLoRA, rank=4, alpha=2.0, num_groups=GROUPS)
        adapters.freeze_backbone(model)
    elif name == "fedhelp":  # the public head stays with its client
        model = DualHead(model, 2)
    elif name == "fedbm":  # the frozen concept classifier behind a trainable projection
        attach_concept_head(model, concept_stats(synthetic_embeddings(2, 0, dim=8, prompts=4)), 12.5)
    elif name in ("deer", "dp_lora", "ffa_lora"):  # DP LoRA methods: LoRA on fc (FFA-LoRA: A frozen)
        adapters.inject(model, ["fc"], adapters.LoRA, rank=2, alpha=2.0)
        adapters.freeze_backbone(model)
        if name == "ffa_lora":
            freeze_down(model)
    elif name == "cksp":  # a shared conv with a preserved low-rank path (stays with the client, like the BatchNorm)
        adapters.inject(model, ["conv"], PreservedConv, rank=2, alpha=2.0)
    return model


def fairfed_statistics() -> dict[str, dict[str, Any]]:
    """`FairFed.client_statistics` of each client: group confusions [label, prediction] and example counts."""
    rng = np.random.default_rng(0)
    return {cid: {STATS_KEY: {g: rng.integers(1, 9, (2, 2)) for g in range(GROUPS)}, "num_examples": 10 * (k + 1)} for k, cid in enumerate(CLIENTS)}


STATISTICS = {"fairfed": fairfed_statistics}  # methods with round_statistics: their statistics pass
# Methods whose server state is completed by `setup_state` before round 1: what each client's `client_setup` shares.
SHARED = {"afl": {}, "fedfb": {"group_counts": [5, 3]}}
# Methods that need a particular host: the config names it (the fold itself sees only tensors).
HOSTS = {name: ["model.name=clip:RaySim-Tiny-ViT"] for name in ("promptfl", "fedotp", "adapter")}
HOSTS.update({name: ["system.simulate=true"] for name in ("fedbuff", "fedasync")})  # asynchronous: on the simulated clock


def setup(name: str) -> tuple[Algorithm, dict[str, Any], dict[str, dict[str, Any]]]:
    cfg = load_config(None, [f"algorithm.name={name}", "data.name=synthetic", "federation.rounds=4", *HOSTS.get(name, [])])
    algorithm = ALGORITHMS.get(name)(algorithm_params(cfg), cfg)
    state = algorithm.init_state(tiny_model(name))
    if name in SHARED:
        state = algorithm.setup_state(state, {cid: SHARED[name] for cid in CLIENTS})
    if not algorithm.round_statistics:
        return algorithm, state, {}
    if name not in STATISTICS:
        pytest.fail(f"{name} sets round_statistics: add its client_statistics fixture to STATISTICS in {__file__}")
    return algorithm, state, STATISTICS[name]()


def toy_updates(state: dict[str, Any]) -> Iterator[Update]:
    """One update per client, built only when asked for: the server's tensors moved a little (integers
    by k), with every extra a method reads (steps, q-FFL's loss, FairLoRA's group counts)."""
    for k, cid in enumerate(CLIENTS):
        gen = torch.Generator().manual_seed(k)
        tensors = {
            key: (v + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype)) if v.is_floating_point() else v + k for key, v in state["weights"].items()
        }
        extra = {LOSS_KEY: 0.3 + 0.2 * k, "group_counts": [k + 1, k]}  # c0 holds no example of group 1
        extra["group_losses"] = [0.4 * (k + 1), 0.9 * k]  # FedFB: summed loss per group at the received model
        extra.update(base_version=0, staleness=k)  # FedBuff / FedAsync: set by the driver on arrival
        yield Update(cid, tensors, 10 * (k + 1), {"loss": 0.5, "steps": float(k + 2)}, extra)


def assert_identical(a: object, b: object, where: str = "state") -> None:
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"  # type: ignore[attr-defined]
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")  # type: ignore[index]
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where  # type: ignore[arg-type]
        for i, (x, y) in enumerate(zip(a, b)):  # type: ignore[call-overload]
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where  # type: ignore[union-attr, arg-type]
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


@pytest.mark.parametrize("name", ALGORITHMS.names())
def test_a_fold_keeps_no_reference_to_any_update(name: str) -> None:
    algorithm, state, statistics = setup(name)
    fold = algorithm.fold_start(ROUND, state, statistics)
    refs: list[weakref.ref] = []
    for update in toy_updates(state):
        refs += [weakref.ref(update), *(weakref.ref(t) for t in update.tensors.values())]
        algorithm.accumulate(fold, update)
    del update
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert not alive, f"{name}'s fold still holds {len(alive)} of the updates' objects: {[type(a).__name__ for a in alive][:5]}"
    new = algorithm.finalize(ROUND, fold, state)
    assert new["weights"].keys() == state["weights"].keys()
    assert all(torch.isfinite(v).all() for v in new["weights"].values() if v.is_floating_point())


@pytest.mark.parametrize("name", ALGORITHMS.names())
def test_the_fold_equals_the_list_aggregate(name: str) -> None:
    algorithm, state, statistics = setup(name)
    before = copy.deepcopy(state)
    listed = algorithm.aggregate(ROUND, list(toy_updates(state)), state, statistics or None)
    fold = algorithm.fold_start(ROUND, state, statistics)
    for update in toy_updates(state):  # as the engine does: one at a time, each dropped after
        algorithm.accumulate(fold, update)
    assert_identical(algorithm.finalize(ROUND, fold, state), listed)
    assert_identical(state, before)  # the server's input state is left as it was
    if name != "local":  # something moved (local communicates nothing)
        assert any(not torch.equal(listed["weights"][k], state["weights"][k]) for k in state["weights"])


@pytest.mark.parametrize("name", ALGORITHMS.names())
def test_the_server_state_checkpoints_with_tensors_and_plain_values_only(name: str, tmp_path) -> None:
    """Checkpoints load with `weights_only=True`: every method's server state (before and after a
    round) must hold nothing else."""
    from raysim.engine import checkpoints

    algorithm, state, statistics = setup(name)
    after = algorithm.aggregate(ROUND, list(toy_updates(state)), state, statistics or None)
    for round_, saved in ((0, state), (ROUND, after)):
        folder = tmp_path / "checkpoints" / f"round_{round_:04d}"
        checkpoints.write_server(folder, round_, saved)
        assert_identical(checkpoints.load_server(folder), (saved, round_))
