"""pFL-ResFIM (Zhu, Li, Wang and Lam, "Personalized Federated Learning with Residual Fisher
Information for Medical Image Segmentation", ISBI 2026, arXiv:2603.14848; no public code): the
parameters most sensitive to other clients' image styles stay with each client, the rest are averaged.

What raysim computes (the paper's abstract and `specs/methods.md`; the details it leaves open are
raysim's choices, named as such):

1. Amplitude bank, once before round 1 (FedDG's, Liu et al. CVPR 2021). Each client shares, for
   `bank_size` of its training images (drawn by seed and client id), the centred low-frequency
   box of the Fourier amplitude: |FFT2(x)| fftshifted, rows and columns c−b..c+b with
   b = ⌊β·min(H, W)⌋, per channel, x on the [0, 1] pixel scale. FedDG shares whole spectra;
   only this box is ever used, so only it leaves the client. The server keeps the bank in its
   state and sends it down with the weights every round.
2. Style transfer (FedDG's continuous frequency-space interpolation): client k's image x in the
   style of bank entry a of client j ≠ k: inside the box the amplitude becomes (1−λ)|X| + λ·a,
   the phase and every frequency outside the box stay; inverse FFT, clipped to [0, 1] as FedDG does.
3. Residual Fisher, every round after local training, on the client's trained model in eval mode
   (BatchNorm on running statistics, so a sample's gradient does not depend on the others):
   F(D) = (1/S) Σ_s (∂ℓ(x_s)/∂θ)² element-wise over S = `fisher_samples` own training images
   (per-sample gradients of the cross-entropy), F(D̃_j) on the same images each moved fully
   (λ = 1) to the style of a bank entry of client j, R = mean_j |F(D̃_j) − F(D)| over the other
   clients j (`fisher_domains` of them when set).
4. The ⌈ρ·N⌉ elements with the largest R (N: every element of the trained parameters, ranked
   together, ties by position) are the client's own: `client.keep_elements` keeps them (every
   later load puts them over the server's values) and the update carries them as zeros plus a
   bit-packed mask. Buffers (BatchNorm statistics) have no Fisher and are always shared.
5. Server: each element is the example-weighted mean over the clients that share it ("aggregating
   only the domain-invariant parameters": one client's style-sensitive values never reach another);
   an element that no client of the round shares keeps its previous value.

ρ = 0 with `style_prob` = 0 is FedAvg bit for bit. `style_prob` > 0 also trains on style-transferred
images (λ ~ U(0, 1) per image, FedDG's augmentation); the abstract uses the transfer only to
estimate ResFIM, so it is off by default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from itertools import count
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from raysim.algorithms.aggregation import AggregationError, WeightedSum
from raysim.algorithms.base import Algorithm, ServerState, register_algorithm
from raysim.client.training import Batch, LossFn, cross_entropy
from raysim.seeding import rng
from raysim.types import Tensors, Update

if TYPE_CHECKING:
    from raysim.client.client import Client

# Payload keys "pfl_resfim.bank/<client id>": (entries, C, 2b+1, 2b+1) amplitudes. Update keys
# "pfl_resfim.local/<state-dict key>": uint8 bits of the elements the client keeps (np.packbits of
# the flattened bool mask). A state-dict key is a dotted path and never holds "/".
PREFIX = "pfl_resfim.bank/"
MASK = "pfl_resfim.local/"


def _check(key: str, value: object, *, integer: bool = False, low: float = 0.0, high: float = math.inf, high_open: bool = False) -> None:
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value) and low <= value and (value < high if high_open else value <= high)  # type: ignore[operator, arg-type]
    if not ok:
        span = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"algorithm.{key} must be {'an integer' if integer else 'a number'} {span}, got {value!r}")


@dataclass
class ResFIMParams:
    """The paper publishes no defaults (β and ρ are tunable); each default's source is on its line."""

    rho: float = 0.1  # fraction ρ of the trained parameter elements kept local (largest residual Fisher); 0 = FedAvg; raysim's choice
    beta: float = 0.1  # low-frequency box: half-width b = ⌊β·min(H, W)⌋ (FDA's β); 0.1 is FedDG's and FDA's code default (FedDG ran 0.003 at 384 px)
    bank_size: int = 16  # images per client whose low-frequency amplitude is shared (FedDG shares every image's spectrum); raysim's choice
    fisher_samples: int = 64  # own training images S per Fisher estimate, drawn per round; raysim's choice
    fisher_domains: int = 0  # other clients j averaged in R per round; 0 = every other client (the paper's mean over j)
    style_prob: float = 0.0  # probability that a training image is style-transferred (FedDG's augmentation, λ ~ U(0, 1)); 0 = off

    def __post_init__(self) -> None:
        _check("rho", self.rho, high=1.0)
        _check("beta", self.beta, high=0.5, high_open=True)
        _check("bank_size", self.bank_size, integer=True, low=1)
        _check("fisher_samples", self.fisher_samples, integer=True, low=1)
        _check("fisher_domains", self.fisher_domains, integer=True)
        _check("style_prob", self.style_prob, high=1.0)


# --- frequency space ------------------------------------------------------------------------------


def box(height: int, width: int, beta: float) -> tuple[slice, slice]:
    """Rows and columns of the centred low-frequency box of an fftshifted (H, W) spectrum."""
    b = math.floor(min(height, width) * beta)
    return slice(height // 2 - b, height // 2 + b + 1), slice(width // 2 - b, width // 2 + b + 1)


def low_freq_amplitude(x: torch.Tensor, beta: float) -> torch.Tensor:
    """(..., H, W) real images -> (..., 2b+1, 2b+1): the amplitude of the centred low frequencies."""
    rows, cols = box(x.shape[-2], x.shape[-1], beta)
    return torch.fft.fftshift(torch.fft.fft2(x).abs(), dim=(-2, -1))[..., rows, cols]


def swap_amplitude(x: torch.Tensor, target: torch.Tensor, lam: torch.Tensor, beta: float) -> torch.Tensor:
    """x (N, C, H, W) with the amplitude inside the low-frequency box set to (1−λ_n)|X| + λ_n·target_n
    (target (N, C, 2b+1, 2b+1), λ (N,)); the phase and everything outside the box are unchanged."""
    rows, cols = box(x.shape[-2], x.shape[-1], beta)
    spectrum = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))
    inner = spectrum[..., rows, cols]
    lam = lam.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    spectrum[..., rows, cols] = torch.polar((1 - lam) * inner.abs() + lam * target.to(x.dtype), inner.angle())
    # Both amplitudes are symmetric (real images), so the spectrum stays Hermitian: the result is real.
    return torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).real


# --- the Fisher and the mask ----------------------------------------------------------------------


def diagonal_fisher(model: nn.Module, batch: Batch, names: list[str], loss_fn: LossFn = cross_entropy) -> dict[str, torch.Tensor]:
    """F_i = (1/S) Σ_s (∂ℓ(x_s)/∂θ_i)² for the parameters `names`: each sample's own gradient, in eval mode."""
    model.eval()
    params = dict(model.named_parameters())
    chosen = [params[n] for n in names]
    fisher = [torch.zeros_like(p) for p in chosen]
    n = len(batch.y)
    for s in range(n):
        one = Batch(batch.x[s : s + 1], batch.y[s : s + 1], {a: c[s : s + 1] for a, c in batch.groups.items()}, batch.index[s : s + 1], None if batch.group is None else batch.group[s : s + 1])
        grads = torch.autograd.grad(loss_fn(model, one), chosen, allow_unused=True)
        for f, g in zip(fisher, grads):
            if g is not None:
                f.add_(g.detach().square())
    return {name: f / n for name, f in zip(names, fisher)}


def top_fraction(scores: Mapping[str, torch.Tensor], rho: float) -> dict[str, torch.Tensor]:
    """Bool masks of the ⌈ρ·N⌉ largest of all `scores` together (N elements; ties: the earlier key and position)."""
    flat = torch.cat([v.detach().float().cpu().flatten() for v in scores.values()])
    k = math.ceil(round(rho * flat.numel(), 9))  # round: 0.07·100 must be 7, not 7.000000000000001
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    sizes = [v.numel() for v in scores.values()]
    return {key: part.view(v.shape) for (key, v), part in zip(scores.items(), chosen.split(sizes))}


def pack(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.cpu().numpy().ravel()))


def unpack(bits: torch.Tensor, shape: torch.Size, key: str, client_id: str) -> torch.Tensor:
    numel = math.prod(shape)
    if bits.dtype != torch.uint8 or bits.numel() != (numel + 7) // 8:
        raise AggregationError(f"client {client_id}: {MASK}{key} must hold {(numel + 7) // 8} uint8 bytes, got {bits.numel()} {bits.dtype}")
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=numel).astype(bool)).view(shape)


def split_payload(payload: Tensors) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model tensors, client id -> amplitude bank entries) of a pFL-ResFIM payload."""
    weights = {k: v for k, v in payload.items() if not k.startswith(PREFIX)}
    return weights, {k[len(PREFIX) :]: v for k, v in payload.items() if k.startswith(PREFIX)}


class SharedMean:
    """The round's fold: Σ_k w_k t_k with each client's own elements entering as 0 (a `WeightedSum`),
    and per tensor that any client keeps elements of, Σ_k w_k m_k over the clients that keep each."""

    def __init__(self) -> None:
        self.sum = WeightedSum()
        self.kept: dict[str, torch.Tensor] = {}

    def add(self, update: Update) -> None:
        tensors = {k: v for k, v in update.tensors.items() if not k.startswith(MASK)}
        masks = {}
        for name, bits in update.tensors.items():
            if name.startswith(MASK):
                key = name[len(MASK) :]
                if key not in tensors or not tensors[key].is_floating_point():
                    raise AggregationError(f"client {update.client_id}: {name} names no float tensor of the update")
                masks[key] = unpack(bits, tensors[key].shape, key, update.client_id)
                tensors[key] = tensors[key].masked_fill(masks[key], 0)  # a new tensor: the update's is only read
        weight = float(update.num_examples)
        self.sum.add(tensors, weight, update.client_id)
        for key, mask in masks.items():
            self.kept.setdefault(key, torch.zeros(mask.shape, dtype=torch.float64)).add_(mask.to(torch.float64), alpha=weight)

    def mean(self, previous: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per element Σ w t / Σ w over the clients sharing it; `previous` where none does."""
        out = self.sum.mean()
        for key, kept in self.kept.items():
            sharing = self.sum.total - kept  # example counts: exact in float64
            value = self.sum.sums[key] / sharing.clamp_min(1.0)
            out[key] = torch.where(sharing > 0, value, previous[key].to(torch.float64)).to(self.sum.reference[key][1])
        return out


@register_algorithm("pfl_resfim")
class PFLResFIM(Algorithm):
    """Server: the amplitude bank in its state, the shared-element mean. Client: Fisher, mask, own elements."""
    tasks = ("classification",)  # its per-sample Fisher information is computed on classification batches
    down_only = PREFIX

    Params = ResFIMParams
    params: ResFIMParams
    bank: dict[str, torch.Tensor]  # in a client actor: the bank of the payload being trained (set in client_fit)

    # --- before round 1 -----------------------------------------------------------------------

    def client_setup(self, client: Client) -> dict[str, Any]:
        """The low-frequency amplitude box of `bank_size` training images: (n, C, 2b+1, 2b+1) floats, no pixels."""
        shard = client.shards["train"]
        n = len(shard.table)
        chosen = np.sort(rng(self.cfg.seed, "pfl_resfim.bank", client.id).choice(n, size=min(self.params.bank_size, n), replace=False))
        images = torch.from_numpy(shard.images[chosen]).to(torch.float32).div_(255.0)
        return {"amplitude": low_freq_amplitude(images, self.params.beta)}

    def setup_state(self, state: ServerState, shared: dict[str, dict[str, Any]]) -> ServerState:
        return {**state, "bank": {**state["bank"], **{cid: s["amplitude"] for cid, s in shared.items()}}}

    # --- server side --------------------------------------------------------------------------

    def init_state(self, model: nn.Module) -> ServerState:
        return {**super().init_state(model), "bank": {}}

    def payload(self, state: ServerState, round_: int) -> Tensors:
        weights = super().payload(state, round_)
        if clash := [k for k in weights if k.startswith(PREFIX)]:
            raise ValueError(f"pfl_resfim: model keys {clash[:3]} clash with the bank prefix {PREFIX!r}")
        return {**weights, **{PREFIX + cid: amp for cid, amp in sorted(state["bank"].items())}}

    def fold_start(self, round_: int, state: ServerState, statistics: dict[str, dict[str, Any]]) -> SharedMean:
        return SharedMean()

    def accumulate(self, fold: SharedMean, update: Update) -> None:
        fold.add(update)

    def finalize(self, round_: int, fold: SharedMean, state: ServerState) -> ServerState:
        return {**state, "weights": {**state["weights"], **fold.mean(state["weights"])}}

    # --- client side --------------------------------------------------------------------------

    def client_fit(self, client: Client, payload: Tensors, round_: int) -> Update:
        weights, bank = split_payload(payload)
        self.bank = {cid: amp.to(client.device) for cid, amp in bank.items() if len(amp)}
        update = super().client_fit(client, weights, round_)  # local training: FedAvg's, with `batch_transform`
        if self.params.rho == 0:
            return update
        residual = self.residual_fisher(client, client.model, [k for k in update.tensors], round_)
        masks = top_fraction(residual, self.params.rho) if residual else {}
        client.keep_elements({k: m.to(client.device) for k, m in masks.items()})
        for key, mask in masks.items():
            if mask.any():
                update.tensors[key] = update.tensors[key].masked_fill(mask, 0)  # the client's own values never travel
                update.tensors[MASK + key] = pack(mask)
        return update

    def others(self, client: Client) -> list[str]:
        return sorted(cid for cid in self.bank if cid != client.id)

    def restyle(self, client: Client, x: torch.Tensor, targets: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """Normalised images moved to the styles `targets` by λ: un-normalise, swap, clip to [0, 1], normalise."""
        with torch.no_grad():
            raw = swap_amplitude(x * client.std + client.mean, targets, lam.to(x.device), self.params.beta).clamp_(0.0, 1.0)
            return (raw - client.mean) / client.std

    def batch_transform(self, client: Client, round_: int) -> Callable[[Batch], Batch] | None:
        """With `style_prob` > 0: each image, with that probability, in the style of a bank entry of
        another client (client and entry uniform), λ ~ U(0, 1); drawn by (seed, round, client, step)."""
        others = self.others(client)
        if self.params.style_prob == 0 or not others:
            return None
        steps = count()

        def transfer(batch: Batch) -> Batch:
            gen = rng(self.cfg.seed, "pfl_resfim.style", round_, client.id, next(steps))
            chosen = np.flatnonzero(gen.random(len(batch.x)) < self.params.style_prob)
            if not len(chosen):
                return batch
            sources = [self.bank[others[j]] for j in gen.integers(len(others), size=len(chosen))]
            targets = torch.stack([amp[gen.integers(len(amp))] for amp in sources])
            lam = torch.from_numpy(gen.random(len(chosen)))
            index = torch.from_numpy(chosen).to(batch.x.device)
            x = batch.x.clone()
            x[index] = self.restyle(client, batch.x[index], targets, lam)
            return replace(batch, x=x)

        return transfer

    def residual_fisher(self, client: Client, model: nn.Module, keys: list[str], round_: int) -> dict[str, torch.Tensor]:
        """R = mean_j |F(D̃_j) − F(D)| of the trained parameters among `keys`; empty without another client's bank."""
        others = self.others(client)
        shard = client.shards["train"]
        n = len(shard.table)
        if not others or n == 0:
            return {}
        gen = rng(self.cfg.seed, "pfl_resfim.fisher", round_, client.id)
        batch = client.batch_of(shard, torch.from_numpy(np.sort(gen.choice(n, size=min(self.params.fisher_samples, n), replace=False))))
        if 0 < self.params.fisher_domains < len(others):
            others = sorted(gen.choice(others, size=self.params.fisher_domains, replace=False).tolist())
        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        names = [k for k in keys if k in trained]
        if not names:
            return {}
        own = diagonal_fisher(model, batch, names, self.loss)
        residual = {k: torch.zeros_like(v) for k, v in own.items()}
        for cid in others:
            entries = self.bank[cid]
            pick = torch.from_numpy(rng(self.cfg.seed, "pfl_resfim.fisher_style", round_, client.id, cid).integers(len(entries), size=len(batch.y)))
            styled = replace(batch, x=self.restyle(client, batch.x, entries[pick.to(entries.device)], torch.ones(len(batch.y))))
            for key, value in diagonal_fisher(model, styled, names, self.loss).items():
                residual[key].add_((value - own[key]).abs())
        return {k: v / len(others) for k, v in residual.items()}

    def eval_model(self, client: Client, payload: Tensors) -> nn.Module:
        return client.load(split_payload(payload)[0])  # with the client's own elements over the shared ones
