"""Client-level DP methods (DEeR, DP-LoRA, FFA-LoRA): the accountant is Opacus', the target ε
holds, clipping, seeded noise, DEeR's exact averaging and regulator, clear errors; one run
through Ray actors for ε rows, resume and the epsilon_max stop."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from torch import nn

from raysim.algorithms import ALGORITHMS, dp
from raysim.algorithms import params as algorithm_params
from raysim.algorithms.deer import b_round
from raysim.config import ConfigError
from raysim.engine.driver import Driver, latest_checkpoint
from raysim.types import Update

from helpers import load_config, make_driver

DELTA = 1e-5


class Net(nn.Module):
    """A convolution and a linear head with LoRA on both: the two stored layouts of A and B."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).mean(dim=(2, 3)))


def make(name: str, *, clients: int = 3, **settings: object):
    """The method (its own `adapt` on Net, LoRA rank 2 on conv and fc) and its initial state."""
    values = {"algorithm.name": name, "data.name": "synthetic", "federation.rounds": 10, "algorithm.rank": 2, "algorithm.targets": "[conv, fc]", **settings}
    cfg = load_config(None, [f"{k}={v}" for k, v in values.items()])
    algorithm = ALGORITHMS.get(name)(algorithm_params(cfg), cfg)
    lines: list[str] = []
    algorithm.prepare_run(None, [None] * clients, Path("."), lines.append)  # type: ignore[arg-type]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = algorithm.adapt(Net(), None)  # type: ignore[arg-type]
    return algorithm, algorithm.init_state(model), lines


def moved(state: dict, keys: list[str], scale: float, k: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + k)
    return {key: state["weights"][key] + scale * torch.randn(state["weights"][key].shape, generator=gen) for key in keys}


def updates(state: dict, keys: list[str], scale: float = 0.05, n: int = 3) -> list[Update]:
    return [Update(f"c{k}", moved(state, keys, scale, k), 10 * (k + 1), {"loss": 0.5}, {}) for k in range(n)]


def opacus_epsilon(z: float, q: float, steps: int) -> float:
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=z, sample_rate=q)
    return accountant.get_epsilon(delta=DELTA)


def d64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64)


# --- the accountant ---------------------------------------------------------------------------


def test_reported_epsilon_is_opacus_own_for_the_same_history() -> None:
    algorithm, state, lines = make("dp_lora", clients=5, **{"federation.clients_per_round": 2, "algorithm.noise_multiplier": 1.3, "algorithm.epsilon_max": 50})
    assert state["privacy"]["sample_rate"] == 0.4 and state["privacy"]["history"] == []
    assert lines[0].startswith("privacy: client-level DP, noise multiplier z = 1.3, clip C = 0.2, sample rate q = 0.4")
    keys = list(state["weights"])
    for round_ in range(1, 4):
        state = algorithm.aggregate(round_, updates(state, keys), state)
        assert state["privacy"]["history"] == [(1.3, 0.4, round_)]
        reported = algorithm.server_metrics(round_, state)
        assert reported == {"epsilon": opacus_epsilon(1.3, 0.4, round_), "delta": DELTA}
    # a plain-value checkpoint of the state reports the same ε
    restored = dp.spent(list(state["privacy"]["history"]), DELTA)
    assert restored == reported["epsilon"]


@pytest.mark.parametrize(("epsilon", "clients_per_round", "rounds"), [(1.0, None, 50), (3.0, 4, 50), (6.0, None, 100)])
def test_noise_from_a_target_epsilon_never_exceeds_it(epsilon: float, clients_per_round: int | None, rounds: int) -> None:
    settings = {"algorithm.epsilon": epsilon, "federation.rounds": rounds}
    if clients_per_round:
        settings["federation.clients_per_round"] = clients_per_round
    algorithm, state, _ = make("deer", clients=12, **settings)
    privacy = state["privacy"]
    q = (clients_per_round or 12) / 12
    assert privacy["sample_rate"] == q
    z = privacy["noise_multiplier"]
    assert z == get_noise_multiplier(target_epsilon=epsilon, target_delta=DELTA, sample_rate=q, steps=rounds)
    final = opacus_epsilon(z, q, rounds)
    assert epsilon - 0.02 <= final <= epsilon  # spent, not wasted
    at_end = {**privacy, "history": [(z, q, rounds - 1)]}
    assert algorithm.stop_before(rounds, {"privacy": at_end}) is None
    beyond = {**privacy, "history": [(z, q, rounds)]}
    assert "privacy budget: round" in algorithm.stop_before(rounds + 1, {"privacy": beyond})


def test_a_fixed_noise_multiplier_stops_before_epsilon_max() -> None:
    e1, e2, e3 = (opacus_epsilon(1.0, 1.0, t) for t in (1, 2, 3))
    algorithm, state, _ = make("dp_lora", **{"algorithm.noise_multiplier": 1.0, "algorithm.epsilon_max": (e2 + e3) / 2})
    keys = list(state["weights"])
    for round_ in (1, 2):
        assert algorithm.stop_before(round_, state) is None
        state = algorithm.aggregate(round_, updates(state, keys), state)
    assert algorithm.server_metrics(2, state)["epsilon"] == e2 and e1 < e2
    reason = algorithm.stop_before(3, state)
    assert reason is not None and f"ε = {e3:.4g} > {(e2 + e3) / 2:.4g}" in reason


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("algorithm.epsilon=.inf", "algorithm.epsilon must be a finite number > 0"),
        ("algorithm.epsilon=0", "algorithm.epsilon must be a finite number > 0"),
        ("algorithm.noise_multiplier=0", "algorithm.noise_multiplier must be a finite number > 0"),
        ("algorithm.epsilon_max=5", "algorithm.epsilon_max applies only with a fixed algorithm.noise_multiplier"),
        ("algorithm.delta=1", "algorithm.delta must be a number in (0, 1)"),
        ("algorithm.clip=-1", "algorithm.clip must be a finite number > 0"),
    ],
)
def test_no_privacy_settings_are_clear_errors(setting: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"^algorithm (deer|dp_lora|ffa_lora): ") as err:
        load_config(None, ["algorithm.name=deer", "data.name=synthetic", setting]).algorithm_params()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_unreachable_target_epsilon_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"^algorithm ffa_lora: algorithm\.epsilon=1e-08 cannot be met for 10 rounds at sample rate 1 "):
        make("ffa_lora", **{"algorithm.epsilon": "1.0e-8"})


# --- clipping and noise -----------------------------------------------------------------------


def test_clipping_bounds_each_clients_whole_update_to_c() -> None:
    reference = {"a": torch.zeros(4), "b": torch.zeros(3)}
    fold = dp.ClippedSum(reference, ["a", "b"], clip=1.0)
    fold.add({"a": torch.full((4,), 0.4), "b": torch.full((3,), 0.4)})  # each key under C, together 0.4·√7 > C
    assert math.sqrt(sum(float(s.square().sum()) for s in fold.sums.values())) == pytest.approx(1.0, abs=1e-12)
    fold.add({"a": torch.full((4,), 0.1), "b": torch.zeros(3)})  # norm 0.2 < C: as it is
    assert torch.allclose(fold.sums["a"], torch.full((4,), 0.4 / math.sqrt(7 * 0.16) + 0.1, dtype=torch.float64))
    assert fold.count == 2 and fold.norms == pytest.approx([0.4 * math.sqrt(7), 0.2])
    # through the method: one client with a huge update moves the global by C plus the noise, no more
    algorithm, state, _ = make("dp_lora")
    keys = list(state["weights"])
    after = algorithm.aggregate(1, updates(state, keys, scale=100.0, n=1), state)
    noise = algorithm.noise(1, sorted(keys), state["weights"], state["privacy"]["noise_multiplier"] * 0.2)
    step = [d64(after["weights"][k]) - d64(state["weights"][k]) - noise[k] for k in keys]
    assert math.sqrt(sum(float(s.square().sum()) for s in step)) == pytest.approx(0.2, rel=1e-4)


def test_the_noise_is_a_function_of_seed_and_round_only() -> None:
    algorithm, state, _ = make("dp_lora")
    keys = sorted(state["weights"])
    std = state["privacy"]["noise_multiplier"] * 0.2
    residuals = []
    for scale, n in ((0.01, 3), (0.001, 2)):  # different updates, different cohorts
        batch = updates(state, keys, scale=scale, n=n)
        mean = {k: sum(d64(u.tensors[k]) - d64(state["weights"][k]) for u in batch) / n for k in keys}
        after = algorithm.aggregate(3, batch, state)
        residuals.append({k: (d64(after["weights"][k]) - d64(state["weights"][k]) - mean[k]) * n for k in keys})
    drawn = dp.gaussian({k: state["weights"][k].shape for k in keys}, std, algorithm.cfg.seed, 3)
    for residual in residuals:
        for k in keys:
            assert torch.allclose(residual[k], drawn[k], rtol=1e-4, atol=1e-4 * std)
    assert all(torch.equal(drawn[k], dp.gaussian({k: drawn[k].shape}, std, algorithm.cfg.seed, 3)[k]) for k in keys if k == keys[0])
    other_round = dp.gaussian({k: state["weights"][k].shape for k in keys}, std, algorithm.cfg.seed, 4)
    other_seed = dp.gaussian({k: state["weights"][k].shape for k in keys}, std, algorithm.cfg.seed + 1, 3)
    assert not any(torch.equal(drawn[k], other_round[k]) or torch.equal(drawn[k], other_seed[k]) for k in keys)
    big = dp.gaussian({"x": (200, 100)}, 2.5, 0, 1)["x"]
    assert big.std().item() == pytest.approx(2.5, rel=0.03) and abs(big.mean().item()) < 0.05


# --- DEeR: alternation, exact averaging, regulator ----------------------------------------------


def lora_layers(state: dict) -> list[str]:
    return sorted(k[: -len(".lora_A")] for k in state["weights"] if k.endswith(".lora_A"))


def low_rank(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The layer's ΔW/scale in torch's weight layout (out, in·k·k), from the stored A and B."""
    if a.dim() == 2:  # linear: y = x·A·B, so ΔW = (A·B)ᵀ
        return (d64(a) @ d64(b)).T
    return d64(b).reshape(b.shape[0], -1) @ d64(a).reshape(a.shape[0], -1)


@pytest.mark.parametrize("round_", [1, 2])
def test_deer_averaging_is_exact_in_each_sub_round_and_the_noise_is_regulated(round_: int) -> None:
    algorithm, state, _ = make("deer", **{"algorithm.clip": 100.0, "algorithm.noise_multiplier": 1e-4, "algorithm.epsilon_max": 1e9})
    gen = torch.Generator().manual_seed(7)  # a B that has trained already (B starts at zero)
    state["weights"] = {k: v + 0.3 * torch.randn(v.shape, generator=gen) if k.endswith(".lora_B") else v for k, v in state["weights"].items()}
    keys = list(state["weights"])
    trained = algorithm.trained_keys(round_, keys)
    frozen, moving = (".lora_A", ".lora_B") if b_round(round_) else (".lora_B", ".lora_A")
    assert not any(k.endswith(frozen) for k in trained) and any(k.endswith(moving) for k in trained)
    assert {"fc.base.bias", "bn.weight"} & set(trained) and round_ == (1 if frozen == ".lora_A" else 2)
    batch = updates(state, trained, scale=0.05)
    after = algorithm.aggregate(round_, batch, state)
    noise = algorithm.noise(round_, sorted(trained), state["weights"], 1e-4 * 100.0)
    weight_noise = dp.gaussian(
        {k: low_rank(state["weights"][k[: -len(moving)] + ".lora_A"], state["weights"][k[: -len(moving)] + ".lora_B"]).shape if k.endswith(moving) else state["weights"][k].shape for k in trained},
        1e-2,
        algorithm.cfg.seed,
        round_,
    )
    # the weight-space noise is scaled by s = max(1, σ_max of the frozen factors) (issue 24: 0.5.0 had no s)
    scale = max([1.0, *(float(torch.linalg.matrix_norm(d64(state["weights"][layer + frozen]).flatten(1), ord=2)) for layer in lora_layers(state))])
    assert (scale > 1) == (frozen == ".lora_B")  # the grown B of an A sub-round; LoRA's initial A has σ_max < 1
    for layer in lora_layers(state):
        a, b = state["weights"][layer + ".lora_A"], state["weights"][layer + ".lora_B"]
        assert torch.equal(after["weights"][layer + frozen], state["weights"][layer + frozen])  # untouched
        new_a, new_b = after["weights"][layer + ".lora_A"], after["weights"][layer + ".lora_B"]
        products = [low_rank(u.tensors.get(layer + ".lora_A", a), u.tensors.get(layer + ".lora_B", b)) for u in batch]
        exact = sum(products) / len(batch)  # mean(B_k·A) (or mean(B·A_k))
        key = layer + moving
        noise_a = noise[key] if moving == ".lora_A" else torch.zeros_like(d64(a))
        noise_b = noise[key] if moving == ".lora_B" else torch.zeros_like(d64(b))
        projected = low_rank(d64(a) + noise_a, d64(b) + noise_b) - low_rank(a, b)  # the noise in weight space
        assert torch.allclose(low_rank(new_a, new_b), exact + projected / len(batch), atol=1e-6)
        # the regulator: that noise is the weight-space Gaussian projected onto the frozen factor's space
        n = weight_noise[key] * scale
        assert n.shape == low_rank(a, b).shape
        if moving == ".lora_B":
            a_mat = d64(a).T if a.dim() == 2 else d64(a).reshape(a.shape[0], -1)
            expected = n @ a_mat.T @ torch.linalg.inv(a_mat @ a_mat.T) @ a_mat
        else:
            b_mat = d64(b).T if b.dim() == 2 else d64(b).reshape(b.shape[0], -1)
            expected = b_mat @ torch.linalg.inv(b_mat.T @ b_mat) @ b_mat.T @ n
        assert torch.allclose(projected, expected, atol=1e-12)


def test_dp_lora_deviates_where_deer_is_exact() -> None:
    """With A and B both trained (DP-LoRA), the product of the averages is not the average of the
    products: the aggregation deviation DEeR's alternation removes."""
    algorithm, state, _ = make("dp_lora", **{"algorithm.clip": 100.0, "algorithm.noise_multiplier": 1e-4, "algorithm.epsilon_max": 1e9})
    keys = list(state["weights"])
    state["weights"] = {k: v + 0.3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(7)) if k.endswith(".lora_B") else v for k, v in state["weights"].items()}
    batch = updates(state, keys, scale=0.3)
    after = algorithm.aggregate(1, batch, state)
    layer = "fc"
    exact = sum(low_rank(u.tensors[layer + ".lora_A"], u.tensors[layer + ".lora_B"]) for u in batch) / len(batch)
    deviation = (low_rank(after["weights"][layer + ".lora_A"], after["weights"][layer + ".lora_B"]) - exact).abs().max()
    assert deviation > 1e-3


def test_ffa_lora_never_trains_nor_sends_a() -> None:
    algorithm, state, _ = make("ffa_lora")
    assert not any(k.endswith(".lora_A") for k in state["weights"]) and any(k.endswith(".lora_B") for k in state["weights"])
    model = algorithm.adapt(Net(), None)  # type: ignore[arg-type]
    assert all(not m.lora_A.requires_grad and m.lora_B.requires_grad for m in (model.conv, model.fc))
    assert "fc.lora_A" not in algorithm.communicated(model)


# --- through Ray actors -----------------------------------------------------------------------


def server_rows(metrics: pd.DataFrame) -> pd.DataFrame:
    rows = metrics[metrics["client"] == "server"]
    assert set(rows["split"]) == {"train"} and (rows[["role", "attribute", "group"]] == "").all().all()
    return rows.sort_values(["round", "metric"]).reset_index(drop=True)


def test_deer_run_reports_epsilon_survives_resume_and_stops_at_epsilon_max(ray_session, oph_root: Path, tmp_path: Path) -> None:
    tiny = {"algorithm.name": "deer", "resources.clients_per_actor": 3, "federation.rounds": 2, "eval.every": 2, "algorithm.rank": 4}
    full = make_driver(oph_root, tmp_path / "full", **tiny).run()
    rows = server_rows(full)
    assert list(rows["metric"]) == ["delta", "epsilon", "noise_scale"] * 2 and list(rows["round"]) == [1, 1, 1, 2, 2, 2]  # noise_scale: issue 24
    z = get_noise_multiplier(target_epsilon=3.0, target_delta=DELTA, sample_rate=1.0, steps=2)
    assert list(rows[rows["metric"] == "epsilon"]["value"]) == [opacus_epsilon(z, 1.0, t) for t in (1, 2)]
    assert rows[rows["metric"] == "epsilon"]["value"].max() <= 3.0 and (rows[rows["metric"] == "delta"]["value"] == DELTA).all()
    assert not full[full["client"] == "mean"]["metric"].isin(["epsilon", "delta", "noise_scale"]).any()  # outside the means
    assert rows[rows["metric"] == "noise_scale"]["value"].iloc[0] == 1.0  # round 1 trains B: LoRA's initial A has σ_max < 1

    make_driver(oph_root, tmp_path / "cut", **tiny).run(until=1)  # round 1 (B), then resumed for round 2 (A)
    resumed = Driver(load_config(tmp_path / "cut" / "config.yaml"), tmp_path / "cut", echo=lambda _: None).run(resume=True)
    pd.testing.assert_frame_equal(server_rows(resumed), rows, check_exact=True)
    pd.testing.assert_frame_equal(resumed, full, check_exact=True)

    e1, e2 = opacus_epsilon(1.0, 1.0, 1), opacus_epsilon(1.0, 1.0, 2)
    lines: list[str] = []
    fixed = {**tiny, "algorithm.noise_multiplier": 1.0, "algorithm.epsilon_max": (e1 + e2) / 2, "checkpoint.every": 5}
    stopped = make_driver(oph_root, tmp_path / "stop", lines, **fixed).run()
    assert latest_checkpoint(tmp_path / "stop").name == "round_0001"  # written by the stop: checkpoint.every is 5
    assert any(line.startswith("stopped before round 2: privacy budget: round 2 would spend") for line in lines)
    assert list(server_rows(stopped).query("metric == 'epsilon'")["value"]) == [e1]
