"""What a DP method releases (issue 24): DEeR's ε is a bound (noise scaled by the frozen factor's
σ_max, or, with the scaling off, the ε really spent), running statistics never enter a release,
`algorithm.train_norm`, and keyed noise that no one without the key can regenerate."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from opacus.accountants import RDPAccountant
from test_dp_methods import DELTA, lora_layers, make, opacus_epsilon, server_rows, updates

from raysim import config
from raysim.algorithms import ALGORITHMS, dp
from raysim.algorithms import params as algorithm_params
from raysim.algorithms.base import HOLDOUT
from raysim.algorithms.fedbn import norm_keys
from raysim.datasets import DATASETS
from raysim.engine.checkpoints import load_server
from raysim.engine.driver import Driver, latest_checkpoint
from raysim.run import main as run_main

from helpers import load_config, make_driver, tiny_overrides

STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
DP_METHODS = ("deer", "dp_lora", "ffa_lora")


def with_singular_values(shape: tuple[int, ...], values: list[float], seed: int) -> torch.Tensor:
    """A (rows x cols) matrix with the given singular values and random singular vectors."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = shape
    u, _ = torch.linalg.qr(torch.randn(rows, len(values), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(values), generator=gen, dtype=torch.float64))
    return (u * torch.tensor(values, dtype=torch.float64)) @ v.T


def sigma_max(t: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(t.to(torch.float64).flatten(1), ord=2))


# --- 1. DEeR: the noise the accountant assumes, or the ε really spent -----------------------------


@pytest.mark.parametrize("frozen", ["fc.lora_A", "fc.lora_B"])
def test_deer_released_factor_gets_at_least_z_c_noise_in_every_direction(frozen: str) -> None:
    """A frozen factor with σ_max = 5: the trained factor's noise covariance, estimated from many
    draws, has smallest eigenvalue ≥ z²C² (0.5.0: z²C²/25)."""
    algorithm, state, _ = make("deer", **{"algorithm.noise_multiplier": 1.0, "algorithm.epsilon_max": 1e9})
    weights = dict(state["weights"])
    stored = weights[frozen].shape  # fc: A (in 6, r 2), B (r 2, out 5)
    weights[frozen] = with_singular_values(tuple(stored), [5.0, 0.5], seed=1).to(weights[frozen].dtype)
    trained = "fc.lora_B" if frozen.endswith("A") else "fc.lora_A"
    rounds = range(1, 401, 2) if trained.endswith("B") else range(2, 402, 2)  # B sub-rounds are odd
    std = 1.0 * algorithm.params.clip
    keys = sorted(algorithm.trained_keys(rounds[0], list(weights)))
    # each output (B) / input (A) of the layer is one r-dimensional sample of the released factor's noise
    samples = torch.cat([(lambda n: n.T if trained.endswith("B") else n)(algorithm.noise(t, keys, weights, std)[trained]) for t in rounds])
    covariance = samples.T @ samples / len(samples)
    assert torch.linalg.eigvalsh(covariance)[0] >= std**2 * (1 - 0.1)
    assert algorithm.noise_scale(rounds[0], keys, weights) == pytest.approx(5.0, rel=1e-6)  # a float32 factor


def grown_state(algorithm, state: dict) -> dict:
    gen = torch.Generator().manual_seed(7)  # a B that has trained (B starts at zero): σ_max > 1
    return {**state, "weights": {k: v + 2.0 * torch.randn(v.shape, generator=gen) if k.endswith(".lora_B") else v for k, v in state["weights"].items()}}


def test_deer_without_noise_scaling_reports_the_epsilon_really_spent() -> None:
    """`algorithm.scale_noise=false` (0.5.0's noise): the `epsilon` rows are Opacus' composition over
    z/s per sub-round, above the target's; with scaling (the default) they are the target's,
    and `noise_scale` is s either way."""
    rows = {}
    for scale in (True, False):
        algorithm, state, _ = make("deer", **{"algorithm.scale_noise": scale})
        state = grown_state(algorithm, state)
        z = state["privacy"]["noise_multiplier"]
        accountant, scales, reported = RDPAccountant(), [], []
        for round_ in range(1, 5):
            frozen = ".lora_A" if round_ % 2 else ".lora_B"
            s = max([1.0, *(sigma_max(state["weights"][layer + frozen]) for layer in lora_layers(state))])
            scales.append(s)
            accountant.step(noise_multiplier=z if scale else z / s, sample_rate=1.0)
            keys = algorithm.trained_keys(round_, list(state["weights"]))
            state = algorithm.aggregate(round_, updates(state, keys), state)
            metrics = algorithm.server_metrics(round_, state)
            assert metrics["epsilon"] == pytest.approx(accountant.get_epsilon(delta=DELTA), rel=1e-9)
            assert metrics["noise_scale"] == pytest.approx(s, rel=1e-9) and metrics["delta"] == DELTA
            reported.append(metrics["epsilon"])
        assert scales[0] == 1.0 and scales[1] > 1.5  # LoRA's initial A has σ_max < 1; the grown B does not
        rows[scale] = reported
        assert algorithm.stop_before(5, state) is None  # the target run goes on in both modes
    target = [opacus_epsilon(z, 1.0, t) for t in range(1, 5)]
    assert rows[True] == pytest.approx(target, rel=1e-9)  # as 0.5.0 reported
    assert rows[False][0] == pytest.approx(target[0], rel=1e-9) and all(a > b for a, b in zip(rows[False][1:], target[1:], strict=True))


# --- 2. running statistics stay home; decoder and head under the clip and noise --------------------


def test_dp_lora_on_a_unet_never_releases_running_statistics(oph_root: Path, tmp_path: Path) -> None:
    """Two rounds of dp_lora on unet:test_resnet, the actors' body in-process: no update holds a
    running statistic, the decoder and head are clipped and noised with the factors, every
    participant keeps its own statistics, the held-out site is scored with statistics of its own
    images, and Dice is finite everywhere."""
    cfg = load_config(None, tiny_overrides(oph_root, **{"data.name": "synthetic", "model.name": "unet:test_resnet", "algorithm.name": "dp_lora", "eval.holdout_site": "site3"}))
    source = DATASETS.get("synthetic")(cfg.data, img_size=16, seed=0)
    specs = source.client_specs()
    from raysim.engine.client_actor import ClientHost

    host = ClientHost(cfg, [dataclasses.replace(s, role=HOLDOUT) if s.id == "site3" else s for s in specs])
    server = ALGORITHMS.get("dp_lora")(algorithm_params(cfg), cfg)
    server.prepare_run(source, specs[:2], tmp_path, lambda _: None)
    model = host.clients["site1"].model
    state = server.init_state(server.build_model(source))
    released = set(state["weights"])
    assert not any(k.endswith(STATISTICS) for k in released)
    assert any(k.startswith("decoder.") for k in released) and any(k.startswith("segmentation_head.") for k in released)
    assert not any(k in norm_keys(model) for k in released if k.startswith("encoder."))  # train_norm: false
    for round_ in (1, 2):
        batch = [host.fit(cid, server.payload(state, round_), round_) for cid in ("site1", "site2")]
        assert all(not any(k.endswith(STATISTICS) for k in u.tensors) for u in batch)
        before = state
        state = server.aggregate(round_, batch, state)
        moved = [k for k in released if k.startswith("decoder.") and not torch.equal(state["weights"][k], before["weights"][k])]
        assert moved  # the decoder is released with the factors, under the same clip and noise
    statistics = [k for k in norm_keys(model, params=False) if k.startswith("decoder.") and k.endswith("running_var")]
    own = host.clients["site1"].own_state
    assert statistics and all(k in own and (own[k] > 0).all() for k in statistics)  # kept by the client, never noised
    payload = server.payload(state, 3)
    newcomer = host.algorithm.newcomer_model(host.clients["site3"], payload).state_dict()
    assert all(not torch.equal(newcomer[k], host.clients["site3"].initial_state[k]) for k in statistics)  # its own images'
    for cid in ("site1", "site2", "site3"):
        for preds in host.evaluate(cid, payload):
            dice = np.concatenate([preds.values["dice_disc"], preds.values["dice_cup"]])
            assert len(dice) and np.isfinite(dice).all()


# --- 3. algorithm.train_norm ------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["test_resnet", "test_vit"])
def test_train_norm_decides_whether_norm_affine_parameters_are_released(model_name: str) -> None:
    """Default false for the DP methods, true for FedLoRA / FairLoRA, BatchNorm and LayerNorm alike."""
    import timm

    def released(name: str, *settings: str) -> set[str]:
        cfg = load_config(None, ["data.name=synthetic", f"algorithm.name={name}", *settings])
        algorithm = ALGORITHMS.get(name)(algorithm_params(cfg), cfg)
        model = algorithm.adapt(timm.create_model(model_name, num_classes=2), None)  # type: ignore[arg-type]
        norms = norm_keys(model, buffers=False) - {k for k in norm_keys(model, buffers=False) if k.startswith(("head", "fc."))}
        return set(algorithm.communicated(model)) & norms

    for name in DP_METHODS:
        assert released(name) == set()
        assert released(name, "algorithm.train_norm=true")
    assert released("fedlora") and not released("fedlora", "algorithm.train_norm=false")
    assert ALGORITHMS.get("fairlora").Params().train_norm  # FairLoRA trains them as FedLoRA does


# --- 4. keyed noise ---------------------------------------------------------------------------------


def key_file(path: Path, key: str) -> Path:
    path.write_text(key)
    os.chmod(path, 0o600)
    return path


def test_keyed_noise_depends_on_the_key_alone(tmp_path: Path) -> None:
    released = []
    for key in ("k" * 32, "k" * 32, "other-key-0123456789"):
        algorithm, state, _ = make("dp_lora", **{"algorithm.noise": "keyed", "algorithm.noise_key_file": key_file(tmp_path / "key", key)})
        algorithm.read_keys(tmp_path / "run")
        keys = list(state["weights"])
        released.append(algorithm.aggregate(1, updates(state, keys), state)["weights"])
    same, other = released[1], released[2]
    assert all(torch.equal(released[0][k], same[k]) for k in same)
    assert not any(torch.equal(same[k], other[k]) for k in same)
    seeded, state, _ = make("dp_lora")
    assert not any(torch.equal(seeded.aggregate(1, updates(state, keys), state)["weights"][k], same[k]) for k in same)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"algorithm.noise": "random"}, "algorithm.noise must be one of seeded, keyed"),
        ({"algorithm.noise_key_file": "/k"}, "algorithm.noise_key_file is set but algorithm.noise is not keyed"),
        ({"algorithm.noise": "keyed", "algorithm.noise_key_file": "k.txt"}, "algorithm.noise_key_file must be an absolute path"),
    ],
)
def test_keyed_noise_settings_are_checked(settings: dict, message: str) -> None:
    with pytest.raises(config.ConfigError, match=r"^algorithm deer: ") as err:
        load_config(None, ["algorithm.name=deer", "data.name=synthetic", *(f"{k}={v}" for k, v in settings.items())]).algorithm_params()
    assert message in str(err.value)


def test_keyed_noise_without_a_key_is_refused_before_ray(oph_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dp.NOISE_KEY_ENV, raising=False)
    out = tmp_path / "run"
    assert run_main(["--out", str(out), *tiny_overrides(oph_root, **{"algorithm.name": "dp_lora", "algorithm.noise": "keyed"})]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: algorithm.noise=keyed needs a key: set $RAYSIM_NOISE_KEY or algorithm.noise_key_file")
    assert not out.exists()  # nothing written
    key_file(tmp_path / "open", "k" * 32).chmod(0o644)
    assert run_main(["--out", str(out), *tiny_overrides(oph_root, **{"algorithm.name": "dp_lora", "algorithm.noise": "keyed", "algorithm.noise_key_file": tmp_path / "open"})]) == 2
    assert "is readable by others" in capsys.readouterr().err and not out.exists()


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_server(latest_checkpoint(run_dir))[0]["weights"]


def test_keyed_deer_run_resumes_identically_and_writes_no_secret(ray_session, oph_root: Path, tmp_path: Path) -> None:
    key = "secret-noise-key-" + "x" * 24
    path = key_file(tmp_path / "noise.key", key)
    tiny = {"algorithm.name": "deer", "resources.clients_per_actor": 3, "federation.rounds": 2, "eval.every": 2, "algorithm.rank": 4, "algorithm.noise": "keyed", "algorithm.noise_key_file": path}
    lines: list[str] = []
    full = make_driver(oph_root, tmp_path / "full", lines, **tiny).run()
    make_driver(oph_root, tmp_path / "cut", lines, **tiny).run(until=1)
    resumed = Driver(load_config(tmp_path / "cut" / "config.yaml"), tmp_path / "cut", echo=lines.append).run(resume=True)
    pd.testing.assert_frame_equal(resumed, full, check_exact=True)
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert list(server_rows(full)["metric"]) == ["delta", "epsilon", "noise_scale"] * 2
    # neither the key nor any round's seed (decimal, hex, raw bytes) anywhere in the run directories or the console
    seeds = [dp.keyed_seed(key.encode(), t) for t in (1, 2)]
    secrets = [key.encode()] + [s for seed in seeds for s in (str(seed).encode(), f"{seed:x}".encode(), seed.to_bytes(8, "big"))]
    files = [f for run in ("full", "cut") for f in (tmp_path / run).rglob("*") if f.is_file()]
    assert files and not [(f, s) for f in files for s in secrets if s in f.read_bytes()]
    console = "\n".join(lines).encode()
    assert not [s for s in secrets if s in console]
