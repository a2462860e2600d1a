"""FedHelp: its losses, roles, the public set, both models' weights, the one-time foundation model, Ray runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch

from raysim.algorithms import ALGORITHMS
from raysim.algorithms import params as algorithm_params
from raysim.algorithms.fedhelp import LARGE, TARGETS_FILE, FedHelpParams, backward_kd_loss, forward_kd_loss, rank_loss
from raysim.algorithms.fedhelp_public import PUBLIC_PATIENTS, PUBLIC_SEED
from raysim.client.pretraining import PretrainSettings
from raysim.client.training import Batch
from raysim.config import ConfigError, ModelConfig
from raysim.datasets import DATASETS
from raysim.datasets.synthetic import generate
from raysim.engine.client_actor import ClientHost
from raysim.models.backbones import build_model

from helpers import FM, TINY, load_config, make_driver, tiny_overrides

TINY_FEDHELP = {
    "algorithm.name": "fedhelp",
    "algorithm.top_n": 1,
    "algorithm.small_model": "test_resnet",
    "algorithm.large_model": "test_vit",
    "algorithm.foundation": FM,
}


def test_forward_kd_trains_only_the_proxy_and_backward_kd_only_the_large_model() -> None:
    torch.manual_seed(0)
    proxy, large = timm.create_model("test_resnet", num_classes=3), timm.create_model("test_vit", num_classes=3, img_size=16)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 1])
    batch = Batch(x, y, {}, torch.arange(4))
    params = FedHelpParams(temperature=2.0)
    for loss_fn, trained, untouched in [(forward_kd_loss, proxy, large), (lambda s, l, b, p: backward_kd_loss(s, l, b, p, 2), large, proxy)]:
        proxy.zero_grad(set_to_none=True)
        large.zero_grad(set_to_none=True)
        loss_fn(proxy(x), large(x), batch, params).backward()
        assert all(p.grad is None or not p.grad.any() for p in untouched.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.parameters())


def test_rank_loss_is_zero_when_the_large_model_already_ranks_the_proxys_top_k_first() -> None:
    proxy = torch.tensor([[3.0, 2.0, 0.0, -1.0]])  # top-2: classes 0 and 1
    assert rank_loss(torch.tensor([[5.0, 4.0, 1.0, 0.0]]), proxy, k=2).item() == 0.0
    # large model puts class 2 above class 1: ReLU(z2 - z1) = 1, (1/2k) = 1/4
    assert rank_loss(torch.tensor([[5.0, 1.0, 2.0, 0.0]]), proxy, k=2).item() == pytest.approx(0.25)
    # margin 3.5: only (i=1, j=2) is inside the margin: ReLU(1 - 4 + 3.5) = 0.5, / (2k) = 0.125
    assert rank_loss(torch.tensor([[5.0, 4.0, 1.0, 0.0]]), proxy, k=2, margin=3.5).item() == pytest.approx(0.125)


def test_rank_loss_hand_value_binary() -> None:
    # k = 1 on a binary task: (1/2) ReLU(z_other - z_top)
    loss = rank_loss(torch.tensor([[0.0, 2.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]), k=1)
    assert loss.item() == pytest.approx((0.5 * 2.0 + 0.0) / 2)


def host_for(root: Path, tmp_path: Path, **extra: object) -> ClientHost:
    cfg = load_config(None, tiny_overrides(root, **{**TINY_FEDHELP, **extra}))
    source = DATASETS.get("fairfedmed_oph")(cfg.data, img_size=16, seed=0)
    algorithm = ALGORITHMS.get("fedhelp")(algorithm_params(cfg), cfg)
    specs = algorithm.arrange_clients(source.client_specs())
    context = algorithm.prepare_run(source, specs, tmp_path, lambda _: None)
    return ClientHost(cfg, specs, context)


def test_roles_and_no_large_tensor_in_any_update(oph_root: Path, tmp_path: Path) -> None:
    host = host_for(oph_root, tmp_path)
    roles = {cid: c.spec.role for cid, c in host.clients.items()}
    sizes = {cid: c.num_train for cid, c in host.clients.items()}
    largest = max(sizes, key=lambda c: (sizes[c], c))
    assert roles[largest] == "large" and sorted(roles.values()) == ["large", "small", "small"]
    algorithm = host.algorithm
    state = algorithm.init_state(host.clients[largest].model)
    payload = algorithm.payload(state, 1)
    assert payload and not any(k.startswith("public_head.") for k in payload)
    update = host.fit(largest, payload, 1)
    large_state = host.clients[largest].memory[LARGE]
    assert update.tensors.keys() == payload.keys() and not set(update.tensors) & set(large_state)
    assert {tuple(t.shape) for t in update.tensors.values()} <= {tuple(t.shape) for t in payload.values()}
    # the large model trained and is what the large client is scored with
    assert any(not torch.equal(v, algorithm._large_init[k]) for k, v in large_state.items() if v.is_floating_point())
    assert host.algorithm.eval_model(host.clients[largest], payload) is algorithm._large_net
    small = next(c for c, r in roles.items() if r == "small")
    small_update = host.fit(small, payload, 1)
    assert LARGE not in host.clients[small].memory and small_update.tensors.keys() == payload.keys()
    assert any(k.startswith("public_head.") for k in host.clients[small].own_state)  # h_pub stays with its client


def test_uniform_server_mean_by_default(oph_root: Path, tmp_path: Path) -> None:
    host = host_for(oph_root, tmp_path)
    state = host.algorithm.init_state(host.clients["site1"].model)
    payload = host.algorithm.payload(state, 1)
    updates = [host.fit(c, payload, 1) for c in ("site1", "site2")]
    merged = host.algorithm.aggregate(1, updates, state)["weights"]
    key = "net.fc.bias"
    assert torch.allclose(merged[key].double(), (updates[0].tensors[key].double() + updates[1].tensors[key].double()) / 2)


def test_bad_settings_fail_before_training(oph_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top_n=3 leaves no small client among 3 clients"):
        host_for(oph_root, tmp_path, **{"algorithm.top_n": 3})
    with pytest.raises(ConfigError, match="unknown foundation model .nope."):
        load_config(None, tiny_overrides(oph_root, **{**TINY_FEDHELP, "algorithm.foundation": "{backend: nope}"})).algorithm_params()


def test_fedhelp_runs_through_ray_and_asks_the_foundation_model_once_across_resume(ray_session, oph_root: Path, tmp_path: Path, monkeypatch) -> None:
    log = tmp_path / "fm_calls.txt"
    monkeypatch.setenv("RAYSIM_TEST_FM_LOG", str(log))
    run_dir = tmp_path / "run"
    lines: list[str] = []
    make_driver(oph_root, run_dir, lines, **TINY_FEDHELP).run(until=1)
    assert log.read_text().count("\n") == 1
    ids = public_ids(run_dir)  # D_pub: the synthetic public population, read by every actor itself
    assert log.read_text() == f"{len(ids)}\n" and all("/public_" in i for i in ids)
    assert any(line.startswith("fedhelp: public set D_pub: the synthetic public population") for line in lines)
    make_driver(oph_root, run_dir, lines, **TINY_FEDHELP).run(resume=True)
    assert log.read_text().count("\n") == 1  # the resumed run read the stored targets
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    test = metrics[(metrics["split"] == "test") & (metrics["round"] == 2) & (metrics["attribute"] == "") & (metrics["metric"] == "acc")]
    assert set(test["client"]) == {"site1", "site2", "site3", "mean", "mean:large", "mean:small"}
    roles = dict(zip(test["client"], test["role"]))
    assert sorted(roles[c] for c in ("site1", "site2", "site3")) == ["large", "small", "small"]
    small = [c for c in ("site1", "site2", "site3") if roles[c] == "small"]
    assert test.set_index("client")["value"]["mean:small"] == pytest.approx(np.mean([test.set_index("client")["value"][c] for c in small]))
    console = "\n".join(lines)
    assert "(large)" in console and "(small)" in console and "Acc" in console


# --- the public set comes from outside the clients (issue 11, defect 4) -------------------------


def train_ids(root: Path, algorithm: str, **extra: object) -> dict[str, list[str]]:
    """Each client's training sample ids after `algorithm` arranged the clients (no pixels read)."""
    method = TINY_FEDHELP if algorithm == "fedhelp" else {"algorithm.name": algorithm}
    cfg = load_config(None, tiny_overrides(root, **{**method, **extra}))
    source = DATASETS.get(cfg.data.name)(cfg.data, img_size=16, seed=cfg.seed)
    specs = ALGORITHMS.get(algorithm)(algorithm_params(cfg), cfg).arrange_clients(source.client_specs())
    return {s.id: list(s.splits["train"].sample_ids) for s in specs}


def public_ids(run_dir: Path) -> list[str]:
    return list(pd.read_parquet(run_dir / TARGETS_FILE)["sample_id"])


def test_public_fraction_is_gone_and_its_error_names_the_replacement(oph_root: Path) -> None:
    with pytest.raises(ConfigError, match="public_fraction was removed.*algorithm.public"):
        load_config(None, tiny_overrides(oph_root, **{**TINY_FEDHELP, "algorithm.public_fraction": 0.1})).algorithm_params()


def test_clients_train_on_fedavgs_rows_and_the_default_public_set_is_the_public_population(oph_root: Path, tmp_path: Path) -> None:
    for extra in ({}, {"data.partition": "quantity", "data.ratios": "[0.5, 0.3, 0.2]"}):
        assert train_ids(oph_root, "fedhelp", **extra) == train_ids(oph_root, "fedavg", **extra)
    host = host_for(oph_root, tmp_path)
    assert {cid: list(c.shards["train"].table.sample_ids) for cid, c in host.clients.items()} == train_ids(oph_root, "fedavg")
    ids = public_ids(tmp_path)
    assert 300 <= len(ids) <= PUBLIC_PATIENTS and all("/public_" in i for i in ids)  # the generator's public population
    assert PUBLIC_SEED != PretrainSettings().seed  # not the patients the foundation model trained on
    private = {f"{cid}/{split}/{s}" for cid, c in host.clients.items() for split, shard in c.shards.items() for s in shard.table.sample_ids}
    assert not private & set(ids)


def test_a_held_out_site_is_no_client_and_its_rows_are_the_public_set(oph_root: Path, tmp_path: Path) -> None:
    extra = {"algorithm.public": "{site: site3}"}
    fedavg = train_ids(oph_root, "fedavg")
    assert train_ids(oph_root, "fedhelp", **extra) == {c: fedavg[c] for c in ("site1", "site2")}
    host = host_for(oph_root, tmp_path, **extra)
    assert sorted(c.spec.role for c in host.clients.values()) == ["large", "small"]
    cfg = load_config(None, tiny_overrides(oph_root))
    site3 = next(s for s in DATASETS.get("fairfedmed_oph")(cfg.data, img_size=16, seed=0).client_specs() if s.id == "site3")
    assert sorted(public_ids(tmp_path)) == sorted(f"site3/{split}/{s}" for split, t in site3.splits.items() for s in t.sample_ids)
    with pytest.raises(ConfigError, match="site='site9' is not a client of this data; its clients: site1, site2, site3"):
        train_ids(oph_root, "fedhelp", **{"algorithm.public": "{site: site9}"})


def test_a_public_source_is_read_by_each_actor_and_may_not_be_the_clients_data(oph_root: Path, tmp_path: Path) -> None:
    other = tmp_path / "public-set"
    generate(other, **{**TINY, "seed": 11})
    host = host_for(oph_root, tmp_path, **{"algorithm.public": f"{{name: fairfedmed_oph, root: '{other}'}}"})
    ids = public_ids(tmp_path)
    assert {i.split("/")[1] for i in ids} == {"train", "val"}  # the source's training split on disk; its test rows stay out
    small = next(cid for cid, c in host.clients.items() if c.spec.role == "small")
    host.fit(small, host.algorithm.payload(host.algorithm.init_state(host.clients[small].model), 1), 1)
    assert [f"{i.split('/')[0]}/{i.split('/')[1]}/{s}" for i, s in zip(ids, host.algorithm._public.table.sample_ids)] == ids  # the actor read the labelled rows
    with pytest.raises(ConfigError, match="overlaps the clients' data .*both read"):
        host_for(oph_root, tmp_path / "x", **{"algorithm.public": f"{{name: fairfedmed_oph, root: '{oph_root}'}}"})


def test_a_public_set_inside_the_foundation_models_training_pool_fails_naming_both(oph_root: Path, tmp_path: Path) -> None:
    built_in = "{backend: timm, model: test_resnet}"  # raysim.pretrain's backbone: the check runs before it is built
    with pytest.raises(ConfigError, match="generator seed 0.*overlaps the foundation model's training pool .raysim.pretrain.*generator seed 0.*in-sample"):
        host_for(oph_root, tmp_path, **{"algorithm.public": "{patients: 60, generator_seed: 0}", "algorithm.foundation": built_in})
    other = tmp_path / "public-set"
    generate(other, **{**TINY, "seed": 11})
    pool = tmp_path / "pool"
    (pool / "all").mkdir(parents=True)
    (pool / "all" / "data_00001.npz").symlink_to(other / "all" / "data_00001.npz")
    weights = tmp_path / "fm.pth"
    weights.write_bytes(b"")
    Path(f"{weights}.json").write_text(json.dumps({"created_by": "raysim.pretrain", "pool": {"population": "public", "seed": 0}, "pool_root": str(pool)}))
    with pytest.raises(ConfigError, match="overlaps the foundation model's training pool .the pool raysim.pretrain trained .*fm.pth.*1 sample files are shared"):
        host_for(oph_root, tmp_path, **{"algorithm.public": f"{{name: fairfedmed_oph, root: '{other}'}}", "algorithm.foundation": f"{{backend: timm, model: test_resnet, weights: '{weights}'}}"})


# --- each model its own weights file (issue 11, defect 5) -----------------------------------------


def weights_file(tmp_path: Path, name: str) -> Path:
    net = build_model(ModelConfig(name=name, img_size=16), num_classes=2, in_chans=1, seed=7)
    path = tmp_path / f"{name}.pth"
    torch.save(net.state_dict(), path)
    return path


def test_model_weights_go_to_the_small_model_and_large_weights_to_the_large_one(oph_root: Path, tmp_path: Path) -> None:
    small_file, large_file = weights_file(tmp_path, "test_resnet"), weights_file(tmp_path, "resnet10t")
    host = host_for(oph_root, tmp_path, **{"algorithm.large_model": "resnet10t", "model.weights": str(small_file)})
    largest = next(cid for cid, c in host.clients.items() if c.spec.role == "large")
    small_state, saved = host.clients[largest].model.net.state_dict(), torch.load(small_file)
    assert all(torch.equal(small_state[k], v) for k, v in saved.items() if not k.startswith("fc."))
    host.fit(largest, host.algorithm.payload(host.algorithm.init_state(host.clients[largest].model), 1), 1)  # used to fail here, every round
    host = host_for(oph_root, tmp_path / "b", **{"algorithm.large_model": "resnet10t", "algorithm.large_weights": str(large_file)})
    large = host.algorithm._large(host.clients[largest]).state_dict()
    assert all(torch.equal(large[k], v) for k, v in torch.load(large_file).items() if not k.startswith("fc."))


@pytest.mark.parametrize(("key", "model", "file_of"), [("algorithm.large_weights", "resnet10t", "test_resnet"), ("model.weights", "test_resnet", "resnet10t"), ("model.weights", "test_resnet", "test_vit")])
def test_a_weights_file_that_does_not_fit_fails_before_training_naming_file_and_model(oph_root: Path, tmp_path: Path, key: str, model: str, file_of: str) -> None:
    path = weights_file(tmp_path, file_of)  # test_vit's keys are all unexpected in test_resnet: timm alone would load nothing, silently
    with pytest.raises(ConfigError, match=rf"^{key}={path} does not fit {model}: \S"):
        host_for(oph_root, tmp_path, **{"algorithm.large_model": "resnet10t", key: str(path)})
