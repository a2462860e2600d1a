"""The engine at cross-device scale: bounded driver memory, per-actor checkpoints, placement-free bits."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from raysim.algorithms.base import Algorithm
from raysim.engine import checkpoints
from raysim.engine.driver import Driver

from helpers import fake_medmnist, load_config, make_driver

CLIENTS = 12


@pytest.fixture(scope="module")
def many_clients_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("medmnist-many")
    fake_medmnist(root / "pneumoniamnist.npz", classes=2, rgb=False, sizes={"train": 20 * CLIENTS, "val": 24, "test": 4 * CLIENTS})
    return root


def cross_device(root: Path, run_dir: Path, **extra: object) -> Driver:
    settings: dict[str, object] = {
        "data.name": "medmnist",
        "data.partition": "iid",
        "data.num_clients": CLIENTS,
        "eval.bootstrap": 0,
        "resources.actors": 2,
        "federation.rounds": 1,
        **extra,
    }
    return make_driver(root, run_dir, **settings)


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage alive in this process (each storage once)."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type == "cpu":  # type(): no lazy-attribute warnings
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def test_driver_memory_does_not_grow_with_the_cohort(ray_session, many_clients_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver's live tensors while it folds a round: the same for 2 and for 12 clients per round."""
    peaks: list[int] = []
    original = Algorithm.accumulate

    def measured(self: Algorithm, fold: object, update: object) -> None:
        original(self, fold, update)
        peaks.append(live_tensor_bytes())

    monkeypatch.setattr(Algorithm, "accumulate", measured)
    model_bytes = {}
    peak = {}
    for cohort in (2, CLIENTS):
        peaks.clear()
        driver = cross_device(many_clients_root, tmp_path / f"cohort{cohort}", **{"federation.clients_per_round": cohort})
        driver.run()
        assert len(peaks) == cohort  # every update was folded
        model_bytes[cohort] = sum(t.numel() * t.element_size() for t in driver.state["weights"].values())
        peak[cohort] = max(peaks)
    one_model = model_bytes[2]
    # Old behaviour (every update of the round held until the aggregation) would add ~10 models.
    assert peak[CLIENTS] - peak[2] < one_model, (peak, one_model)


def test_checkpoints_hold_only_changed_clients_and_resume_exactly(ray_session, many_clients_root: Path, tmp_path: Path) -> None:
    settings = {"federation.clients_per_round": 3, "federation.rounds": 3, "eval.every": 3, "eval.clients": 4}
    full = cross_device(many_clients_root, tmp_path / "full", **settings).run()
    cut = tmp_path / "cut"
    cross_device(many_clients_root, cut, **settings).run(until=2)
    folder = checkpoints.latest(cut)
    assert folder.name == "round_0002"
    manifest = checkpoints.load_manifest(folder)
    per_file: dict[str, list[str]] = {}
    for cid, name in manifest["clients"].items():
        per_file.setdefault(name, []).append(cid)
    # only clients sampled in rounds 1-2 have a state on disk (at most 3 + 3); round 2's files hold round 2's cohort
    assert 3 <= len(manifest["clients"]) <= 6
    this_round = [cid for name, cids in per_file.items() if name.startswith("round_0002/") for cid in cids]
    assert len(this_round) == 3
    for name, cids in per_file.items():
        saved = checkpoints.load(cut / "checkpoints" / name)
        assert sorted(saved) == sorted(cids)
    assert checkpoints.verify(folder) is None  # every named file, with its size and sha256

    cfg = load_config(cut / "config.yaml")
    resumed = Driver(cfg, cut, echo=lambda _: None).run(resume=True)
    pd.testing.assert_frame_equal(full, resumed, check_exact=True)
    evaluated = set(full[(full["split"] == "test") & ~full["client"].str.startswith("mean")]["client"])
    assert len(evaluated) == 4  # eval.clients=4: a seeded subset, the same every evaluation


@pytest.mark.parametrize("method", ["fairlora", "fedadam"])
def test_fold_is_bit_identical_for_any_number_of_actors(method: str, ray_session, oph_root: Path, tmp_path: Path) -> None:
    """FairLoRA's group-weighted rows and FedAdam's moments, folded in client order: placement
    changes no bit. One actor against two (an uneven 2 + 1 split: sampled clients arrive from
    both, in either order); one client per actor is test_engine's layout case."""
    settings = {"algorithm.name": method, "federation.clients_per_round": 2, "eval.every": 2}
    runs = {n: make_driver(oph_root, tmp_path / f"{method}{n}", **settings, **{"resources.actors": n}).run() for n in (1, 2)}
    pd.testing.assert_frame_equal(runs[1], runs[2], check_exact=True)


def test_wire_format_round_trips_every_dtype_bit_for_bit() -> None:
    import numpy as np

    from raysim.engine.client_actor import from_wire, to_wire

    tensors = {
        "w": torch.randn(3, 4),
        "d": torch.randn(2, dtype=torch.float64),
        "n": torch.tensor(7),
        "half": torch.randn(5).half(),
        "bf16": torch.randn(5).bfloat16(),  # numpy has no bfloat16: travels as a tensor
    }
    wire = to_wire(tensors)
    assert isinstance(wire["w"], np.ndarray) and isinstance(wire["bf16"], torch.Tensor)
    for copy in (False, True):
        back = from_wire(wire, copy=copy)
        assert back.keys() == tensors.keys()
        for key, value in tensors.items():
            assert back[key].dtype == value.dtype and torch.equal(back[key], value)
    assert from_wire(wire, copy=True)["w"].data_ptr() != tensors["w"].data_ptr()
    assert from_wire(wire, copy=False)["w"].data_ptr() == tensors["w"].data_ptr()  # a view, no copy


def test_load_in_place_copies_only_what_may_differ_and_never_serves_stale_values() -> None:
    import timm

    from raysim.client.client import load_in_place

    model = timm.create_model("test_resnet", num_classes=2)
    shared = {k: v.clone() + 0.5 if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}
    own = {c: {k: v.clone() + i for k, v in shared.items() if k.endswith("num_batches_tracked")} for i, c in enumerate("ab", 1)}

    def expect(state: dict) -> None:
        now = model.state_dict()
        assert [k for k in state if not torch.equal(now[k], state[k])] == []

    copies: list[int] = []
    original = torch.nn.Module.load_state_dict

    def counted(self, state_dict, strict=True, **kw):  # noqa: ANN001 - torch's own signature
        copies.append(len(state_dict))
        return original(self, state_dict, strict=strict, **kw)

    torch.nn.Module.load_state_dict = counted  # type: ignore[method-assign]
    try:
        load_in_place(model, {**shared, **own["a"]})
        load_in_place(model, {**shared, **own["b"]})
        expect({**shared, **own["b"]})
        assert copies == [len(shared), len(own["b"])]  # the second client: its own tensors only
        model.train()
        model(torch.randn(2, 3, 16, 16)).sum().backward()  # BatchNorm statistics move, no version bump
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        load_in_place(model, {**shared, **own["a"]})
        expect({**shared, **own["a"]})
        original(model, {k: torch.zeros_like(v) for k, v in shared.items()})  # a load elsewhere (e.g. Ditto's)
        load_in_place(model, {**shared, **own["a"]})
        expect({**shared, **own["a"]})
        next(v for v in shared.values() if v.is_floating_point()).add_(1.0)  # a source changed in place
        load_in_place(model, {**shared, **own["a"]})
        expect({**shared, **own["a"]})
    finally:
        torch.nn.Module.load_state_dict = original  # type: ignore[method-assign]


def test_predict_splits_forwards_splits_together_and_matches_one_split_at_a_time(oph_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from raysim.client import client as client_module
    from raysim.datasets import DATASETS
    from raysim.engine.client_actor import ClientHost

    from helpers import load_config, tiny_overrides

    cfg = load_config(None, tiny_overrides(oph_root))
    source = DATASETS.get("fairfedmed_oph")(cfg.data, img_size=16, seed=0)
    client = ClientHost(cfg, source.client_specs()[:1]).clients["site1"]
    sizes = {s: len(client.shards[s].table) for s in ("val", "test")}
    monkeypatch.setattr(client_module, "EVAL_BATCH", sizes["val"] + 3)  # a chunk straddles val and test
    together = client.predict_splits(["val", "test"])
    for split, got in zip(("val", "test"), together):
        alone = client.predict(split)
        assert got.split == split and len(got.scores) == sizes[split]
        np.testing.assert_array_equal(got.sample_ids, alone.sample_ids)
        np.testing.assert_allclose(got.scores, alone.scores, rtol=1e-5, atol=1e-6)  # other batches: rounding only
