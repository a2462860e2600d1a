"""DP-LoRA: FedLoRA with client-level differential privacy, the plain baseline of DEeR
(Zhu et al., "DEeR: Deviation Eliminating and Noise Regulating for Privacy-preserving Federated
Low-rank Adaptation", IEEE TMI 2024, Table I "LoRA" under DP).

Every round each sampled client trains LoRA's A and B (and, as FedLoRA does, the head and the
BatchNorm affine parameters) and sends them; the server clips each client's whole update to
norm C, adds N(0, z²C²) to the sum and divides by the number of updates (`raysim.algorithms.dp`),
on A and B alike: no alternation, no regulator, so the product (B+N_B)(A+N_A) carries the
cross term N_B·N_A that DEeR removes. The accountant, the keys `algorithm.epsilon` / `delta` /
`clip` / `noise_multiplier` / `epsilon_max` and the trust model are described in `dp`; ε spent
and δ are written per round as the server metrics `epsilon` and `delta`.

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
from typing import Any

import torch
from torch import nn

from raysim.algorithms import dp
from raysim.algorithms.base import ServerState, register_algorithm
from raysim.algorithms.fedlora import FedLoRA, LoRAParams
from raysim.config import ConfigError
from raysim.datasets.base import ClientSpec, DataSource
from raysim.types import Tensors, Update


@dataclass
class DPLoRAParams(dp.PrivacyParams, LoRAParams):
    rank: int | None = 8  # adapter rank r: DEeR's r = 8 for every method it compares
    alpha: float | None = 8.0  # the low-rank path is scaled by alpha / r: DEeR's α = 8
    clip: float = 0.2  # C: the DEeR code's "LoRA" C at ε = 3 (0.1 at ε = 1, 0.3 at ε = 6)

    def __post_init__(self) -> None:
        LoRAParams.__post_init__(self)
        dp.PrivacyParams.__post_init__(self)


@register_algorithm("dp_lora")
class DPLoRA(FedLoRA):
    Params = DPLoRAParams
    num_clients: int | None = None  # set by prepare_run (the accountant's q needs it)

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
        history = dp.after_step(privacy["history"], z, privacy["sample_rate"])
        return {**state, "weights": weights, "privacy": {**privacy, "history": history}}

    def noise(self, round_: int, keys: list[str], weights: Tensors, std: float) -> dict[str, torch.Tensor]:
        """The round's noise on the sum of clipped updates, per trained key (float64): N(0, std²)
        drawn from (seed, round) alone; DEeR projects it through its regulators."""
        return dp.gaussian({k: weights[k].shape for k in keys}, std, self.cfg.seed, round_)

    def server_metrics(self, round_: int, state: ServerState) -> dict[str, float]:
        privacy = state["privacy"]
        return {"epsilon": dp.spent(privacy["history"], privacy["delta"]), "delta": privacy["delta"]}

    def stop_before(self, round_: int, state: ServerState) -> str | None:
        return dp.stop_reason(state["privacy"], round_)
