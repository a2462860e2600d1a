"""Server-side methods (FedAdam/Yogi/Adagrad, FedNova, q-FFL, FairFed): hand computations, reductions, real data."""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from raysim.algorithms import ALGORITHMS, Algorithm
from raysim.algorithms import params as algorithm_params
from raysim.algorithms.aggregation import AggregationError, weighted_average
from raysim.algorithms.fairfed import STATS_KEY, FairFed, FairFedParams, accuracy_of, fairfed_weights, fairness_gap, group_confusion
from raysim.algorithms.fedadagrad import FedAdagrad
from raysim.algorithms.fedadam import FedAdam
from raysim.algorithms.fednova import FedNova, effective_steps, fednova_coefficients, solver_norm
from raysim.algorithms.fedopt import AdaptiveParams, FedOptParams, fedopt_step
from raysim.algorithms.fedyogi import FedYogi
from raysim.algorithms.qffl import LOSS_KEY, QFFL, QFFLParams, qffl_coefficients
from raysim.client.training import forward
from raysim.config import ConfigError
from raysim.engine.client_actor import ClientHost
from raysim.metrics import classification as metrics
from raysim.models.backbones import train_mode
from raysim.types import Update

from helpers import load_config, tiny_overrides

# all the server halves read: plain SGD with lr 0.5 (q-FedAvg's L = 1/lr = 2)
CFG = SimpleNamespace(federation=SimpleNamespace(lr=0.5, optimizer="sgd", momentum=0.0, weight_decay=0.0))
MOMENTUM = SimpleNamespace(federation=SimpleNamespace(lr=0.5, optimizer="sgd", momentum=0.9, weight_decay=5e-4))
ADAM = SimpleNamespace(federation=SimpleNamespace(lr=1e-3, optimizer="adam", momentum=0.9, weight_decay=0.0))


class Toy(nn.Module):
    """One trainable parameter `w` and one float buffer `r` (like a BatchNorm running statistic)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0]))
        self.register_buffer("r", torch.tensor([1.0]))


def toy_state(algorithm: Algorithm) -> dict:
    state = algorithm.init_state(Toy())
    state["weights"]["n"] = torch.tensor(0)  # an integer buffer, as a method might communicate one
    return state


def update(cid: str, w: float, r: float, n: int, num: int, steps: float = 1.0, **extra: object) -> Update:
    return Update(cid, {"w": torch.tensor([w]), "r": torch.tensor([r]), "n": torch.tensor(n)}, num, {"loss": 0.0, "steps": steps}, dict(extra))


def two_clients(**extra_a: object) -> list[Update]:
    # A: w 1.5, r 0, n 4, 1 example; B: w 2.0, r 4, n 8, 3 examples
    return [update("A", 1.5, 0.0, 4, 1, **extra_a), update("B", 2.0, 4.0, 8, 3)]


def assert_buffers_are_fedavg(out: dict) -> None:
    # r: (1*0 + 3*4) / 4 = 3.0; n: floor((1*4 + 3*8) / 4) = 7
    assert out["weights"]["r"].item() == 3.0
    assert out["weights"]["n"].item() == 7 and out["weights"]["n"].dtype == torch.int64


# --- FedOpt ---------------------------------------------------------------------------------

# Mean update Δ = (1*(1.5-1) + 3*(2-1)) / 4 = 0.875, Δ² = 0.765625; m = 0.1 * 0.875 = 0.0875;
# v starts at τ² = 1e-6. Adam: v = 0.99e-6 + 0.01 * 0.765625 = 0.00765724.
# Yogi: sign(1e-6 - 0.765625) = -1, v = 1e-6 + 0.01 * 0.765625 = 0.00765725. Adagrad: v = 1e-6 + 0.765625.
FIRST_V = {"fedadam": 0.00765724, "fedyogi": 0.00765725, "fedadagrad": 0.765626}


@pytest.mark.parametrize("cls", [FedAdam, FedYogi, FedAdagrad])
def test_fedopt_first_step_is_the_closed_form(cls: type[Algorithm]) -> None:
    algorithm = cls(cls.Params(), CFG)
    state = toy_state(algorithm)
    assert state["stepped"] == ["w"]  # buffers are not given to the optimiser
    out = algorithm.aggregate(1, two_clients(), state)
    v = FIRST_V[cls.name]
    # θ = 1 + η m / (√v + τ), η = 1e-2, τ = 1e-3; Adam ≈ 1 + 0.000875 / 0.0885057 ≈ 1.0098864
    expected = 1.0 + 1e-2 * 0.0875 / (math.sqrt(v) + 1e-3)
    assert out["weights"]["w"].item() == pytest.approx(expected, rel=1e-7)
    assert out["m"]["w"].item() == pytest.approx(0.0875, rel=1e-7) and out["v"]["w"].item() == pytest.approx(v, rel=1e-6)
    assert_buffers_are_fedavg(out)
    assert state["weights"]["w"].item() == 1.0  # the input state is left as it was


# weighting=uniform (the paper's unweighted mean): Δ = ((1.5-1) + (2-1)) / 2 = 0.75, Δ² = 0.5625; m = 0.075
UNIFORM_V = {"fedadam": 0.99e-6 + 0.01 * 0.5625, "fedyogi": 1e-6 + 0.01 * 0.5625, "fedadagrad": 1e-6 + 0.5625}


@pytest.mark.parametrize("cls", [FedAdam, FedYogi, FedAdagrad])
def test_fedopt_uniform_weighting_is_the_unweighted_mean(cls: type[Algorithm]) -> None:
    assert cls.Params().weighting == "examples"  # the default keeps FedAvg's example weights
    algorithm = cls(cls.Params(weighting="uniform"), CFG)
    out = algorithm.aggregate(1, two_clients(), toy_state(algorithm))
    v = UNIFORM_V[cls.name]
    assert out["m"]["w"].item() == pytest.approx(0.075, rel=1e-7) and out["v"]["w"].item() == pytest.approx(v, rel=1e-6)
    assert out["weights"]["w"].item() == pytest.approx(1.0 + 1e-2 * 0.075 / (math.sqrt(v) + 1e-3), rel=1e-7)
    # the buffers get the same unweighted mean: r = (0 + 4) / 2 = 2, n = (4 + 8) / 2 = 6
    assert out["weights"]["r"].item() == 2.0 and out["weights"]["n"].item() == 6


@pytest.mark.parametrize(("rule", "v"), [("adam", 0.99 * 0.01 + 0.01 * 0.0025), ("yogi", 0.01 - 0.01 * 0.0025), ("adagrad", 0.01 + 0.0025)])
def test_fedopt_moment_rules_when_the_update_is_small(rule: str, v: float) -> None:
    # m 0.05, v 0.01, Δ 0.05 (Δ² = 0.0025 < v): Adam shrinks v by β2, Yogi subtracts (1-β2)Δ², Adagrad adds Δ²
    t = lambda x: {"w": torch.tensor([x], dtype=torch.float64)}  # noqa: E731
    w, m2, v2 = fedopt_step(rule, t(2.0), t(0.05), t(0.05), t(0.01), eta=0.1, tau=1e-3, beta1=0.9, beta2=0.99)
    # m = 0.9 * 0.05 + 0.1 * 0.05 = 0.05; θ = 2 + 0.1 * 0.05 / (√v + 0.001)
    assert m2["w"].item() == pytest.approx(0.05, rel=1e-12) and v2["w"].item() == pytest.approx(v, rel=1e-12)
    assert w["w"].item() == pytest.approx(2.0 + 0.005 / (math.sqrt(v) + 1e-3), rel=1e-12)


def test_fedopt_state_resumes_exactly_from_a_checkpoint() -> None:
    algorithm = FedYogi(FedOptParams(), CFG)
    first = algorithm.aggregate(1, two_clients(), toy_state(algorithm))
    buffer = io.BytesIO()
    torch.save(first, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    second = [update("A", 0.5, 1.0, 4, 2), update("B", 1.25, 2.0, 8, 1)]
    a, b = algorithm.aggregate(2, second, first), algorithm.aggregate(2, second, restored)
    for part in ("weights", "m", "v"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert a["m"]["w"].item() != first["m"]["w"].item()  # the moments did move


# --- FedNova --------------------------------------------------------------------------------


def test_fednova_matches_hand_computation() -> None:
    # A: w 3, n 1, τ 2; B: w 0, n 3, τ 4; θ = 1. p = (0.25, 0.75), d = ((3-1)/2, (0-1)/4) = (1, -0.25)
    # Σ p d = 0.25 - 0.1875 = 0.0625; τ_eff = 0.25*2 + 0.75*4 = 3.5; θ = 1 + 3.5 * 0.0625 = 1.21875
    algorithm = FedNova(FedNova.Params(), CFG)
    out = algorithm.aggregate(1, [update("A", 3.0, 0.0, 4, 1, steps=2), update("B", 0.0, 4.0, 8, 3, steps=4)], toy_state(algorithm))
    assert out["weights"]["w"].item() == 1.21875  # (FedAvg: 0.25*3 = 0.75)
    assert_buffers_are_fedavg(out)
    assert fednova_coefficients([1, 3], [2, 0]) == [0.25 * 0.5 / 2, 0.0]  # τ_eff = 0.5; no step, no pull


def test_fednova_with_equal_steps_is_fedavg() -> None:
    # τ_eff = 4, c = (4*0.25/4, 4*0.75/4) = (0.25, 0.75): θ = 1 + 0.25*2 - 0.75*1 = 0.75 = FedAvg
    algorithm = FedNova(FedNova.Params(), CFG)
    updates = [update("A", 3.0, 0.0, 4, 1, steps=4), update("B", 0.0, 4.0, 8, 3, steps=4)]
    out = algorithm.aggregate(1, updates, toy_state(algorithm))
    fedavg = weighted_average([u.tensors for u in updates], [1, 3])
    assert all(torch.equal(out["weights"][k], fedavg[k]) for k in fedavg) and out["weights"]["w"].item() == 0.75


# SGD momentum 0.9: ‖a‖₁ = Σ_{j=1}^{τ} (1 - 0.9^j) / 0.1 = 10 (τ - 9 (1 - 0.9^τ)); 2 steps: 1 + 1.9 = 2.9
A24 = 10 * (24 - 9 * (1 - 0.9**24))  # 24 steps: 157.17898...


def test_fednova_normalises_by_the_momentum_a_norm() -> None:
    # A: w 3, n 1, 2 steps; B: w 0, n 3, 24 steps; θ = 1. p = (0.25, 0.75), d = (2 / 2.9, -1 / A24)
    # τ_eff = 0.25 * 2.9 + 0.75 * A24 = 118.609...; θ = 1 + τ_eff (0.25 * 2 / 2.9 - 0.75 / A24) = 20.884...
    # (by step counts: τ_eff = 18.5, θ = 1 + 18.5 (0.25 * 2 / 2 - 0.75 / 24) = 5.047)
    algorithm = FedNova(FedNova.Params(), MOMENTUM)
    out = algorithm.aggregate(1, [update("A", 3.0, 0.0, 4, 1, steps=2), update("B", 0.0, 4.0, 8, 3, steps=24)], toy_state(algorithm))
    tau_eff = 0.25 * 2.9 + 0.75 * A24
    assert out["weights"]["w"].item() == pytest.approx(1 + tau_eff * (0.25 * 2 / 2.9 - 0.75 / A24), rel=1e-6)
    assert_buffers_are_fedavg(out)
    assert solver_norm(2, momentum=0.9) == pytest.approx(2.9, rel=1e-12) and solver_norm(24, momentum=0.9) == pytest.approx(A24, rel=1e-12)
    # the step counts alone (τ = 2 vs 24) would give A 4.5x too little weight relative to B
    c_a, c_b = fednova_coefficients([1, 3], [2.9, A24])
    assert c_a / c_b == pytest.approx(A24 / 2.9 / 3, rel=1e-12) and (A24 / 2.9) / (24 / 2) == pytest.approx(4.52, abs=0.01)


def test_fednova_a_norm_reductions() -> None:
    assert [solver_norm(t) for t in (0, 1, 2, 24)] == [0.0, 1.0, 2.0, 24.0]  # ρ = 0: the step count
    # weight decay is part of every client's objective: it leaves ‖a‖₁ unchanged
    assert effective_steps(MOMENTUM.federation, 24) == solver_norm(24, momentum=0.9)
    assert effective_steps(CFG.federation, 24) == 24.0
    assert effective_steps(ADAM.federation, 24) == 24.0  # Adam: no such normalisation, τ_k
    # proximal μ without momentum (Wang et al.): ‖a‖₁ = (1 - (1 - lr μ)^τ) / (lr μ), lr μ = 0.05
    assert solver_norm(24, lr=0.1, mu=0.5) == pytest.approx((1 - 0.95**24) / 0.05, rel=1e-12)


def test_fednova_says_once_that_adam_falls_back_to_step_counts(tmp_path: Path) -> None:
    lines: list[str] = []
    for cfg in (ADAM, MOMENTUM):
        FedNova(FedNova.Params(), cfg).prepare_run(None, [], tmp_path, lines.append)  # type: ignore[arg-type]
    assert len(lines) == 1 and "federation.optimizer=adam has no FedNova normalisation" in lines[0]


def test_fednova_a_norm_is_what_torch_sgd_does() -> None:
    # a constant unit gradient for τ steps moves θ by lr ‖a‖₁ (every a_j > 0 here): PyTorch's SGD with
    # momentum and a proximal term (μ/2)(θ - θ_0)² in the loss, as FedProx adds it
    lr, mu, momentum, steps = 0.01, 0.1, 0.9, 24
    theta = nn.Parameter(torch.zeros((), dtype=torch.float64))
    optimizer = torch.optim.SGD([theta], lr=lr, momentum=momentum)
    for _ in range(steps):
        optimizer.zero_grad()
        (theta + mu / 2 * theta**2).backward()
        optimizer.step()
    assert -theta.item() / lr == pytest.approx(solver_norm(steps, momentum=momentum, lr=lr, mu=mu), rel=1e-12)


def test_fednova_needs_step_counts() -> None:
    algorithm = FedNova(FedNova.Params(), CFG)
    bare = Update("A", {"w": torch.tensor([1.0]), "r": torch.tensor([1.0]), "n": torch.tensor(0)}, 1)
    with pytest.raises(AggregationError, match="missing from \\['A'\\]"):
        algorithm.aggregate(1, [bare], toy_state(algorithm))


# --- q-FFL ----------------------------------------------------------------------------------


def qffl_pair(q: float, variant: str = "qfedavg", cfg: SimpleNamespace = CFG, **params: float) -> tuple[QFFL, list[Update], dict]:
    """q-FedAvg: the clients' trained models θ̄_k; q-FedSGD: their gradients, set to L(θ - θ̄_k) with L = 2."""
    algorithm = QFFL(QFFLParams(q=q, variant=variant, **params), cfg)
    state = algorithm.init_state(Toy())
    state["weights"]["w"] = torch.tensor([1.0, 1.0])  # two trainable tensors: the norm spans both
    state["weights"]["v"], state["stepped"] = torch.tensor([0.0]), ["w", "v"]
    a, b = ([0.0, 1.0], [0.0]), ([1.0, 2.0], [2.0])
    if variant == "qfedsgd":
        a, b = ([2.0, 0.0], [0.0]), ([0.0, -2.0], [-4.0])
    ua = Update("A", {"w": torch.tensor(a[0]), "v": torch.tensor(a[1]), "r": torch.tensor([0.0])}, 1, {"steps": 2.0}, {LOSS_KEY: 2.0})
    ub = Update("B", {"w": torch.tensor(b[0]), "v": torch.tensor(b[1]), "r": torch.tensor([4.0])}, 3, {"steps": 24.0}, {LOSS_KEY: 0.5})
    return algorithm, [ua, ub], state


# L = 2, q = 1. A: F 2, g = L(θ-θ̄) = 2*[1, 0 | 0], ‖g‖² = 4; Δ = 2g = [4, 0 | 0], h = 1*4 + 2*2 = 8
# B: F 0.5, g = 2*[0, -1 | -2], ‖g‖² = 20; Δ = 0.5g = [0, -1 | -2], h = 20 + 2*0.5 = 21
# θ - ΣΔ/Σh = [1 - 4/29, 1 + 1/29 | 0 + 2/29]
QFFL_STEP = ([1 - 4 / 29, 1 + 1 / 29], 2 / 29)


@pytest.mark.parametrize("variant", ["qfedavg", "qfedsgd"])
def test_qffl_matches_hand_computation(variant: str) -> None:
    # q-FedAvg under plain SGD (L = 1/lr = 2) and q-FedSGD sent g_k = L(θ - θ̄_k) with lipschitz = 2: the same step
    algorithm, updates, state = qffl_pair(1.0, variant, **({"lipschitz": 2.0} if variant == "qfedsgd" else {}))
    out = algorithm.aggregate(1, updates, state)
    assert out["weights"]["w"].tolist() == pytest.approx(QFFL_STEP[0], rel=1e-7)
    assert out["weights"]["v"].item() == pytest.approx(QFFL_STEP[1], rel=1e-7)
    assert out["weights"]["r"].item() == 3.0  # buffer: FedAvg, (1*0 + 3*4) / 4


def test_qfedsgd_is_the_default_and_its_step_does_not_depend_on_the_client_optimizer() -> None:
    assert QFFLParams().variant == "qfedsgd"
    _, updates, state = qffl_pair(1.0, "qfedsgd", lipschitz=2.0)
    steps = [QFFL(QFFLParams(lipschitz=2.0), cfg).aggregate(1, updates, state)["weights"]["w"] for cfg in (CFG, MOMENTUM, ADAM)]
    assert all(torch.equal(steps[0], w) for w in steps) and steps[0].tolist() == pytest.approx(QFFL_STEP[0], rel=1e-7)


def test_qfedsgd_with_q0_is_gradient_descent_on_the_unweighted_mean() -> None:
    # q = 0: Δ_k = g_k, h_k = L: θ - Σ g_k / (K L) = θ - mean_k g_k / L, ignoring F_k and n_k (1 vs 3)
    algorithm, updates, state = qffl_pair(0.0, "qfedsgd", lipschitz=4.0)
    out = algorithm.aggregate(1, updates, state)
    # mean g = [1, -1 | -2]; θ - mean g / 4 = [0.75, 1.25 | 0.5]
    assert out["weights"]["w"].tolist() == [0.75, 1.25] and out["weights"]["v"].item() == 0.5


def test_qfedavg_corrects_L_for_momentum() -> None:
    # SGD momentum 0.9: the displacements are inflated by ‖a_k‖₁/τ_k, so g_k = s_k L (θ - θ̄_k) with s_k = τ_k / ‖a_k‖₁:
    # s_A = 2 / 2.9 (2 steps), s_B = 24 / A24 (24 steps). ‖g_A‖² = 4 s_A², ‖g_B‖² = 20 s_B²; h = ‖g‖² + L F^q with L = 2:
    # Σh = 4 s_A² + 4 + 20 s_B² + 1; θ - ΣΔ/Σh = [1 - 4 s_A/Σh, 1 + s_B/Σh | 2 s_B/Σh]
    algorithm, updates, state = qffl_pair(1.0, "qfedavg", MOMENTUM)
    s_a, s_b = 2 / 2.9, 24 / A24
    total_h = 4 * s_a**2 + 20 * s_b**2 + 5
    out = algorithm.aggregate(1, updates, state)
    assert out["weights"]["w"].tolist() == pytest.approx([1 - 4 * s_a / total_h, 1 + s_b / total_h], rel=1e-6)
    assert out["weights"]["v"].item() == pytest.approx(2 * s_b / total_h, rel=1e-6)


def test_qfedavg_is_rejected_under_adam_before_training(oph_root: Path) -> None:
    with pytest.raises(ConfigError, match="q-FedSGD.*algorithm.variant=qfedsgd"):
        QFFL(QFFLParams(variant="qfedavg"), ADAM)
    cfg = load_config(None, tiny_overrides(oph_root, **{"algorithm.name": "qffl", "algorithm.variant": "qfedavg"}))  # the default preset: Adam
    with pytest.raises(ConfigError, match="federation.optimizer=adam"):
        ALGORITHMS.get("qffl")(algorithm_params(cfg), cfg)
    QFFL(QFFLParams(variant="qfedavg"), MOMENTUM)  # SGD (with momentum) is fine


def test_qffl_coefficients_with_q0_ignore_a_zero_loss() -> None:
    # q = 0: c_k = 1 / (K L); F = 0 must not produce 0 * inf = NaN
    assert qffl_coefficients([0.0, 0.5], [4.0, 20.0], q=0.0, lipschitz=2.0) == [0.25, 0.25]


def test_qffl_with_q0_is_the_unweighted_mean() -> None:
    # q-FedAvg, q = 0: Δ_k = L(θ-θ̄_k), h_k = L, so θ - Σ L(θ-θ̄_k) / (K L) = mean_k θ̄_k, ignoring n_k (1 vs 3)
    algorithm, updates, state = qffl_pair(0.0)
    out = algorithm.aggregate(1, updates, state)
    assert out["weights"]["w"].tolist() == [0.5, 1.5] and out["weights"]["v"].item() == 1.0
    updates[0].extra[LOSS_KEY] = 0.0  # F = 0 must not produce 0 * inf = NaN
    assert torch.equal(algorithm.aggregate(1, updates, state)["weights"]["w"], torch.tensor([0.5, 1.5]))


def test_qffl_needs_the_initial_loss() -> None:
    algorithm, updates, state = qffl_pair(1.0)
    del updates[1].extra[LOSS_KEY]
    with pytest.raises(AggregationError, match="missing from \\['B'\\]"):
        algorithm.aggregate(1, updates, state)


# --- FairFed --------------------------------------------------------------------------------


def test_group_confusion_matches_hand_count() -> None:
    labels, preds, groups = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, -1]
    counts = group_confusion(labels, preds, groups, 2)
    # group 0: (y, ŷ) = (1,1), (1,0), (0,0); group 1: (0,1), (1,1); unknown: (0,0). Rows: label, cols: prediction
    assert {g: m.tolist() for g, m in counts.items()} == {0: [[1, 0], [1, 1]], 1: [[0, 1], [0, 1]], -1: [[1, 0], [0, 0]]}
    # TPR 1/2 vs 1/1, FPR 0/1 vs 1/1: EOD = max(0.5, 1) = 1; P(ŷ=1) 1/3 vs 2/2: SPD = 2/3; accuracy 4/6
    assert fairness_gap(counts, "eod") == 1.0 and fairness_gap(counts, "spd") == pytest.approx(2 / 3)
    assert accuracy_of(counts) == pytest.approx(4 / 6)
    assert math.isnan(fairness_gap({0: counts[0], -1: counts[-1]}, "eod"))  # one known group: undefined


@pytest.mark.parametrize("classes", [2, 3])
def test_fairness_gap_agrees_with_the_evaluation_metrics(classes: int) -> None:
    rng = np.random.default_rng(classes)
    y, p, g = rng.integers(0, classes, 300), rng.integers(0, classes, 300), rng.integers(-1, 3, 300)
    counts = group_confusion(y, p, g, classes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all defined here
        assert fairness_gap(counts, "eod") == pytest.approx(metrics.equalized_odds_difference(y, p, g), abs=1e-12)
        assert fairness_gap(counts, "spd") == pytest.approx(metrics.demographic_parity_difference(p, g, classes=np.unique(y[g >= 0])), abs=1e-12)


def test_fairfed_weight_step_matches_hand_computation() -> None:
    # N = 1 + 3 = 4, mean Δ = 0.2: ω = (1 - 4*(0.3-0.2), 3 - 4*(0.1-0.2)) = (0.6, 3.4); shares 0.25→0.15, 0.75→0.85
    assert fairfed_weights([1.0, 3.0], [0.3, 0.1], beta=1.0, floor=1e-3) == pytest.approx([0.6, 3.4], rel=1e-12)
    # β = 10 would give ω_A = 1 - 40*0.1 = -3: held at 1e-3 * 4 = 0.004; ω_B = 3 + 4 = 7; rescaled to total 4
    assert fairfed_weights([1.0, 3.0], [0.3, 0.1], beta=10.0, floor=1e-3) == pytest.approx([0.004 * 4 / 7.004, 7 * 4 / 7.004], rel=1e-12)


def test_fairfed_aggregate_matches_hand_computation() -> None:
    # A holds one group (its gap is undefined: Δ_A = |Acc_g - Acc_A|); B's model is perfect on group 0, inverted on 1
    a, b = update("A", 2.0, 0.0, 4, 1), update("B", 6.0, 4.0, 8, 3)
    stats_a = {STATS_KEY: {0: np.array([[2, 0], [0, 2]])}, "num_examples": 1}
    stats_b = {STATS_KEY: {0: np.array([[1, 0], [0, 1]]), 1: np.array([[0, 1], [1, 0]])}, "num_examples": 3}
    # global: group 0 [[3,0],[0,3]] TPR 1 FPR 0, group 1 TPR 0 FPR 1: F_g = 1, Acc_g = 6/8 = 0.75
    # Δ_A = |0.75 - 1| = 0.25, Δ_B = |1 - 1| = 0; mean 0.125; N = 4
    # ω_A = 1 - 4*(0.25-0.125) = 0.5, ω_B = 3 - 4*(0-0.125) = 3.5; w = (0.5*2 + 3.5*6)/4 = 5.5 (FedAvg: 5.0)
    algorithm = FairFed(FairFedParams(), CFG)
    out = algorithm.aggregate(1, [a, b], toy_state(algorithm), {"A": stats_a, "B": stats_b})
    assert out["fair_weights"] == {"A": 0.5, "B": 3.5}
    assert out["weights"]["w"].item() == 5.5 and out["weights"]["r"].item() == 3.5  # r: (0.5*0 + 3.5*4)/4
    # next round only B is sampled: alone, its Δ equals the mean, nothing moves; A keeps its weight
    again = algorithm.aggregate(2, [b], out, {"B": stats_b})
    assert again["fair_weights"] == {"A": 0.5, "B": 3.5}


def test_fairfed_needs_group_counts() -> None:
    algorithm = FairFed(FairFedParams(), CFG)
    assert algorithm.round_statistics
    with pytest.raises(AggregationError, match="missing from \\['A', 'B'\\]"):
        algorithm.aggregate(1, two_clients(), toy_state(algorithm), {"A": {"num_examples": 1}, "B": {STATS_KEY: {}}})
    with pytest.raises(AggregationError, match="statistics="):  # the list form without the statistics pass
        algorithm.aggregate(1, two_clients(), toy_state(algorithm))


# --- hyperparameters ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "kwargs", "needle"),
    [
        (FedOptParams, {"eta": 0.0}, "eta"),
        (FedOptParams, {"tau": -1.0}, "tau"),
        (FedOptParams, {"beta1": 1.0}, "beta1"),
        (FedOptParams, {"beta2": 1.5}, "beta2"),
        (AdaptiveParams, {"eta": -1.0}, "eta"),
        (QFFLParams, {"q": -0.5}, "q must be"),
        (QFFLParams, {"variant": "fedsgd"}, "variant must be 'qfedsgd' or 'qfedavg'"),
        (QFFLParams, {"lipschitz": 0.0}, "lipschitz must be a number > 0"),
        (QFFLParams, {"variant": "qfedavg", "lipschitz": 5.0}, "uses L = 1/federation.lr"),
        (FedOptParams, {"weighting": "size"}, "weighting must be 'examples' or 'uniform'"),
        (AdaptiveParams, {"weighting": "size"}, "weighting"),
        (FairFedParams, {"beta": -1.0}, "beta must be"),
        (FairFedParams, {"metric": "auc"}, "metric must be one of auto, eop, spd, eod"),
        (FairFedParams, {"weight_floor": 0.0}, "weight_floor"),
    ],
)
def test_params_are_validated(cls: type, kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        cls(**kwargs)


def test_params_come_from_config_keys(oph_root: Path) -> None:
    cfg = load_config(None, tiny_overrides(oph_root, **{"algorithm.name": "fedyogi", "algorithm.eta": 0.1}))
    assert algorithm_params(cfg) == FedOptParams(eta=0.1)
    with pytest.raises(ConfigError, match="algorithm.beta2"):  # Adagrad has no β2
        load_config(None, tiny_overrides(oph_root, **{"algorithm.name": "fedadagrad", "algorithm.beta2": 0.9})).validate()


# --- real data through the actor's body ----------------------------------------------------


def host_for(oph_root: Path, name: str, **extra: object) -> ClientHost:
    cfg = load_config(None, tiny_overrides(oph_root, **{"algorithm.name": name, "resources.clients_per_actor": 2, **extra}))
    from raysim.datasets import DATASETS

    source = DATASETS.get("fairfedmed_oph")(cfg.data, img_size=16, seed=0)
    return ClientHost(cfg, source.client_specs()[:2])


def fit_two(host: ClientHost) -> tuple[dict, dict, list[Update]]:
    state = host.algorithm.init_state(host.clients["site1"].model)
    payload = host.algorithm.payload(state, 1)
    return state, payload, [host.fit(cid, payload, 1) for cid in ("site1", "site2")]


def statistics_of(host: ClientHost, payload: dict) -> dict[str, dict]:
    """The round's statistics pass (`client_statistics` of both clients), as the engine runs it before training."""
    return {cid: host.algorithm.client_statistics(host.clients[cid], payload, 1) for cid in ("site1", "site2")} if host.algorithm.round_statistics else {}


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fednova", "qffl", "fairfed"])
def test_client_fit_and_aggregate_on_real_data(oph_root: Path, name: str) -> None:
    host = host_for(oph_root, name)
    state = host.algorithm.init_state(host.clients["site1"].model)
    payload = host.algorithm.payload(state, 1)
    statistics = statistics_of(host, payload)
    updates = [host.fit(cid, payload, 1) for cid in ("site1", "site2")]
    assert all(u.tensors.keys() == payload.keys() and (u.metrics["steps"] > 0) == (name != "qffl") for u in updates)  # q-FedSGD: no step
    out = host.algorithm.aggregate(1, updates, state, statistics)
    assert out["weights"].keys() == state["weights"].keys()
    assert all(torch.isfinite(v).all() for v in out["weights"].values())
    fedavg = weighted_average([u.tensors for u in updates], [u.num_examples for u in updates])
    buffers = [k for k in payload if k not in state.get("stepped", [])]
    assert any(k.endswith("running_var") for k in buffers)
    if name != "fairfed":  # buffers (BatchNorm statistics) are averaged exactly as FedAvg does
        assert all(torch.equal(out["weights"][k], fedavg[k]) for k in buffers)
    for cid, client in host.clients.items():
        if name == "fairfed":
            counts = statistics[cid][STATS_KEY]
            assert statistics[cid]["num_examples"] == client.num_train
            train = client.shards["train"].table
            assert sorted(counts) == sorted(np.unique(train.attributes[client.attribute]).tolist())
            label_counts = sum(m.sum(axis=1) for m in counts.values())
            assert label_counts.tolist() == np.bincount(train.labels, minlength=2).tolist()
    if name in ("fedadam", "fedyogi", "fedadagrad"):
        # first step: |m / (√v + τ)| ≤ (1-β1)|Δ| / √((1-β2)Δ²) = 1 for Adam/Yogi (smaller for Adagrad), so |θ1 - θ0| ≤ η
        moved = max(float((out["weights"][k] - state["weights"][k]).abs().max()) for k in state["stepped"])
        assert 0 < moved <= 1e-2 * (1 + 1e-5)
        assert any(float(out["m"][k].abs().max()) > 0 for k in state["stepped"])
    if name == "fednova" and updates[0].metrics["steps"] != updates[1].metrics["steps"]:
        assert any(not torch.equal(out["weights"][k], fedavg[k]) for k in state["stepped"])


def test_fairfed_with_beta0_is_fedavg_bit_for_bit(oph_root: Path) -> None:
    host = host_for(oph_root, "fairfed", **{"algorithm.beta": 0.0})
    state = host.algorithm.init_state(host.clients["site1"].model)
    payload = host.algorithm.payload(state, 1)
    statistics = statistics_of(host, payload)
    updates = [host.fit(cid, payload, 1) for cid in ("site1", "site2")]
    deltas_moved = host.algorithm.aggregate(1, updates, state, statistics)
    fedavg = weighted_average([u.tensors for u in updates], [u.num_examples for u in updates])
    assert all(torch.equal(deltas_moved["weights"][k], fedavg[k]) for k in fedavg)
    again = host.algorithm.aggregate(2, updates, deltas_moved, statistics)  # the stored weights stay FedAvg's too
    assert all(torch.equal(again["weights"][k], fedavg[k]) for k in fedavg)
    # with β = 1 the weights move, but the cohort keeps its total weight Σ n_k
    fair = FairFed(FairFedParams(beta=1.0), host.cfg).aggregate(1, updates, state, statistics)
    assert set(fair["fair_weights"]) == {"site1", "site2"}
    assert sum(fair["fair_weights"].values()) == pytest.approx(sum(u.num_examples for u in updates), rel=1e-12)


def train_mode_loss(host: ClientHost, cid: str, tensors: dict, round_: int) -> float:
    """Mean cross-entropy over the batches of the client's first local epoch, BatchNorm in training mode."""
    client = host.clients[cid]
    model = train_mode(client.load(tensors))
    fed = host.cfg.federation
    batches = list(next(iter(client.train_epochs(round_, 1, fed.batch_size, host.cfg.seed))))
    with torch.no_grad():
        return sum(float(nn.functional.cross_entropy(forward(model, b), b.y, reduction="sum")) for b in batches) / sum(len(b.y) for b in batches)


def test_qfedsgd_client_sends_its_gradient_at_the_received_model(oph_root: Path) -> None:
    host = host_for(oph_root, "qffl")  # the default preset: Adam, so q-FedSGD
    state = host.algorithm.init_state(host.clients["site1"].model)
    payload = host.algorithm.payload(state, 1)
    u = host.fit("site1", payload, 1)
    grad = {k: u.tensors[k].double() for k in state["stepped"]}
    model = host.clients["site1"].model
    assert all(torch.equal(model.state_dict()[k], payload[k]) for k in state["stepped"])  # no local training
    assert u.extra[LOSS_KEY] == pytest.approx(train_mode_loss(host, "site1", payload, 1), rel=1e-5)
    # the directional derivative along g is ‖g‖² (central difference along the unit direction; the loss is
    # strongly curved along g, so the step is small)
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grad.values()))
    eps = 1e-4
    moved = [{**payload, **{k: (payload[k].double() + sign * eps * g / norm).float() for k, g in grad.items()}} for sign in (1, -1)]
    slope = (train_mode_loss(host, "site1", moved[0], 1) - train_mode_loss(host, "site1", moved[1], 1)) / (2 * eps)
    assert slope == pytest.approx(norm, rel=0.02)
    # the server steps against it: θ - c g with c = F / (‖g‖² + L F) for one client and q = 1
    out = host.algorithm.aggregate(1, [u], state)
    f, lip = u.extra[LOSS_KEY], host.algorithm.params.lipschitz
    for k, g in grad.items():
        expected = state["weights"][k].double() - f / (norm**2 + lip * f) * g
        torch.testing.assert_close(out["weights"][k].double(), expected, rtol=1e-5, atol=1e-7)


def test_fednova_with_equal_steps_is_fedavg_on_real_data(oph_root: Path) -> None:
    host = host_for(oph_root, "fednova")
    state, _, updates = fit_two(host)
    for u in updates:
        u.metrics["steps"] = 5.0  # as if both had taken the same number of steps
    out = host.algorithm.aggregate(1, updates, state)
    fedavg = weighted_average([u.tensors for u in updates], [u.num_examples for u in updates])
    for k in fedavg:
        torch.testing.assert_close(out["weights"][k], fedavg[k], rtol=1e-6, atol=1e-7)


def test_registered() -> None:
    assert {"fedadam", "fedyogi", "fedadagrad", "fednova", "qffl", "fairfed"} <= set(ALGORITHMS.names())
