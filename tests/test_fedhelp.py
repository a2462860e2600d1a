"""FedHelp: its losses, roles, the private large model, the one-time foundation model, Ray runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from test_engine import make_driver

from raysim import config
from raysim.algorithms import ALGORITHMS
from raysim.algorithms.fedhelp import LARGE, TARGETS_FILE, FedHelpParams, backward_kd_loss, forward_kd_loss, rank_loss
from raysim.client_actor import ClientHost
from raysim.config import ConfigError
from raysim.datasets import DATASETS

from conftest import tiny_overrides

FM = "{backend: callable, target: 'fedhelp_fm:brightness'}"
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
    params = FedHelpParams(temperature=2.0)
    for loss_fn, trained, untouched in [(forward_kd_loss, proxy, large), (lambda s, l, y, p: backward_kd_loss(s, l, y, p, 2), large, proxy)]:
        proxy.zero_grad(set_to_none=True)
        large.zero_grad(set_to_none=True)
        loss_fn(proxy(x), large(x), y, params).backward()
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
    cfg = config.load(None, tiny_overrides(root, **{**TINY_FEDHELP, **extra}))
    source = DATASETS.get("fairfedmed_oph")(cfg.data, img_size=16, seed=0)
    algorithm = ALGORITHMS.get("fedhelp")(cfg.algorithm_params(), cfg)
    specs = algorithm.arrange_clients(source.client_specs())
    context = algorithm.prepare_run(source, specs, tmp_path, lambda _: None)
    return ClientHost(cfg, specs, context)


def test_roles_public_hold_out_and_no_large_tensor_in_any_update(oph_root: Path, tmp_path: Path) -> None:
    host = host_for(oph_root, tmp_path)
    roles = {cid: c.spec.role for cid, c in host.clients.items()}
    sizes = {cid: c.num_train for cid, c in host.clients.items()}
    largest = max(sizes, key=lambda c: (sizes[c], c))
    assert roles[largest] == "large" and sorted(roles.values()) == ["large", "small", "small"]
    public_ids = set(pd.read_parquet(tmp_path / TARGETS_FILE)["sample_id"])
    for cid, client in host.clients.items():
        train = {f"{cid}/{s}" for s in client.shards["train"].table.sample_ids}
        assert not train & public_ids  # public rows are held out of training
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
        config.load(None, tiny_overrides(oph_root, **{**TINY_FEDHELP, "algorithm.foundation": "{backend: nope}"})).algorithm_params()


def test_fedhelp_runs_through_ray_and_asks_the_foundation_model_once_across_resume(ray_session, oph_root: Path, tmp_path: Path, monkeypatch) -> None:
    log = tmp_path / "fm_calls.txt"
    monkeypatch.setenv("RAYSIM_TEST_FM_LOG", str(log))
    run_dir = tmp_path / "run"
    lines: list[str] = []
    make_driver(oph_root, run_dir, lines, **TINY_FEDHELP).run(until=1)
    assert log.read_text().count("\n") == 1
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
