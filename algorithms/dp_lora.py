"""DP-LoRA: FedLoRA with client-level differential privacy, the plain baseline of DEeR
(Zhu et al., "DEeR: Deviation Eliminating and Noise Regulating for Privacy-preserving Federated
Low-rank Adaptation", IEEE TMI 2024, Table I "LoRA" under DP).

Every round each sampled client trains LoRA's A and B and the head (a U-Net's decoder and
segmentation head too) and sends them; the server clips each client's whole update to
norm C, adds N(0, z²C²) to the sum and divides by the number of updates (`raysim.algorithms.dp`),
on A and B alike: no alternation, no regulator, so the product (B+N_B)(A+N_A) carries the
cross term N_B·N_A that DEeR removes. The accountant, the keys `algorithm.epsilon` / `delta` /
`clip` / `noise_multiplier` / `epsilon_max` and the trust model are described in `dp`; ε spent
and δ are written per round as the server metrics `epsilon` and `delta`. The noise is seeded
by default: simulated DP, which anyone with config.yaml can regenerate and subtract;
`algorithm.noise: keyed` draws it from a secret key (`dp` describes both).

What is released (all three DP methods): the trained tensors only, every one under the same clip
and noise. Normalisation layers' affine parameters (BatchNorm and LayerNorm alike) of the frozen
backbone are trained and released only with `algorithm.train_norm: true` (DEeR's reference code
noises the LoRA factors and the head; FedLoRA trains them). Running statistics (BatchNorm's mean,
variance and batch count, e.g. a U-Net decoder's) are buffers, not trained values: they never
enter a release and stay with each client, as FedBN's do; a held-out site is scored with its
statistics re-estimated on its own images (`refit_norm_statistics`).

Differences from the DEeR reference code: the whole update is clipped as one vector (the
reference clips every tensor to C separately, so one client moves the sum by up to √(#tensors)·C
while the noise is calibrated for C), clients are sampled by `federation.clients_per_round`
with q = clients per round / clients in the accountant (the reference accounts a sample-level
DP-SGD rate), and δ defaults to 1e-5, not 1/K.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import raysim.algorithms.dp as dp
from raysim.algorithms.base import ServerState, register_algorithm
from raysim.algorithms.fedbn import norm_keys, own_image_batches, refit_norm_statistics
from raysim.algorithms.fedlora import FedLoRA, LoRAParams
from raysim.config import ConfigError
from raysim.datasets.base import ClientSpec, DataSource
from raysim.types import Tensors, Update

if TYPE_CHECKING:
    from raysim.client.client import Client


@dataclass
class DPLoRAParams(dp.PrivacyParams, LoRAParams):
    rank: int | None = 8  # adapter rank r: DEeR's r = 8 for every method it compares
    alpha: float | None = 8.0  # the low-rank path is scaled by alpha / r: DEeR's α = 8
    clip: float = 0.2  # C: the DEeR code's "LoRA" C at ε = 3 (0.1 at ε = 1, 0.3 at ε = 6)
    train_norm: bool = False  # the backbone's norm-layer affine parameters stay frozen: only the adapters and the head are noised

    def __post_init__(self) -> None:
        LoRAParams.__post_init__(self)
        dp.PrivacyParams.__post_init__(self)


@register_algorithm("dp_lora")
class DPLoRA(FedLoRA):
    on_clip = False  # its privacy accounting covers the adapters; a CLIP prompt head is not analysed
    Params = DPLoRAParams
    num_clients: int | None = None  # set by prepare_run (the accountant's q needs it)
    noise_key: bytes | None = None  # algorithm.noise=keyed: read in the driver by read_keys, never in a client actor
    newcomer = "the global model with BatchNorm running statistics re-estimated on the site's own training images (label-free forward passes, no training): statistics never enter a DP release"

    def communicated(self, model: nn.Module) -> list[str]:
        """The trained tensors; running statistics stay with each client (never clipped nor noised)."""
        local = norm_keys(model, params=False)
        return [k for k in super().communicated(model) if k not in local]

    def newcomer_model(self, client: Client, payload: Tensors) -> nn.Module:
        """The payload over the initial model, its BatchNorm statistics (those a method trains:
        a U-Net decoder's) re-estimated on the site's own images, as FedBN's newcomer's."""
        return refit_norm_statistics(self.eval_model(client, payload), own_image_batches(client, self.cfg.federation.batch_size))

    def read_keys(self, run_dir: Path) -> None:
        """Keyed noise: the key, read here in the driver (`dp.read_noise_key`); seeded: nothing."""
        self.noise_key = dp.read_noise_key(self.params, run_dir)

    def prepare_run(self, source: DataSource, specs: list[ClientSpec], run_dir: Path, echo: Callable[[str], None]) -> dict[str, Any]:
        self.num_clients = len(specs)
        privacy = self.privacy_plan()
        final = dp.spent([(privacy["noise_multiplier"], privacy["sample_rate"], self.cfg.federation.rounds)], privacy["delta"])
        echo(
            f"privacy: client-level DP, noise multiplier z = {privacy['noise_multiplier']:.4g}, clip C = {self.params.clip:g}, "
            f"sample rate q = {privacy['sample_rate']:.3g}; ε = {final:.4g} at δ = {privacy['delta']:.3g} after {self.cfg.federation.rounds} rounds"
        )
        return super().prepare_run(source, specs, run_dir, echo)

    def privacy_plan(self) -> dict[str, Any]:
        """z, q, δ, the ε budget and an empty history (computed once per run)."""
        if getattr(self, "_plan", None) is None:
            rate = dp.sample_rate(self.cfg.federation.clients_per_round, self.num_clients)
            try:
                self._plan = dp.plan(self.params, rate=rate, rounds=self.cfg.federation.rounds)
            except ValueError as err:
                raise ConfigError(f"algorithm {self.name}: {err}") from err
        return {**self._plan, "history": []}

    def init_state(self, model: nn.Module) -> ServerState:
        state = super().init_state(model)
        integers = [k for k, v in state["weights"].items() if not v.is_floating_point()]
        if integers:
            raise ConfigError(f"algorithm {self.name}: client-level DP noises float tensors only; the model communicates {integers[:3]}")
        return {**state, "privacy": self.privacy_plan()}

    # --- server: clip, sum, noise, account ---------------------------------------------------

    def fold_start(self, round_: int, state: ServerState, statistics: dict[str, dict[str, Any]]) -> dp.ClippedSum:
        return dp.ClippedSum(state["weights"], self.trained_keys(round_, list(state["weights"])), self.params.clip)

    def accumulate(self, fold: dp.ClippedSum, update: Update) -> None:
        fold.add(update.tensors, update.client_id)

    def finalize(self, round_: int, fold: dp.ClippedSum, state: ServerState) -> ServerState:
        if fold.count == 0:  # nothing released, nothing spent
            return state
        privacy = state["privacy"]
        z = privacy["noise_multiplier"]
        averaged = dp.noisy_mean(fold, self.noise(round_, fold.keys, state["weights"], z * self.params.clip))
        weights = {**state["weights"], **self.server_blend(round_, averaged, state["weights"])}
        history = dp.after_step(privacy["history"], self.released_multiplier(round_, fold.keys, state["weights"], z), privacy["sample_rate"])
        return {**state, "weights": weights, "privacy": {**privacy, "history": history}}

    def noise(self, round_: int, keys: list[str], weights: Tensors, std: float) -> dict[str, torch.Tensor]:
        """The round's noise on the sum of clipped updates, per trained key (float64): N(0, std²)
        drawn from (seed, round) alone, or (key, round) with keyed noise; DEeR projects it
        through its regulators."""
        return dp.gaussian({k: weights[k].shape for k in keys}, std, self.cfg.seed, round_, key=self.round_key())

    def round_key(self) -> bytes | None:
        """The key of keyed noise (None: seeded noise); keyed noise before `read_keys` is a bug."""
        if self.params.noise == "keyed" and self.noise_key is None:
            raise RuntimeError("algorithm.noise=keyed: the noise key was not read (the driver calls read_keys before the rounds)")
        return self.noise_key

    def released_multiplier(self, round_: int, keys: list[str], weights: Tensors, z: float) -> float:
        """The noise multiplier the round's release really has, for the accountant: z (DEeR's
        regulator may give less where its noise scaling is turned off)."""
        return z

    def server_metrics(self, round_: int, state: ServerState) -> dict[str, float]:
        privacy = state["privacy"]
        return {"epsilon": dp.spent(privacy["history"], privacy["delta"]), "delta": privacy["delta"]}

    def stop_before(self, round_: int, state: ServerState) -> str | None:
        return dp.stop_reason(state["privacy"], round_)
