"""Client-level differential privacy for federated rounds: the privacy keys, per-client clipping,
seeded Gaussian noise and Opacus' RDP accountant (shared by `dp_lora`, `ffa_lora` and `deer`).

The mechanism is DP-FedAvg's (McMahan et al., "Learning Differentially Private Recurrent
Language Models", ICLR 2018), as DEeR (Zhu et al., IEEE TMI 2024) and its baselines apply it on
the server: each sampled client's update Δ_k (the trained tensors minus the global ones, all of
them together as one vector) is clipped to L2 norm C, the clipped updates are summed, Gaussian
noise N(0, z²C²) is added to the sum and the result is divided by the number of updates:

    new = global + (Σ_k Δ_k · min(1, C/‖Δ_k‖) + N(0, z²C²·I)) / K

Every client weighs the same (a weighting by example count would let one client move the mean
by more than C/K). DEeR describes the noise as σ = z·C/√K added per client; the K draws sum to
the N(0, z²C²) above, which raysim draws once per round in the driver: the same noise for any
number of actors.

Where the noise comes from (`algorithm.noise`): `seeded` (the default) draws it
from `derive_seed(seed, "dp_noise", round)`. That is *simulated* DP: anyone holding
config.yaml can regenerate each round's noise and subtract it from the released weights,
recovering the clipped mean exactly; use it to study utility. `keyed` draws it from
HMAC-SHA256(key, "dp_noise" ‖ round) truncated to 64 bits, the key read in the driver actor from
`algorithm.noise_key_file` (absolute, outside the run directory, mode 0600) or
`$RAYSIM_NOISE_KEY` by `raysim.secrets.read_key`; neither the key nor a round's seed is ever
written (config, provenance, checkpoints, logs) and no generator state is checkpointed, so a
resumed run draws the same noise from the key again. Only keyed noise makes the released
weights differentially private against someone who reads the run directory.

Accounting: one Gaussian mechanism with sampling rate q = clients per round / clients (one
accountant step per round, q = 1 when every client takes part), composed by Opacus'
`RDPAccountant`; its history [(z, q, steps)] lives in the server state (plain floats and
ints), so a resumed run reports the same ε. Opacus' analysis assumes Poisson sampling; raysim
samples a fixed number of clients, as DP-FedAvg implementations usually do. With the target
mode (the default) z is the smallest noise Opacus finds whose ε after `federation.rounds`
rounds stays within `algorithm.epsilon`; with a fixed `algorithm.noise_multiplier` the run
stops, with a checkpoint, before a round that would spend more than `algorithm.epsilon_max`.

Trust model: central DP. Clients send their exact updates; the server clips and noises them,
so the released global models (every payload, the final model) are (ε, δ)-DP with respect to
any one client's whole data set, but the server itself sees the raw updates.

Why 3 clients are mostly noise: the noise on the *mean* has standard deviation z·C/K in every
coordinate while a client moves the mean by at most C/K in norm. For ε = 3, δ = 1e-5, 50
rounds with every client in every round (q = 1), Opacus gives z ≈ 10.6: with K = 3 the noise
norm over d trained values is ≈ 3.5·C·√d against a signal of at most C when all 3 agree
(√d ≈ 300 for a small LoRA). K does not lower z at q = 1, it divides the noise on the mean by
K, and sampling (q < 1) lowers z (z ≈ 5.4 at q = 0.5): DEeR's K = 12 has 4x less noise than 3
clients at the same z, and benchmarks use 12 clients (`data.partition`) for that reason. (The
DEeR code computes z with a sample-level DP-SGD rate, batch / all examples, over every local
step, which gives a far smaller z than this client-level accounting for the same ε.)
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raysim import secrets
from raysim.seeding import derive_seed
from raysim.types import Tensors

NOISE = "dp_noise"  # derive_seed's (and the keyed HMAC's) tag for the round's noise
NOISE_KEY_ENV = "RAYSIM_NOISE_KEY"  # keyed noise without algorithm.noise_key_file reads the key from here
Entry = tuple[float, float, int]  # an accountant history entry: (noise multiplier z, sample rate q, steps)


@dataclass
class PrivacyParams:
    epsilon: float = 3.0  # target ε for the whole run (federation.rounds); DEeR's Kvasir table uses 1, 3, 6
    delta: float = 1e-5  # δ; DEeR used 1/K (K clients: 1/12), far weaker than the usual δ < 1/clients
    clip: float = 0.3  # C: each client's whole update is clipped to this L2 norm (per method: its paper's C at ε = 3)
    noise_multiplier: float | None = None  # z; None: from algorithm.epsilon for federation.rounds; a number: fixed z
    epsilon_max: float | None = None  # with a fixed z: the run stops before a round would spend more; None: algorithm.epsilon
    noise: str = "seeded"  # seeded: from the config's seed (simulated DP: config.yaml regenerates it); keyed: from a secret key
    noise_key_file: str | None = None  # keyed: absolute path of the key file (mode 0600, outside the run directory); null: $RAYSIM_NOISE_KEY

    def __post_init__(self) -> None:
        if self.noise not in NOISE_MODES:
            raise ValueError(f"algorithm.noise must be one of {', '.join(NOISE_MODES)}, got {self.noise!r}")
        if self.noise_key_file is not None:
            if self.noise != "keyed":
                raise ValueError("algorithm.noise_key_file is set but algorithm.noise is not keyed; set algorithm.noise=keyed, or drop algorithm.noise_key_file")
            if not Path(self.noise_key_file).expanduser().is_absolute():
                raise ValueError(f"algorithm.noise_key_file must be an absolute path (the driver may run in another directory), got {self.noise_key_file!r}")
        _finite_positive("algorithm.epsilon", self.epsilon, "the privacy budget ε")
        _finite_positive("algorithm.clip", self.clip, "the clipping norm C")
        if not (_is_number(self.delta) and 0 < self.delta < 1):
            raise ValueError(f"algorithm.delta must be a number in (0, 1), got {self.delta!r}")
        if self.noise_multiplier is None:
            if self.epsilon_max is not None:
                raise ValueError("algorithm.epsilon_max applies only with a fixed algorithm.noise_multiplier (otherwise algorithm.epsilon is the budget)")
        else:
            _finite_positive("algorithm.noise_multiplier", self.noise_multiplier, "the noise multiplier z; 0 adds no noise, i.e. no privacy: use fedlora for that")
        if self.epsilon_max is not None:
            _finite_positive("algorithm.epsilon_max", self.epsilon_max, "the ε at which the run stops")

    @property
    def budget(self) -> float:
        """The ε no round may exceed."""
        return float(self.epsilon_max if self.epsilon_max is not None else self.epsilon)

    def check_config(self, cfg: Any) -> None:
        """Before Ray: an `epsilon_max` that round 1 alone exceeds (every client sampled, q = 1;
        with federation.clients_per_round q needs the data, and the driver refuses it instead)."""
        if self.epsilon_max is None or self.noise_multiplier is None or cfg.federation.clients_per_round is not None:
            return
        first = spent([(self.noise_multiplier, 1.0, 1)], self.delta)
        if first > self.epsilon_max:
            raise ValueError(
                f"algorithm.epsilon_max={self.epsilon_max:g} is below the ε = {first:.4g} that round 1 alone spends (algorithm.noise_multiplier={self.noise_multiplier:g}, "
                f"δ = {self.delta:g}, every client sampled): the run would stop before training; raise algorithm.epsilon_max or algorithm.noise_multiplier"
            )


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite_positive(key: str, value: object, what: str) -> None:
    if not (_is_number(value) and math.isfinite(value) and value > 0):  # type: ignore[arg-type]
        raise ValueError(f"{key} must be a finite number > 0 ({what}), got {value!r}")


# --- the accountant (Opacus) ------------------------------------------------------------------


def _accountant(history: Iterable[Entry]) -> Any:
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(float(z), float(q), int(n)) for z, q, n in history]
    return accountant


def spent(history: Iterable[Entry], delta: float) -> float:
    """ε spent by the mechanisms in `history` at this δ (Opacus' RDP accountant)."""
    return _spent(tuple((float(z), float(q), int(n)) for z, q, n in history), float(delta))


@functools.lru_cache(maxsize=256)
def _spent(history: tuple[Entry, ...], delta: float) -> float:
    # cached: with q < 1 Opacus needs ~0.5 s, and stop_before(t + 1) asks for what server_metrics(t) reports
    with warnings.catch_warnings():  # Opacus warns when the best RDP order is at the edge of its list
        warnings.simplefilter("ignore")
        return float(_accountant(history).get_epsilon(delta=delta))


def after_step(history: Iterable[Entry], noise_multiplier: float, sample_rate: float) -> list[Entry]:
    """The history with one more round (Opacus merges it into the last entry when z and q match)."""
    accountant = _accountant(history)
    accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    return [(float(z), float(q), int(n)) for z, q, n in accountant.history]


def noise_for_budget(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier z whose ε after `steps` rounds at rate q is at most `epsilon`
    (Opacus' search: within 0.01 below it)."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps, accountant="rdp"))
    except ValueError as err:  # "The privacy budget is too low."
        raise ValueError(f"algorithm.epsilon={epsilon} cannot be met for {steps} rounds at sample rate {sample_rate:.3g} and δ={delta} ({err}); raise it or lower federation.rounds") from err


def sample_rate(clients_per_round: int | None, num_clients: int | None) -> float:
    """q = clients sampled per round / clients; 1 when every client takes part."""
    if clients_per_round is None:
        return 1.0
    if not num_clients:
        raise RuntimeError("client-level DP with federation.clients_per_round needs the number of clients (known after prepare_run)")
    return min(clients_per_round, num_clients) / num_clients


def plan(params: PrivacyParams, *, rate: float, rounds: int) -> dict[str, Any]:
    """The privacy part of the server state: z (computed for the target or fixed), q, δ, the
    ε budget and the accountant's history (empty)."""
    z = params.noise_multiplier if params.noise_multiplier is not None else noise_for_budget(params.epsilon, params.delta, rate, rounds)
    return {"noise_multiplier": float(z), "sample_rate": float(rate), "delta": float(params.delta), "budget": params.budget, "history": []}


def stop_reason(privacy: Mapping[str, Any], round_: int) -> str | None:
    """Why round `round_` must not run (it would spend more than the budget), or None."""
    history = privacy["history"]
    next_epsilon = spent(after_step(history, privacy["noise_multiplier"], privacy["sample_rate"]), privacy["delta"])
    if next_epsilon <= privacy["budget"]:
        return None
    return (
        f"privacy budget: round {round_} would spend ε = {next_epsilon:.4g} > {privacy['budget']:.4g} "
        f"(algorithm.epsilon_max; δ = {privacy['delta']:.3g}, z = {privacy['noise_multiplier']:.4g}); spent so far ε = {spent(history, privacy['delta']):.4g}"
    )


# --- clipping and noise -----------------------------------------------------------------------


class ClippedSum:
    """The fold of one DP round: Σ_k clip(Δ_k, C) over the updates, in float64, and their number.

    Δ_k is the update's `keys` minus `reference` (the round's global weights), one vector over
    all keys; tensors outside `keys` are ignored, a missing key is an error. Keeps running sums
    only, never an update.
    """

    def __init__(self, reference: Tensors, keys: Iterable[str], clip: float) -> None:
        self.reference = reference
        self.keys = sorted(keys)
        self.clip = float(clip)
        self.sums = {k: torch.zeros(reference[k].shape, dtype=torch.float64) for k in self.keys}
        self.count = 0
        self.norms: list[float] = []  # each update's norm before clipping, in arrival order

    def add(self, tensors: Tensors, client_id: str = "?") -> None:
        missing = [k for k in self.keys if k not in tensors]
        if missing:
            raise ValueError(f"client {client_id}: the update lacks {missing[:3]} (expected every trained key)")
        deltas = {}
        for k in self.keys:
            if not tensors[k].is_floating_point():
                raise ValueError(f"client {client_id}: {k} is {tensors[k].dtype}; client-level DP clips and noises float tensors only")
            deltas[k] = tensors[k].detach().to("cpu", torch.float64) - self.reference[k].detach().to("cpu", torch.float64)
        norm = math.sqrt(sum(float(d.square().sum()) for d in deltas.values()))
        factor = min(1.0, self.clip / norm) if norm > 0 else 1.0
        for k, d in deltas.items():
            self.sums[k].add_(d, alpha=factor)
        self.count += 1
        self.norms.append(norm)


def read_noise_key(params: PrivacyParams, run_dir: Path | str | None) -> bytes | None:
    """The keyed-noise key (`algorithm.noise: keyed`), read where the noise is drawn (the driver);
    None for seeded noise. A ConfigError when keyed noise has no usable key."""
    if params.noise != "keyed":
        return None
    return secrets.read_key(params.noise_key_file, NOISE_KEY_ENV, file_key="algorithm.noise_key_file", enabled_by="algorithm.noise=keyed", purpose="DP noise", run_dir=run_dir, private=True)


NOISE_MODES = ("seeded", "keyed")  # algorithm.noise


def keyed_seed(key: bytes, round_: int) -> int:
    """Keyed noise's generator seed of a round: HMAC-SHA256(key, "dp_noise" ‖ round), 64 bits."""
    return int.from_bytes(secrets.derive(key, NOISE, round_)[:8], "big")


def gaussian(shapes: Mapping[str, torch.Size | tuple[int, ...]], std: float, seed: int, round_: int, *, key: bytes | None = None) -> dict[str, torch.Tensor]:
    """N(0, std²) per element for each named shape (float64, CPU), drawn in sorted name order
    from one generator seeded by (seed, round) alone, or with `key` by (key, round) alone."""
    return dict(gaussian_stream(shapes, std, seed, round_, key=key))


def gaussian_stream(shapes: Mapping[str, torch.Size | tuple[int, ...]], std: float, seed: int, round_: int, *, key: bytes | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """`gaussian`, one (name, noise) at a time (a caller that transforms each draw holds one).
    The generator's seed is never returned, logged or kept."""
    generator = torch.Generator().manual_seed(derive_seed(seed, NOISE, round_) if key is None else keyed_seed(key, round_))
    for k in sorted(shapes):
        yield k, torch.randn(tuple(shapes[k]), generator=generator, dtype=torch.float64).mul_(std)


def noisy_mean(fold: ClippedSum, noise: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """global + (Σ clipped Δ + noise) / K, in each key's own dtype."""
    out = {}
    for k in fold.keys:
        ref = fold.reference[k]
        out[k] = (ref.detach().to("cpu", torch.float64) + (fold.sums[k] + noise[k]) / fold.count).to(ref.dtype)
    return out
