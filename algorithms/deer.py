"""DEeR: deviation eliminator + noise regulator for differentially private federated LoRA
(Zhu, Mao, Liu, Yuan, "DEeR: Deviation Eliminating and Noise Regulating for Privacy-preserving
Federated Low-rank Adaptation", IEEE TMI 2024, arXiv:2410.12926).

Deviation eliminator: rounds alternate between sub-rounds. Odd rounds are B sub-rounds: every
client trains B (LoRA's zero-initialised factor, trained first as in the paper's alternating
minimisation) with the global A frozen; even rounds are A sub-rounds: B frozen, A trained. Only
the trained factor travels up (`trained_keys`), so all clients share the frozen one and
averaging is exact: mean_k(B_k)·A = mean_k(B_k·A). The head (a U-Net's decoder and head too)
trains and travels in every sub-round, and with `algorithm.train_norm: true` the backbone's
normalisation-layer affine parameters likewise. One raysim round is one
sub-round (the paper's round is a B and an A sub-round: its 50 rounds are
`federation.rounds=100`), and each is one step of the privacy accountant (`dp` says why
3 clients are mostly noise at these ε; the paper had K = 12).

Noise regulator: the server clips each client's whole update to norm C and adds Gaussian noise
to the sum as DP-LoRA does (`raysim.algorithms.dp`), but for each adapted layer it draws the
noise N (std z·C per element) in the layer's weight space, n_out x n_in (n_in = in·k·k for a
convolution), and projects it onto the trained factor with the frozen one:

    B sub-round: N_B = N·Aᵀ(A·Aᵀ)⁻¹    (n_out x r),  so N_B·A = N·P_A
    A sub-round: N_A = (Bᵀ·B)⁻¹Bᵀ·N    (r x n_in),   so B·N_A = P_B·N

with ΔW = B·A in the paper's layout: raysim stores a linear layer's A as (in, r) and B as
(r, out) (A = stored Aᵀ, B = stored Bᵀ) and a convolution's A as (r, in, k, k) and B as
(out, r, 1, 1). The weight-space noise is thus the projection of one full-rank Gaussian onto
the adapter's subspace, with no cross term N_B·N_A. A frozen factor whose Gram matrix cannot be
inverted reliably (condition number of the factor > 1e6, e.g. a B still all zeros) gets no
regulator that round: its partner then receives DP-LoRA's plain noise (logged). The other
trained tensors (head, decoder) get plain noise.

Noise scaling (raysim's, not the paper's): the regulated noise on the trained factor has
covariance z²C²·G⁻¹ (G = A·Aᵀ in B sub-rounds, Bᵀ·B in A sub-rounds), whose smallest
eigenvalue is z²C²/σ_max² for σ_max the frozen factor's largest singular value: where σ_max > 1
(a grown B in A sub-rounds: 20.7 after one round on the methods benchmark with 3 clients) the
trained factor got far less noise than z·C while the accountant was stepped with z, and the
reported ε was no bound (0.5.0). So each sub-round's weight-space noise is multiplied by
s = max(1, max over the regulated layers of σ_max(frozen factor)), computed from the public
global factors: the regulated covariance is then ⪰ z²C²·I, every released coordinate has at
least the noise the accountant assumes, and the target ε holds over `federation.rounds`. s is
written per round as the server metric `noise_scale`. `algorithm.scale_noise: false` (a
diagnostic) reproduces 0.5.0's release and steps the accountant with the noise really added,
z/s, so its `epsilon` rows are the ε truly spent (and the run does not stop at a target it
overspends by design).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

import raysim.algorithms.dp as dp
from raysim.algorithms.base import ServerState, register_algorithm
from raysim.algorithms.dp_lora import DPLoRA, DPLoRAParams
from raysim.types import Tensors

log = logging.getLogger(__name__)

A, B = ".lora_A", ".lora_B"
MAX_CONDITION = 1e6  # largest condition number of a frozen factor whose Gram matrix is inverted


@dataclass
class DEeRParams(DPLoRAParams):
    clip: float = 0.3  # C: the DEeR code's C for DEeR at ε = 3 on Kvasir (0.2 at ε = 1, 0.6 at ε = 6)
    scale_noise: bool = True  # noise × s = max(1, σ_max of the frozen factors) so the ε bound holds; false: 0.5.0's noise, ε accounted at z/s


def b_round(round_: int) -> bool:
    """Odd rounds train B (A frozen), even rounds train A (B frozen)."""
    return round_ % 2 == 1


def factor_matrices(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A as r x n_in, B as n_out x r) in float64, from raysim's stored layout (ΔW ∝ B·A)."""
    a, b = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    if a.dim() == 2:  # linear: A (in, r), B (r, out)
        return a.T, b.T
    return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)  # convolution: A (r, in, k, k), B (out, r, 1, 1)


def stored(matrix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A factor-space matrix back in the stored layout of `like`."""
    return matrix.T.contiguous() if like.dim() == 2 else matrix.reshape(like.shape)


def invertible(factor: torch.Tensor) -> bool:
    """Full rank r and condition number at most MAX_CONDITION."""
    s = torch.linalg.svdvals(factor)
    return bool(s.numel() and s[-1] > 0 and s[0] <= MAX_CONDITION * s[-1])


def largest_singular_value(factor: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(factor, ord=2))


def regulate_b(noise: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """N_B = N·Aᵀ(A·Aᵀ)⁻¹ for N (n_out x n_in) and A (r x n_in)."""
    return torch.linalg.solve(a @ a.T, (noise @ a.T).T).T


def regulate_a(noise: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """N_A = (Bᵀ·B)⁻¹Bᵀ·N for N (n_out x n_in) and B (n_out x r)."""
    return torch.linalg.solve(b.T @ b, b.T @ noise)


@register_algorithm("deer")
class DEeR(DPLoRA):
    Params = DEeRParams

    def trained_keys(self, round_: int, keys: list[str]) -> list[str]:
        frozen = A if b_round(round_) else B
        return [k for k in keys if not k.endswith(frozen)]

    def regulated(self, keys: list[str], weights: Tensors) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]:
        """Each trained key's draw shape (a regulated factor's: its layer's weight space), the
        regulated factors' layer (A, B) as matrices, and the factors left with plain noise."""
        shapes: dict[str, tuple[int, ...]] = {}
        partners: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        plain = []
        for k in keys:
            shapes[k] = tuple(weights[k].shape)
            trained, frozen = (B, A) if k.endswith(B) else (A, B) if k.endswith(A) else (None, None)
            if trained is None or k[: -len(trained)] + frozen not in weights:
                continue
            name = k[: -len(trained)]
            a, b = factor_matrices(weights[name + A], weights[name + B])
            if not invertible(a if trained == B else b.T):
                plain.append(k)
                continue
            partners[k] = (a, b)
            shapes[k] = (b.shape[0], a.shape[1])  # the layer's weight space, n_out x n_in
        return shapes, partners, plain

    def noise_scale(self, round_: int, keys: list[str], weights: Tensors) -> float:
        """s = max(1, largest singular value of any regulated layer's frozen factor): from the
        global factors alone (public: every payload holds them)."""
        return scale_of(self.regulated(keys, weights)[1])

    def noise(self, round_: int, keys: list[str], weights: Tensors, std: float) -> dict[str, torch.Tensor]:
        """Weight-space noise (std·s, `noise_scale`; std with scale_noise off) projected onto each
        trained factor; plain noise of std elsewhere."""
        shapes, partners, plain = self.regulated(keys, weights)
        if plain:
            log.warning("round %d: no noise regulator for %s (the frozen factor is rank-deficient or ill-conditioned): plain noise", round_, plain[:3])
        scaled = std * (scale_of(partners) if self.params.scale_noise else 1.0)
        drawn = {}
        for k, noise in dp.gaussian_stream(shapes, 1.0, self.cfg.seed, round_, key=self.round_key()):  # a weight-space draw is projected at once
            if k in partners:
                a, b = partners[k]
                noise = stored(regulate_b(noise.mul_(scaled), a) if k.endswith(B) else regulate_a(noise.mul_(scaled), b), weights[k])
            else:
                noise = noise.mul_(std)
            drawn[k] = noise
        return drawn

    def released_multiplier(self, round_: int, keys: list[str], weights: Tensors, z: float) -> float:
        """z with noise scaling; without it the regulated noise's smallest std is z·C/s, so the
        release is the Gaussian mechanism at z/s."""
        return z if self.params.scale_noise else z / self.noise_scale(round_, keys, weights)

    def finalize(self, round_: int, fold: dp.ClippedSum, state: ServerState) -> ServerState:
        new = super().finalize(round_, fold, state)
        if fold.count == 0:
            return new
        return {**new, "privacy": {**new["privacy"], "noise_scale": self.noise_scale(round_, fold.keys, state["weights"])}}

    def server_metrics(self, round_: int, state: ServerState) -> dict[str, float]:
        return {**super().server_metrics(round_, state), "noise_scale": float(state["privacy"].get("noise_scale", 1.0))}

    def stop_before(self, round_: int, state: ServerState) -> str | None:
        if not self.params.scale_noise and self.params.noise_multiplier is None:
            return None  # the diagnostic overspends its target by design: it runs every round and reports what it spent
        return super().stop_before(round_, state)


def scale_of(partners: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> float:
    """max(1, σ_max of each regulated layer's frozen factor: A for a trained B, B for a trained A)."""
    return max([1.0, *(largest_singular_value(a if k.endswith(B) else b) for k, (a, b) in partners.items())])
