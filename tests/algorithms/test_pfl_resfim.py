"""pFL-ResFIM: the amplitude swap, the Fisher, the top-ρ mask, the shared-element mean (plain
torch), the client half on the tiny set in an in-process actor body (no Ray), and one run through Ray."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from raysim.algorithms import ALGORITHMS
from raysim.algorithms import params as algorithm_params
from raysim.algorithms.pfl_resfim import MASK, PREFIX, box, diagonal_fisher, low_freq_amplitude, pack, split_payload, swap_amplitude, top_fraction, unpack
from raysim.client.training import Batch
from raysim.config import ConfigError
from raysim.datasets import DATASETS
from raysim.engine.client_actor import ClientHost
from raysim.engine.driver import Driver
from raysim.types import Update

from helpers import load_config, make_driver, tiny_overrides

FAST = {"algorithm.fisher_samples": 8, "algorithm.bank_size": 4}


def spectrum(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fft2(x.double()), dim=(-2, -1))


def real_images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


# --- frequency space --------------------------------------------------------------------------------


def test_the_box_is_centred_on_the_zero_frequency() -> None:
    assert box(16, 16, 0.1) == (slice(7, 10), slice(7, 10))  # b = ⌊1.6⌋ = 1: a 3×3 box around (8, 8)
    assert box(17, 32, 0.2) == (slice(5, 12), slice(13, 20))  # b = ⌊3.4⌋ = 3 from the shorter side
    x = real_images(2, 16, 15, 0)
    dc = low_freq_amplitude(x, 0.0)  # β = 0: the 1×1 box is the mean brightness term
    assert dc.shape == (2, 3, 1, 1)
    torch.testing.assert_close(dc[..., 0, 0], x.sum(dim=(-2, -1)))


@pytest.mark.parametrize(("h", "w", "beta"), [(16, 16, 0.1), (17, 15, 0.2), (32, 32, 0.05)])
def test_the_swap_keeps_the_phase_and_changes_only_the_low_frequency_box(h: int, w: int, beta: float) -> None:
    x, style = real_images(2, h, w, 1), real_images(2, h, w, 2)
    target = low_freq_amplitude(style, beta)
    lam = torch.tensor([1.0, 0.3])
    moved = swap_amplitude(x, target, lam, beta)
    assert moved.dtype == x.dtype and not moved.is_complex()
    before, after = spectrum(x), spectrum(moved)  # the spectrum of the *real* output: a broken symmetry would show
    rows, cols = box(h, w, beta)
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[rows, cols] = True
    torch.testing.assert_close(after[..., ~inside], before[..., ~inside], atol=1e-3, rtol=1e-5)  # outside: untouched
    expected = (1 - lam.view(-1, 1, 1, 1)) * before[..., rows, cols].abs() + lam.view(-1, 1, 1, 1) * target.double()
    torch.testing.assert_close(after[..., rows, cols].abs(), expected, atol=1e-3, rtol=1e-5)  # inside: the interpolated amplitude
    torch.testing.assert_close(after[..., rows, cols].angle(), before[..., rows, cols].angle(), atol=1e-4, rtol=0)  # and the phase kept
    assert not torch.allclose(moved, x, atol=1e-3)  # the style did change


def test_swapping_in_the_own_amplitude_is_the_identity() -> None:
    x = real_images(3, 16, 16, 3)
    for beta in (0.0, 0.1, 0.3):
        same = swap_amplitude(x, low_freq_amplitude(x, beta), torch.tensor([1.0, 0.5, 0.0]), beta)
        torch.testing.assert_close(same, x, atol=2e-6, rtol=0)


# --- Fisher and mask ------------------------------------------------------------------------------


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def test_the_fisher_is_the_mean_of_squared_per_sample_gradients() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    model.bn.running_mean.uniform_(-0.5, 0.5)  # eval mode uses these: not the batch's statistics
    x, y = torch.randn(6, 1, 5, 5), torch.tensor([0, 1, 1, 0, 1, 0])
    names = ["conv.weight", "bn.weight", "fc.weight", "fc.bias"]
    got = diagonal_fisher(model, Batch(x, y, {}, torch.arange(6)), names)

    # The direct computation: every sample's gradient at once (torch.func), squared, averaged.
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, (p, buffers), (xi[None],)), yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    assert set(got) == set(names)
    for name in names:
        torch.testing.assert_close(got[name], per_sample[name].square().mean(dim=0), atol=1e-6, rtol=1e-5)
    batch_grad = {k: g.mean(dim=0) for k, g in per_sample.items()}  # the squared mean gradient is another thing
    assert not torch.allclose(got["fc.weight"], batch_grad["fc.weight"].square())


def test_exactly_ceil_rho_n_elements_are_kept_the_largest_first() -> None:
    scores = {"a": torch.arange(60, dtype=torch.float32).view(6, 10), "b": torch.full((40,), 29.5)}
    masks = top_fraction(scores, 0.07)  # 0.07 · 100 must give 7, not ⌈7.000000000000001⌉ = 8
    assert sum(int(m.sum()) for m in masks.values()) == 7 and masks["a"].view(-1)[53:].all() and not masks["b"].any()
    masks = top_fraction(scores, 0.35)  # 35: a's 30 values above 29.5, then 5 of b's ties, the first ones
    assert int(masks["a"].sum()) == 30 and masks["b"].nonzero().view(-1).tolist() == [0, 1, 2, 3, 4]
    assert [int(m.sum()) for m in top_fraction({"c": torch.ones(7)}, 0.5).values()] == [math.ceil(3.5)]
    assert not any(m.any() for m in top_fraction(scores, 0.0).values())


def test_masks_travel_bit_packed() -> None:
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(0)) > 0.5
    bits = pack(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == 2
    assert torch.equal(unpack(bits, mask.shape, "w", "c0"), mask)


def masked_update(cid: str, values: dict[str, torch.Tensor], kept: dict[str, torch.Tensor], n: int) -> Update:
    tensors = {k: v.masked_fill(kept[k], 0) if k in kept else v for k, v in values.items()}
    return Update(cid, {**tensors, **{MASK + k: pack(m) for k, m in kept.items()}}, n)


def test_the_server_averages_each_element_over_the_clients_that_share_it() -> None:
    algorithm = make_algorithm()
    state = {"weights": {"w": torch.full((4,), 9.0), "n": torch.tensor(0)}, "bank": {}}
    kept0 = torch.tensor([True, False, True, False])
    kept1 = torch.tensor([False, False, True, True])
    updates = [
        masked_update("c0", {"w": torch.tensor([1.0, 2.0, 3.0, 4.0]), "n": torch.tensor(2)}, {"w": kept0}, 10),
        masked_update("c1", {"w": torch.tensor([5.0, 6.0, 7.0, 8.0]), "n": torch.tensor(4)}, {"w": kept1}, 30),
        Update("c2", {"w": torch.tensor([0.5, 1.0, 1.5, 2.0]), "n": torch.tensor(6)}, 20),
    ]
    new = algorithm.aggregate(1, updates, state)["weights"]
    expected = torch.tensor([(30 * 5 + 20 * 0.5) / 50, (10 * 2 + 30 * 6 + 20 * 1.0) / 60, 1.5, (10 * 4 + 20 * 2.0) / 30])
    torch.testing.assert_close(new["w"], expected, atol=0, rtol=1e-7)  # element 2: only c2 shares it
    assert new["n"].item() == 4  # buffers: FedAvg's rounded-down mean (2·10 + 4·30 + 6·20) / 60
    alone = algorithm.aggregate(1, updates[:2], state)["weights"]["w"]
    assert alone[2].item() == 9.0  # kept by every client of the round: the previous value stays


# --- the client half on the tiny set -----------------------------------------------------------------


def make_algorithm(**extra: object):  # type: ignore[no-untyped-def]
    cfg = load_config(None, [f"{k}={v}" for k, v in {"algorithm.name": "pfl_resfim", "data.name": "synthetic", **extra}.items()])
    return ALGORITHMS.get("pfl_resfim")(algorithm_params(cfg), cfg)


def make_host(root: Path, name: str = "pfl_resfim", **extra: object) -> ClientHost:
    """The tiny set's first two clients in one in-process actor body (no Ray)."""
    settings = {"algorithm.name": name, "resources.clients_per_actor": 2, **(FAST if name == "pfl_resfim" else {}), **extra}
    cfg = load_config(None, tiny_overrides(root, **settings))
    source = DATASETS.get("fairfedmed_oph")(cfg.data, img_size=16, seed=0)
    return ClientHost(cfg, source.client_specs()[:2])


def start(host: ClientHost) -> tuple[dict, dict]:
    """(server state, round-1 payload) after the driver's set-up step (every client's `setup`)."""
    shared = {cid: host.setup(cid) for cid in sorted(host.clients)}
    state = host.algorithm.setup_state(host.algorithm.init_state(host.clients["site1"].model), shared)
    return state, dict(host.algorithm.payload(state, 1))


def test_the_bank_holds_each_clients_low_frequency_amplitudes_only(oph_root: Path) -> None:
    host = make_host(oph_root)
    client = host.clients["site1"]
    shared = host.setup("site1")
    assert set(shared) == {"amplitude"} and shared["amplitude"].shape == (4, 1, 3, 3)  # 4 images, 1 channel, b = ⌊1.6⌋ = 1
    images = torch.from_numpy(client.shards["train"].images).float() / 255
    own = low_freq_amplitude(images, 0.1)
    assert all(any(torch.allclose(a, o) for o in own) for a in shared["amplitude"])  # amplitudes of the client's own images
    assert torch.equal(host.setup("site1")["amplitude"], shared["amplitude"])  # drawn by seed and client id
    state, payload = start(host)
    assert {k for k in payload if k.startswith(PREFIX)} == {PREFIX + "site1", PREFIX + "site2"}
    assert split_payload(payload)[0].keys() == state["weights"].keys()


def test_rho_zero_is_fedavg_bit_for_bit(oph_root: Path) -> None:
    fedavg, resfim = make_host(oph_root, "fedavg"), make_host(oph_root, **{"algorithm.rho": 0})
    state, payload = start(resfim)
    weights = split_payload(payload)[0]
    ours = [resfim.fit(cid, payload, 1) for cid in ("site1", "site2")]
    theirs = [fedavg.fit(cid, weights, 1) for cid in ("site1", "site2")]
    for a, b in zip(ours, theirs):
        assert a.tensors.keys() == b.tensors.keys() == weights.keys()
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in weights)
    assert not resfim.clients["site1"].local_elements
    merged = resfim.algorithm.aggregate(1, ours, state)["weights"]
    reference = fedavg.algorithm.aggregate(1, theirs, {"weights": state["weights"]})["weights"]
    assert all(torch.equal(merged[k], reference[k]) for k in reference)


def test_the_top_rho_elements_stay_with_the_client_the_rest_follow_the_server(oph_root: Path) -> None:
    host = make_host(oph_root, **{"algorithm.rho": 0.2})
    state, payload = start(host)
    updates = [host.fit(cid, payload, 1) for cid in ("site1", "site2")]
    client = host.clients["site1"]
    trained = {k for k, p in client.model.named_parameters() if p.requires_grad}
    n = sum(state["weights"][k].numel() for k in trained)
    masks = {k[len(MASK) :]: unpack(v, state["weights"][k[len(MASK) :]].shape, k, "site1") for k, v in updates[0].tensors.items() if k.startswith(MASK)}
    assert masks and set(masks) <= trained  # parameters only: buffers are always shared
    assert sum(int(m.sum()) for m in masks.values()) == math.ceil(0.2 * n)
    assert {k: m for k, (m, _) in client.local_elements.items()}.keys() == masks.keys()
    assert all(torch.equal(client.local_elements[k][0].cpu(), m) for k, m in masks.items())
    assert all(not updates[0].tensors[k][m].any() for k, m in masks.items())  # the client's own values never travel
    own = {k: v.cpu() for k, (_, v) in client.local_elements.items()}

    new = host.algorithm.aggregate(1, updates, state)
    loaded = client.load(split_payload(host.algorithm.payload(new, 2))[0]).state_dict()
    for key, server in new["weights"].items():
        mask = masks.get(key, torch.zeros_like(server, dtype=torch.bool))
        if key in masks:
            assert torch.equal(loaded[key].cpu()[mask], own[key][mask])  # the client's own where masked
        assert torch.equal(loaded[key].cpu()[~mask], server[~mask])  # the server's elsewhere
    other = updates[1].tensors  # an element site1 keeps and site2 shares gets site2's value alone
    shared_by_site2 = {k: m & ~unpack(other[MASK + k], m.shape, k, "site2") if MASK + k in other else m for k, m in masks.items()}
    assert sum(int(m.sum()) for m in shared_by_site2.values()) > 0
    assert all(torch.equal(new["weights"][k][m], other[k][m]) for k, m in shared_by_site2.items())


def test_style_transfer_is_seeded_and_changes_training(oph_root: Path) -> None:
    host = make_host(oph_root, **{"algorithm.rho": 0, "algorithm.style_prob": 1.0})
    algorithm, client = host.algorithm, host.clients["site1"]
    state, payload = start(host)
    algorithm.bank = split_payload(payload)[1]
    batches = lambda round_: [b for epoch in client.train_epochs(round_, 1, 16, host.cfg.seed) for b in epoch]  # noqa: E731
    first = [algorithm.batch_transform(client, 1)(b).x for b in batches(1)]  # type: ignore[misc]
    again = [algorithm.batch_transform(client, 1)(b).x for b in batches(1)]  # type: ignore[misc]
    later = [algorithm.batch_transform(client, 2)(b) for b in batches(1)]  # type: ignore[misc]
    plain = [b.x for b in batches(1)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(not torch.allclose(a, b.x) for a, b in zip(first, later))
    assert all((a != p).flatten(1).any(dim=1).all() for a, p in zip(first, plain))  # style_prob = 1: every image moves
    for a, p in zip(first, plain):  # a style is the low-frequency amplitude: the mean brightness moves, the edges hardly
        raw_a, raw_p = a * client.std + client.mean, p * client.std + client.mean
        assert (raw_a.mean(dim=(2, 3)) - raw_p.mean(dim=(2, 3))).abs().max() > 1e-3
    algorithm.bank = {"site1": algorithm.bank["site1"]}
    assert algorithm.batch_transform(client, 1) is None  # only its own bank: no other style to take
    plain_fit = make_host(oph_root, **{"algorithm.rho": 0}).fit("site1", payload, 1)
    styled_fit = host.fit("site1", payload, 1)
    assert any(not torch.equal(plain_fit.tensors[k], styled_fit.tensors[k]) for k in state["weights"])


@pytest.mark.parametrize(("key", "value"), [("rho", 1.5), ("rho", "-0.1"), ("beta", 0.5), ("bank_size", 0), ("bank_size", 2.5), ("fisher_samples", "true"), ("fisher_domains", -1), ("style_prob", ".nan")])
def test_bad_settings_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"algorithm.{key} must be"):
        make_algorithm(**{f"algorithm.{key}": value})


# --- through real Ray actors (one test) ------------------------------------------------------------------


def test_personal_elements_survive_resume_and_any_actor_layout(ray_session, oph_root: Path, tmp_path: Path) -> None:
    """Round 2 scores each client with the elements it kept in round 1: a resumed run (its clients'
    elements from the checkpoint, the bank from the server state) on 3 actors equals one run on 1."""
    settings = {"algorithm.name": "pfl_resfim", "algorithm.style_prob": 0.5, "algorithm.rho": 0.2, **FAST}
    full = make_driver(oph_root, tmp_path / "full", **settings, **{"resources.actors": 1}).run()
    make_driver(oph_root, tmp_path / "cut", **settings, **{"resources.actors": 3}).run(until=1)
    resumed = Driver(load_config(tmp_path / "cut" / "config.yaml"), tmp_path / "cut", echo=lambda _: None).run(resume=True)
    pd.testing.assert_frame_equal(full, resumed, check_exact=True)
    up = full[(full["metric"] == "bytes_up") & (full["client"] == "site1")]["value"].to_numpy()
    down = full[(full["metric"] == "bytes_down") & (full["client"] == "site1")]["value"].to_numpy()
    weights = down - 3 * 4 * 1 * 3 * 3 * 4  # down: the weights and the bank (3 clients × 4 entries × 1 channel × 3×3 float32)
    assert len(up) == 2 and ((up > weights) & (up - weights <= weights / 32 + 64)).all()  # up: the weights and < 1 bit per float32 element
