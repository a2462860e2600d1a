"""LoRA / FairLoRA adapters and the FedLoRA / FairLoRA methods, without Ray."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from torch import nn

from raysim.algorithms import ALGORITHMS
from raysim.algorithms import params as algorithm_params
from raysim.algorithms.aggregation import weighted_average
from raysim.algorithms.fairlora import aggregate_singular_values, group_error_gap, share_first_half
from raysim.algorithms.fedlora import ema, ema_beta
from raysim.client.client import Client
from raysim.client.training import Batch, forward
from raysim.config import ConfigError
from raysim.datasets import DATASETS
from raysim.engine.client_actor import ClientHost
from raysim.models import adapters
from raysim.models.backbones import SliceFold
from raysim.types import Update, nbytes

from helpers import load_config, tiny_overrides


def random_fair_linear(own_weight: float = 0.7, groups: int = 3, rank: int = 6) -> adapters.FairLoRA:
    torch.manual_seed(0)
    layer = adapters.FairLoRA(nn.Linear(5, 4), rank, 2.0, num_groups=groups, own_weight=own_weight)
    with torch.no_grad():  # A = 0 at init would hide the low-rank path
        layer.lora_A.normal_()
        layer.lora_S.uniform_(0.1, 1.0)
    return layer


@pytest.mark.parametrize("own_weight", [0.7, 1.0])
def test_fairlora_forward_is_the_formula(own_weight: float) -> None:
    layer = random_fair_linear(own_weight)
    x = torch.randn(4, 5)
    codes = torch.tensor([0, 2, 1, -1])
    layer.codes = codes
    other = (1 - own_weight) / 2
    pi = torch.tensor([[own_weight, other, other], [other, other, own_weight], [other, own_weight, other], [1 / 3, 1 / 3, 1 / 3]])
    w0 = layer.base.weight.T
    expected = x @ w0 + layer.base.bias + (2.0 / 6) * ((x @ layer.lora_A) * (pi @ layer.lora_S)) @ layer.lora_B
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_fairlora_unset_groups_mix_uniformly_and_tokens_share_the_group() -> None:
    layer = random_fair_linear()
    x = torch.randn(2, 7, 5)  # (batch, tokens, features), as in a ViT MLP
    layer.codes = torch.tensor([-1, -1])
    uniform = layer(x)
    layer.codes = None
    assert torch.equal(layer(x), uniform)
    layer.codes = torch.tensor([1, -1])
    out = layer(x)
    assert torch.equal(out[1], uniform[1]) and not torch.allclose(out[0], uniform[0])


def test_one_hot_fairlora_equals_lora_with_b_scaled_by_the_groups_singular_values() -> None:
    fair = random_fair_linear(own_weight=1.0)
    lora = adapters.LoRA(fair.base, 6, 2.0)
    with torch.no_grad():
        lora.lora_A.copy_(fair.lora_A)
        lora.lora_B.copy_(fair.lora_S[2].view(-1, 1) * fair.lora_B)
    x = torch.randn(3, 5)
    fair.codes = torch.tensor([2, 2, 2])
    assert torch.allclose(fair(x), lora(x), atol=1e-6)


def test_conv_adapters_follow_the_convolution_geometry() -> None:
    torch.manual_seed(0)
    base = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
    lora = adapters.LoRA(base, 4, 4.0)
    x = torch.randn(2, 3, 9, 9)
    assert torch.equal(lora(x), base(x))  # B = 0 at init: training starts from W0
    with torch.no_grad():
        lora.lora_B.normal_()
    down = nn.functional.conv2d(x, lora.lora_A, stride=2, padding=1)
    assert torch.allclose(lora(x), base(x) + 1.0 * nn.functional.conv2d(down, lora.lora_B), atol=1e-5)
    # a 1x1 FairLoRA conv is the linear formula at every pixel
    fair = adapters.FairLoRA(nn.Conv2d(5, 4, 1), 6, 2.0, num_groups=3)
    with torch.no_grad():
        fair.lora_A.normal_()
    fair.codes = torch.tensor([1, 0])
    linear = adapters.FairLoRA(nn.Linear(5, 4), 6, 2.0, num_groups=3)
    with torch.no_grad():
        linear.base.weight.copy_(fair.base.weight.view(4, 5))
        linear.base.bias.copy_(fair.base.bias)
        linear.lora_A.copy_(fair.lora_A.view(6, 5).T)
        linear.lora_B.copy_(fair.lora_B.view(4, 6).T)
    linear.codes = torch.tensor([1, 0])
    x = torch.randn(2, 5, 3, 3)
    by_pixel = linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert torch.allclose(fair(x), by_pixel, atol=1e-5)


def test_fairlora_initialisation_and_validation() -> None:
    s = adapters.initial_singular_values(12, 3)
    v = torch.linspace(0.5, 0.1, 6)
    assert torch.equal(s[:, :6], v.expand(3, 6))  # the shared half starts equal
    assert torch.allclose(s[2, 6:], 0.2 * torch.roll(v, -4))  # g=2, step (12/2)//3 = 2
    assert len({tuple(row.tolist()) for row in s}) == 3
    layer = adapters.FairLoRA(nn.Linear(5, 4), 12, 2.0, num_groups=3)
    assert torch.equal(layer.lora_A, torch.zeros(5, 12)) and layer.lora_B.std() > 0.5
    for rank in (7, 4):
        with pytest.raises(ValueError, match="even and >= 2 x groups"):
            adapters.FairLoRA(nn.Linear(5, 4), rank, 2.0, num_groups=3)


def test_singular_values_aggregate_by_group_counts_and_share_their_first_half() -> None:
    previous = torch.tensor([[9.0, 9.0, 9.0, 9.0], [8.0, 8.0, 8.0, 8.0], [7.0, 7.0, 7.0, 7.0]])
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0], [5.0, 5.0, 5.0, 5.0]])
    b = torch.tensor([[3.0, 4.0, 5.0, 6.0], [2.0, 2.0, 2.0, 2.0], [6.0, 6.0, 6.0, 6.0]])
    counts = np.array([[1, 0, 0], [3, 2, 0]])  # client a: 1 of group 0; b: 3 of group 0, 2 of group 1; nobody has group 2
    rows = aggregate_singular_values([a, b], counts, previous)
    # group 0: (1*a + 3*b)/4; group 1: only b holds it; group 2: keeps the previous row
    assert torch.allclose(rows[0], torch.tensor([2.5, 3.5, 4.5, 5.5]))
    assert torch.equal(rows[1], b[1]) and torch.equal(rows[2], previous[2])
    shared = share_first_half(rows)
    assert torch.allclose(shared[:, :2], torch.tensor([(2.5 + 2 + 7) / 3, (3.5 + 2 + 7) / 3]).expand(3, 2))
    assert torch.equal(shared[:, 2:], rows[:, 2:])
    blended = ema({"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}, 0.25)
    assert blended["w"].item() == pytest.approx(0.75 * 1 + 0.25 * 3)


def test_fairness_loss_is_differentiable_and_zero_for_equal_errors() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]], requires_grad=True)
    labels = torch.tensor([0, 1, 1, 1])
    gap = group_error_gap(logits, labels, torch.tensor([0, 0, 1, 1]))
    p = torch.softmax(logits.detach(), 1)[torch.arange(4), labels]
    c0, c1 = 1 - (p[0] + p[1]) / 2, 1 - (p[2] + p[3]) / 2
    assert gap.item() == pytest.approx(abs(c0 - c1).item() / 2, rel=1e-6)
    gap.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    same = group_error_gap(torch.zeros(4, 2), labels, torch.tensor([0, 1, 0, 1]))
    assert same.item() == 0.0
    assert group_error_gap(logits, labels, torch.tensor([1, 1, -1, -1])).item() == 0.0  # one known group: no gap


def test_default_targets_per_architecture_never_the_stem() -> None:
    model = timm.create_model("test_resnet", num_classes=2)  # mixes basic and bottleneck blocks
    blocks = {n: type(m).__name__ for n, m in model.named_modules() if type(m).__name__ in ("BasicBlock", "Bottleneck")}
    expected = {f"{n}.{c}" for n, kind in blocks.items() for c in (("conv1", "conv2") if kind == "BasicBlock" else ("conv1", "conv3"))}
    assert set(blocks.values()) == {"BasicBlock", "Bottleneck"} and set(adapters.default_targets(model)) == expected
    vit = adapters.default_targets(timm.create_model("test_vit", num_classes=2))
    assert vit and all(n.startswith("blocks.") and n.endswith(("mlp.fc1", "mlp.fc2")) for n in vit)
    assert adapters.default_rank(timm.create_model("test_vit")) == (12, 2.0)


def test_fairlora_on_vit_b16_sends_under_3_percent_of_fedavg() -> None:
    cfg = load_config(None, ["data.name=synthetic", "model.name=vit_base_patch16_224", "model.img_size=224", "algorithm.name=fairlora"])
    source = DATASETS.get("synthetic")(cfg.data, img_size=224, seed=0)
    fairlora = ALGORITHMS.get("fairlora")(algorithm_params(cfg), cfg)
    model = fairlora.build_model(source)
    sent = nbytes(fairlora.payload(fairlora.init_state(model), 1))
    full = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)  # FedAvg sends every weight
    assert sent / full < 0.03
    adapted = [n for n, m in model.named_modules() if isinstance(m, adapters.FairLoRA)]
    assert len(adapted) == 24 and {n.rsplit(".", 1)[1] for n in adapted} == {"fc1", "fc2"}


def fairlora_host(root: Path, **extra: object) -> ClientHost:
    # 3 epochs: from a random init (last BN gamma 0, A = 0) gradients reach S only from the third step
    overrides = {"algorithm.name": "fairlora", "algorithm.rank": 6, "federation.optimizer": "adam", "federation.lr": 0.01, "federation.local_epochs": 3, **extra}
    cfg = load_config(None, tiny_overrides(root, **overrides))
    specs = DATASETS.get("fairfedmed_oph")(cfg.data, img_size=16, seed=0).client_specs()[:2]
    return ClientHost(cfg, specs)


def test_a_round_changes_only_adapters_head_and_bn_affine(oph_root: Path) -> None:
    host = fairlora_host(oph_root)
    algorithm = host.algorithm
    model = host.clients["site1"].model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = algorithm.init_state(model)
    payload = algorithm.payload(state, 1)
    assert not any(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in payload)
    update = host.fit("site1", payload, 1)
    after = model.state_dict()
    frozen = [k for k in before if k not in payload]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # backbone weights and BN statistics
    assert any(k.endswith("running_var") for k in frozen)
    changed = {k for k in payload if not torch.equal(update.tensors[k], payload[k])}
    assert any(k.endswith("lora_S") for k in changed) and any(k.endswith("lora_A") for k in changed) and "fc.weight" in changed
    counts = update.extra["group_counts"]
    codes = host.clients["site1"].shards["train"].table.attributes["race"]
    assert counts == [int((codes == g).sum()) for g in range(3)]


def test_fairlora_server_round_on_real_updates(oph_root: Path) -> None:
    host = fairlora_host(oph_root)
    algorithm = host.algorithm
    state = algorithm.init_state(host.clients["site1"].model)
    payload = algorithm.payload(state, 1)
    updates = [host.fit(cid, payload, 1) for cid in ("site1", "site2")]
    new = algorithm.aggregate(2, updates, state)["weights"]
    beta = 0.999 * (2 - 1) / 2  # round 2 of 2
    for key in (k for k in new if k.endswith("lora_S")):
        s = new[key]
        assert torch.equal(s[:, :3], s[:1, :3].expand_as(s[:, :3]))  # the shared half
        counts = np.array([u.extra["group_counts"] for u in updates], dtype=np.float64)
        rows = aggregate_singular_values([u.tensors[key] for u in updates], counts, state["weights"][key])
        expected = (1 - beta) * share_first_half(rows).double() + beta * state["weights"][key].double()
        assert torch.allclose(s.double(), expected, atol=1e-6)
    fc = (updates[0].tensors["fc.bias"].double() * updates[0].num_examples + updates[1].tensors["fc.bias"].double() * updates[1].num_examples) / (
        updates[0].num_examples + updates[1].num_examples
    )
    assert torch.allclose(new["fc.bias"].double(), (1 - beta) * fc + beta * state["weights"]["fc.bias"].double(), atol=1e-6)


def test_lambda_fair_zero_is_plain_cross_entropy(oph_root: Path) -> None:
    host = fairlora_host(oph_root, **{"algorithm.lambda_fair": 0.0})
    model = host.clients["site1"].model
    batch = next(host.clients["site1"].batches("train", batch_size=16, seed=0))
    assert torch.equal(host.algorithm.loss(model, batch), nn.functional.cross_entropy(forward(model, batch), batch.y))
    fair = fairlora_host(oph_root, **{"algorithm.lambda_fair": 2.0})
    assert fair.algorithm.loss(model, batch) > host.algorithm.loss(model, batch)


def test_bad_rank_is_a_config_error_naming_the_key(oph_root: Path) -> None:
    with pytest.raises(ConfigError, match=r"algorithm.rank: .*>= 2 x groups \(6 for 3 groups\), got 4"):
        fairlora_host(oph_root, **{"algorithm.rank": 4})
    with pytest.raises(ConfigError, match="algorithm.targets"):
        load_config(None, tiny_overrides(oph_root, **{"algorithm.name": "fedlora", "algorithm.targets": "['(']"})).algorithm_params()


def test_slice_fold_passes_each_volumes_group_to_all_its_slice_groups() -> None:
    torch.manual_seed(0)
    backbone = timm.create_model("test_vit", num_classes=2, img_size=16, in_chans=3)
    adapters.inject(backbone, adapters.default_targets(backbone), adapters.FairLoRA, rank=6, alpha=2.0, num_groups=3)
    for layer in adapters.fair_layers(backbone):
        with torch.no_grad():
            layer.lora_A.normal_()
    model = SliceFold(backbone, slices=12)
    x = torch.randn(2, 12, 16, 16)
    both = forward(model, Batch(x, torch.zeros(2, dtype=torch.long), {}, torch.arange(2), torch.tensor([0, 2])))
    alone = forward(model, Batch(x[1:], torch.zeros(1, dtype=torch.long), {}, torch.arange(1), torch.tensor([2])))
    assert torch.allclose(both[1], alone[0], atol=1e-5)



# --- initialisation: PEFT's bounds, and seeded by cfg.seed alone -----------------------------------


def test_lora_a_init_bound_is_one_over_sqrt_fan_in() -> None:
    """PEFT: kaiming_uniform(a=√5) on A as a layer weight (r, fan_in) gives bound 1/√fan_in."""
    torch.manual_seed(0)
    linear = adapters.LoRA(nn.Linear(3072, 768), 12, 2.0)  # ViT-B fc2: fan-in 3072, not r = 12
    bound = 1 / np.sqrt(3072)
    assert linear.lora_A.shape == (3072, 12)
    assert bound * 0.99 < linear.lora_A.abs().max().item() <= bound
    base = nn.Conv2d(64, 32, kernel_size=3, padding=1)
    torch.manual_seed(1)
    conv = adapters.LoRA(base, 8, 8.0)
    torch.manual_seed(1)
    expected = torch.empty(8, 64, 3, 3)
    nn.init.kaiming_uniform_(expected.view(8, -1), a=np.sqrt(5))  # conv adapters were right: unchanged
    assert torch.equal(conv.lora_A, expected) and conv.lora_A.abs().max().item() <= 1 / np.sqrt(64 * 9)


def build_adapted(root: Path, name: str, seed: int) -> dict[str, torch.Tensor]:
    overrides = {"algorithm.name": name, "algorithm.rank": 6, "seed": seed}
    cfg = load_config(None, tiny_overrides(root, **overrides))
    source = DATASETS.get("fairfedmed_oph")(cfg.data, img_size=16, seed=0)
    return ALGORITHMS.get(name)(algorithm_params(cfg), cfg).build_model(source).state_dict()


@pytest.mark.parametrize("name", ["fedlora", "fairlora"])
def test_adapter_init_depends_only_on_the_seed(oph_root: Path, name: str) -> None:
    global_rng = torch.get_rng_state()
    first = build_adapted(oph_root, name, seed=0)
    assert torch.equal(torch.get_rng_state(), global_rng)  # the process's RNG is left alone
    torch.rand(1000)  # unrelated RNG use between two runs in one process
    second = build_adapted(oph_root, name, seed=0)
    other = build_adapted(oph_root, name, seed=1)
    random_init = "lora_A" if name == "fedlora" else "lora_B"  # FairLoRA's A starts at 0
    keys = [k for k in first if k.endswith(random_init)]
    assert keys and all(torch.equal(first[k], second[k]) for k in first)
    assert all(not torch.equal(first[k], other[k]) for k in keys)


# --- the server's EMA, shared by FedLoRA and FairLoRA ---------------------------------------------


def lora_algorithm(name: str, rounds: int, **params: object):  # type: ignore[no-untyped-def]
    overrides = [f"algorithm.name={name}", f"federation.rounds={rounds}", "data.name=synthetic"] + [f"algorithm.{k}={v}" for k, v in params.items()]
    cfg = load_config(None, overrides)
    return ALGORITHMS.get(name)(algorithm_params(cfg), cfg)


def fake_updates() -> tuple[list[Update], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    tensors = [{"w": torch.randn(4, 3, generator=gen), "n": torch.tensor(k + 1)} for k in range(3)]
    updates = [Update(f"c{k}", t, num_examples=10 * (k + 1), extra={"group_counts": [1]}) for k, t in enumerate(tensors)]
    return updates, {"w": torch.randn(4, 3, generator=gen), "n": torch.tensor(0)}


def test_ema_schedule_starts_at_zero_and_ends_one_round_short() -> None:
    T = 6
    assert ema_beta(0.999, 1, T) == 0.0
    assert ema_beta(0.999, T, T) == pytest.approx(0.999 * (T - 1) / T)
    assert ema_beta(0.0, 4, T) == 0.0
    for bad in (0, T + 1):
        with pytest.raises(ValueError, match="round"):
            ema_beta(0.999, bad, T)
    assert lora_algorithm("fairlora", T).params.ema == 0.999 and lora_algorithm("fedlora", T).params.ema == 0.0
    for bad_ema in (1.0, -0.1):
        with pytest.raises(ConfigError, match="algorithm.ema"):
            lora_algorithm("fedlora", T, ema=bad_ema)


@pytest.mark.parametrize("round_", [1, 3, 4])
def test_fedlora_ema_blends_as_fairlora_and_zero_is_fedavg(round_: int) -> None:
    updates, previous = fake_updates()
    state = {"weights": previous}
    fedavg = weighted_average([u.tensors for u in updates], [u.num_examples for u in updates])
    plain = lora_algorithm("fedlora", 4).aggregate(round_, updates, state)["weights"]
    assert all(torch.equal(plain[k], fedavg[k]) for k in fedavg)  # ema = 0: bit for bit FedAvg
    lora = lora_algorithm("fedlora", 4, ema=0.999).aggregate(round_, updates, state)["weights"]
    fair = lora_algorithm("fairlora", 4).aggregate(round_, updates, state)["weights"]
    assert all(torch.equal(lora[k], fair[k]) for k in fair)  # one schedule, one blend
    beta = 0.999 * (round_ - 1) / 4
    expected = (1 - beta) * fedavg["w"].double() + beta * previous["w"].double()
    assert torch.allclose(lora["w"].double(), expected, atol=1e-6) and torch.equal(lora["n"], fedavg["n"])


# --- what a client keeps -------------------------------------------------------------------------


def test_client_keeps_only_what_differs_from_the_initial_state() -> None:
    model = nn.Linear(3, 2)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    client = Client(SimpleNamespace(id="a"), {}, model, initial_state=initial, channels=3, device=torch.device("cpu"))  # type: ignore[arg-type]
    client.keep()
    assert client.own_state == {}
    with torch.no_grad():
        model.bias.add_(1.0)
    client.keep()
    assert client.own_state.keys() == {"bias"} and torch.equal(client.load({})(torch.ones(1, 3)), model(torch.ones(1, 3)))
    with torch.no_grad():
        model.bias.copy_(initial["bias"])
    client.keep({"bias"})
    assert client.own_state == {}  # back at its initial value: dropped again
    with torch.no_grad():
        model.weight.add_(1.0)
    assert all(torch.equal(v, initial[k]) for k, v in client.load({}).state_dict().items())


def test_adapter_clients_do_not_copy_the_frozen_backbone(oph_root: Path) -> None:
    cfg = load_config(None, tiny_overrides(oph_root, **{"algorithm.name": "fedlora", "algorithm.rank": 4}))
    specs = DATASETS.get("fairfedmed_oph")(cfg.data, img_size=16, seed=0).client_specs()[:1]
    host = ClientHost(cfg, specs)
    client = host.clients["site1"]
    state = host.algorithm.init_state(client.model)
    payload = host.algorithm.payload(state, 1)
    host.fit("site1", payload, 1)
    frozen = set(client.model.state_dict()) - set(payload)
    assert frozen and not frozen & set(client.own_state)
    assert nbytes(client.own_state) < 0.01 * nbytes(client.model.state_dict())
    loaded = client.load(payload).state_dict()
    assert all(torch.equal(loaded[k], client.initial_state[k]) for k in frozen)
