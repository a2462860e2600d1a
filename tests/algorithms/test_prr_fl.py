"""PRR-FL's PFA (Fourier aggregation of personal models) and DET (personal + deputy models):
the Fourier-domain formulas on plain clients, the client halves on the tiny set; no Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raysim.algorithms import ALGORITHMS
from raysim.algorithms import params as algorithm_params
from raysim.algorithms.det import EXCHANGE, PERSONAL, RECOVER, SUBLIMATE, Pair, next_stage
from raysim.algorithms.pfa import PFA, PREFIX, as_matrix, box, from_matrix, shifted_spectrum
from raysim.client.client import Client
from raysim.client.training import Batch
from raysim.config import ConfigError
from raysim.datasets.base import ClientSpec
from raysim.types import Update

from helpers import load_config, make_host, start, tiny_overrides

CLIENTS = ("c0", "c1", "c2")


class Net(nn.Module):
    """A non-square conv, BatchNorm, a linear layer with a bias: every kind of tensor PFA treats differently."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).mean(dim=(2, 3)))


def pfa(fraction: float, rounds: int = 4) -> PFA:
    cfg = load_config(None, ["algorithm.name=pfa", "data.name=synthetic", f"federation.rounds={rounds}", f"algorithm.box_start={fraction}", f"algorithm.box_end={fraction}"])
    return ALGORITHMS.get("pfa")(algorithm_params(cfg), cfg)


def clients(weights: list[dict[str, torch.Tensor]]) -> list[Client]:
    """Clients sharing one model (as in an actor), each holding its own values of every tensor."""
    torch.manual_seed(0)
    model = Net()
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = []
    for cid, own in zip(CLIENTS, weights):
        client = Client(ClientSpec(cid, {}), {}, model, initial_state=initial, channels=3, device=torch.device("cpu"))
        client.own_state = {k: v.clone() for k, v in own.items()}
        out.append(client)
    return out


def random_weights(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v + seed for k, v in Net().state_dict().items()}


def pfa_round(algorithm: PFA, members: list[Client], round_: int = 1) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Every client sends its boxes, the server folds them; (payload, each client's weights once it applied the payload)."""
    fraction = algorithm.box_fraction(round_)
    state = algorithm.init_state(members[0].model)
    updates = [Update(c.id, algorithm.shared(c.load({}), fraction), 10 * (i + 1), {}) for i, c in enumerate(members)]
    payload = dict(algorithm.payload(algorithm.aggregate(round_, updates, state), round_ + 1))
    after = {c.id: {k: v.detach().clone() for k, v in algorithm.received_model(c, payload).state_dict().items()} for c in members}
    return payload, after


# --- PFA: the Fourier-domain formulas ------------------------------------------------------------


def test_the_2d_view_is_the_official_layout_and_inverts() -> None:
    conv = torch.randn(6, 3, 3, 5)
    matrix = as_matrix(conv)
    assert torch.equal(matrix, conv.permute(1, 2, 3, 0).reshape(3 * 3, 5 * 6))  # (C_in·k_h) × (k_w·C_out)
    assert torch.equal(from_matrix(matrix, conv.shape), conv)
    linear, conv1d = torch.randn(5, 7), torch.randn(4, 2, 3)
    assert as_matrix(linear) is linear and torch.equal(from_matrix(as_matrix(conv1d), conv1d.shape), conv1d)


def test_the_box_is_symmetric_around_frequency_zero_and_grows_with_the_schedule() -> None:
    assert box(9, 0.7) == slice(1, 8)  # floor(3.15) = 3: frequencies -3..3 around index 4
    assert box(48, 0.7) == slice(8, 41)  # -16..16 around index 24
    assert box(2, 0.7) == slice(1, 1) and box(9, 0.0) == slice(4, 4)  # floor(L·n/2) = 0: nothing (a binary head's 2 rows)
    assert box(4, 1.0) == slice(0, 4) and box(5, 1.0) == slice(0, 5)  # L = 1: every frequency
    algorithm = ALGORITHMS.get("pfa")(ALGORITHMS.get("pfa").Params(), load_config(None, ["algorithm.name=pfa", "data.name=synthetic", "federation.rounds=50"]))
    assert algorithm.params.box_start == 0.7 and algorithm.params.box_end == 0.95
    assert algorithm.box_fraction(1) == 0.7  # the official a_iter = 0
    assert algorithm.box_fraction(50) == pytest.approx(0.7 + 49 / 50 * 0.25)


def test_an_empty_box_leaves_every_weight_unchanged() -> None:
    members = clients([random_weights(s) for s in (1, 2, 3)])
    payload, after = pfa_round(pfa(0.0), members)
    assert all(payload[PREFIX + k].numel() == 0 for k in ("conv.weight", "fc.weight"))
    mean_bias = torch.stack([c.own_state["fc.bias"] for c in members]).mean(0)
    for c in members:
        assert all(torch.equal(after[c.id][k], c.own_state[k]) for k in c.own_state if k != "fc.bias")
        torch.testing.assert_close(after[c.id]["fc.bias"], mean_bias)  # biases take the plain mean (official code)


@pytest.mark.parametrize("fraction", [0.3, 0.7, 0.95, 1.0])
def test_identical_clients_come_back_unchanged_for_any_box(fraction: float) -> None:
    same = random_weights(7)
    members = clients([same, same, same])
    payload, after = pfa_round(pfa(fraction), members)
    assert payload[PREFIX + "conv.weight"].numel() > 0
    for c in members:
        assert all(torch.equal(after[c.id][k], same[k]) for k in same), c.id


def test_clients_share_the_box_amplitude_and_keep_their_phase_and_high_frequencies() -> None:
    members = clients([random_weights(s) for s in (1, 2, 3)])
    before = {c.id: dict(c.own_state) for c in members}
    payload, after = pfa_round(pfa(0.7), members)
    for key in ("conv.weight", "fc.weight"):
        mean = payload[PREFIX + key].double()
        n_rows, n_cols = as_matrix(before["c0"][key]).shape
        rows, cols = box(n_rows, 0.7), box(n_cols, 0.7)
        assert mean.shape == (rows.stop - rows.start, cols.stop - cols.start) and mean.numel() < n_rows * n_cols
        inside = torch.zeros(n_rows, n_cols, dtype=torch.bool)
        inside[rows, cols] = True
        for c in members:
            old, new = shifted_spectrum(before[c.id][key]), shifted_spectrum(after[c.id][key])
            torch.testing.assert_close(new.abs()[inside].view_as(mean), mean, rtol=1e-5, atol=1e-5)  # the shared mean
            torch.testing.assert_close(new.abs()[~inside], old.abs()[~inside], rtol=1e-5, atol=1e-5)  # its own high frequencies
            torch.testing.assert_close(new / new.abs(), old / old.abs(), rtol=1e-4, atol=1e-4)  # its own phase everywhere
        assert not torch.equal(after["c0"][key], after["c1"][key])  # still personal weights
        own_amp = torch.stack([shifted_spectrum(before[c.id][key]).abs()[inside] for c in members]).mean(0)
        torch.testing.assert_close(mean, own_amp.view_as(mean), rtol=1e-6, atol=1e-6)  # Ā: the plain mean of the clients'
    assert all(torch.equal(after[c.id][k], before[c.id][k]) for c in members for k in ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"))


# --- PFA: the client half on the tiny set --------------------------------------------------------


def module_keys(model: nn.Module, kinds: tuple[type[nn.Module], ...], names: tuple[str, ...]) -> set[str]:
    return {f"{prefix}.{n}" for prefix, m in model.named_modules() if isinstance(m, kinds) for n in names}


def test_pfa_clients_keep_their_model_and_batchnorm_and_are_scored_with_it(oph_root: Path) -> None:
    host = make_host(oph_root, "pfa")
    site1, site2 = host.clients["site1"], host.clients["site2"]
    state, payload = start(host)
    spectral = module_keys(site1.model, (nn.Conv2d, nn.Linear), ("weight",))
    batchnorm = module_keys(site1.model, (nn.BatchNorm2d,), ("weight", "bias", "running_mean", "running_var"))
    assert set(payload) == {PREFIX + k for k in spectral} | {"fc.bias"}  # BatchNorm never travels
    assert all(payload[PREFIX + k].numel() == 0 for k in spectral)  # round 1: everyone starts from the same model
    updates = [host.fit("site1", payload, 1), host.fit("site2", payload, 1)]
    assert all(u.tensors.keys() == payload.keys() for u in updates)
    assert updates[0].tensors[PREFIX + "layer1.0.conv1.weight"].shape == (67, 67)  # 96 × 96 view, L_1 = 0.7: |f| <= 33
    trained = {c.id: dict(c.own_state) for c in (site1, site2)}  # the whole model is the client's own
    assert any(not torch.equal(trained["site1"][k], trained["site2"][k]) for k in batchnorm)
    merged = dict(host.algorithm.payload(host.algorithm.aggregate(1, updates, state), 2))
    for client in (site1, site2):
        host.evaluate(client.id, merged, ["test"])  # scored with its own model, the latest mean applied
        scored = client.model.state_dict()
        assert all(torch.equal(scored[k], trained[client.id][k]) for k in batchnorm)  # BatchNorm untouched by aggregation
        assert not torch.equal(scored["layer1.0.conv1.weight"], trained[client.id]["layer1.0.conv1.weight"])  # its box replaced
        assert torch.equal(scored["fc.weight"], trained[client.id]["fc.weight"])  # a binary head's 2 rows: floor(0.7·2/2) = 0, no box
        assert torch.equal(scored["fc.bias"], merged["fc.bias"])
        assert client.own_state.keys() == trained[client.id].keys() and all(torch.equal(client.own_state[k], v) for k, v in trained[client.id].items())
    host.evaluate("site1", merged, ["test"])
    site1_scored = {k: v.clone() for k, v in site1.model.state_dict().items()}
    host.evaluate("site2", merged, ["test"])
    assert not torch.equal(site1_scored["layer1.0.conv1.weight"], site2.model.state_dict()["layer1.0.conv1.weight"])  # personal weights


# --- DET -----------------------------------------------------------------------------------------


def test_the_stage_rule_at_its_boundaries() -> None:
    """The official inequalities: Recover below α1·F_p, Sublimate from α2·F_p on, only after an Exchange epoch."""
    a1, a2 = 0.7, 0.9
    assert next_stage(0, 1.0, 1.0, a1, a2) == RECOVER  # a round's first epoch, whatever the F1s
    assert next_stage(RECOVER, 0.7, 1.0, a1, a2) == EXCHANGE  # F_d = α1·F_p is not below α1
    assert next_stage(RECOVER, 0.6999, 1.0, a1, a2) == RECOVER
    assert next_stage(RECOVER, 0.95, 1.0, a1, a2) == EXCHANGE  # out of Recover always through Exchange
    assert next_stage(EXCHANGE, 0.8999, 1.0, a1, a2) == EXCHANGE
    assert next_stage(EXCHANGE, 0.9, 1.0, a1, a2) == SUBLIMATE  # F_d = α2·F_p sublimates
    assert next_stage(SUBLIMATE, 0.9, 1.0, a1, a2) == SUBLIMATE
    assert next_stage(SUBLIMATE, 0.8999, 1.0, a1, a2) == EXCHANGE
    assert next_stage(SUBLIMATE, 0.6999, 1.0, a1, a2) == next_stage(EXCHANGE, 0.6999, 1.0, a1, a2) == RECOVER
    assert next_stage(EXCHANGE, 0.35, 0.5, a1, a2) == EXCHANGE and next_stage(EXCHANGE, 0.34, 0.5, a1, a2) == RECOVER  # the ratio F_d/F_p


def det(**extra: object):  # type: ignore[no-untyped-def]
    cfg = load_config(None, ["algorithm.name=det", "data.name=synthetic", *[f"{k}={v}" for k, v in extra.items()]])
    return ALGORITHMS.get("det")(algorithm_params(cfg), cfg)


def kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) ‖ softmax(student)) / batch, written out."""
    q = F.softmax(teacher.detach(), dim=1)
    return (q * (q.log() - F.log_softmax(student, dim=1))).sum() / len(student)


@pytest.mark.parametrize("stage", [RECOVER, EXCHANGE, SUBLIMATE])
def test_each_stage_distils_in_its_direction_only(stage: int) -> None:
    algorithm = det()
    torch.manual_seed(0)
    pair = Pair(nn.Linear(4, 3), nn.Linear(4, 3))
    batch = Batch(torch.randn(8, 4), torch.randint(0, 3, (8,)), {}, torch.arange(8))
    algorithm.stage = stage
    algorithm.pair_loss(pair, batch).backward()
    lp, ld = pair.personal(batch.x), pair.deputy(batch.x)
    ce_p, ce_d = F.cross_entropy(lp, batch.y), F.cross_entropy(ld, batch.y)
    p_params, d_params = list(pair.personal.parameters()), list(pair.deputy.parameters())
    ce_only_p, ce_only_d = torch.autograd.grad(ce_p, p_params, retain_graph=True), torch.autograd.grad(ce_d, d_params, retain_graph=True)
    with_kl_p = torch.autograd.grad(ce_p + kl(lp, ld), p_params, retain_graph=True)  # P learns from D
    with_kl_d = torch.autograd.grad(ce_d + kl(ld, lp), d_params)  # D learns from P
    expected_p = ce_only_p if stage == RECOVER else with_kl_p
    expected_d = ce_only_d if stage == SUBLIMATE else with_kl_d
    for p, g in zip(p_params + d_params, [*expected_p, *expected_d]):
        torch.testing.assert_close(p.grad, g)
    assert not torch.allclose(with_kl_p[0], ce_only_p[0]) and not torch.allclose(with_kl_d[0], ce_only_d[0])  # the KL terms act


def test_det_trains_both_models_sends_the_deputy_and_scores_the_personal_one(oph_root: Path) -> None:
    host = make_host(oph_root, "det", **{"federation.local_epochs": 3})
    algorithm, site1, site2 = host.algorithm, host.clients["site1"], host.clients["site2"]
    _, payload = start(host)
    stages: list[int] = []
    loss = algorithm.pair_loss
    algorithm.pair_loss = lambda model, batch: (stages.append(algorithm.stage), loss(model, batch))[1]  # type: ignore[method-assign]
    update = host.fit("site1", payload, 1)
    steps = int(update.metrics["steps"])
    per_epoch = [stages[i * steps // 3 : (i + 1) * steps // 3] for i in range(3)]
    assert len(stages) == steps and all(len(set(e)) == 1 for e in per_epoch) and per_epoch[0][0] == RECOVER
    assert per_epoch[1][0] in (RECOVER, EXCHANGE) and update.metrics["stage"] == per_epoch[2][0]
    deputy = site1.load({})  # the deputy is the client's own model in PFA's sense, and it is what was sent
    sent = algorithm.shared(deputy, algorithm.box_fraction(1))
    assert update.tensors.keys() == payload.keys() and all(torch.equal(update.tensors[k], sent[k]) for k in sent)
    personal = site1.memory[PERSONAL]
    assert personal.keys() == site1.model.state_dict().keys()
    assert any(not torch.equal(personal[k], site1.own_state[k]) for k in site1.own_state)  # two different models
    host.evaluate("site1", payload, ["test"])
    assert all(torch.equal(v, personal[k]) for k, v in site1.model.state_dict().items())  # scored with P
    host.evaluate("site2", payload, ["test"])  # never trained: its personal model is the initial one
    assert all(torch.equal(v, site2.initial_state[k]) for k, v in site2.model.state_dict().items())

    single = make_host(oph_root, "det")  # one local epoch: mutual learning throughout, as the official code
    stages.clear()
    loss1 = single.algorithm.pair_loss
    single.algorithm.pair_loss = lambda model, batch: (stages.append(single.algorithm.stage), loss1(model, batch))[1]  # type: ignore[method-assign]
    single.fit("site1", start(single)[1], 1)
    assert stages and set(stages) == {EXCHANGE}


@pytest.mark.parametrize(
    ("name", "key", "value", "message"),
    [
        ("pfa", "box_start", 1.5, "algorithm.box_start must be a number in"),
        ("det", "box_end", "-0.1", "algorithm.box_end must be a number in"),
        ("det", "alpha1", 0.95, "algorithm.alpha1 must be <= algorithm.alpha2"),
        ("det", "alpha2", ".nan", "algorithm.alpha2 must be a finite number >= 0"),
    ],
)
def test_bad_hyperparameters_name_the_key(oph_root: Path, name: str, key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, tiny_overrides(oph_root, **{"algorithm.name": name, f"algorithm.{key}": value}))
