"""PFA, Progressive Fourier Aggregation (Chen et al., "Personalized Retrogress-Resilient Framework
for Real-World Medical Federated Learning", MICCAI 2021, PRR-FL; official code
CityU-AIM-Group/PRR-FL, `server.py`).

Every client keeps its whole model; only the low-frequency amplitude of its weights is shared.
Per conv / linear weight W (the paper's 2D view: a linear weight as it is, a conv weight
(C_out, C_in, k_h, k_w) as the (C_in·k_h) × (k_w·C_out) matrix of `as_matrix`):

1. The client trains locally, then sends A = |fftshift(FFT2(W))| inside the round's central box
   (`box`: |f| <= b = floor(L_t·n/2) frequencies in each dimension of size n, nothing when
   b = 0), with L_t = box_start + ((t − 1)/T)(box_end − box_start) after round t of T
   (0.7 → 0.95: the official code's a_iter/iters with a_iter = t − 1).
2. The server folds the plain mean Ā of the boxes (weight 1/K per client, as the official code).
3. Each client replaces the box of its own amplitude with Ā, keeps its phase and every frequency
   outside the box, and inverts the FFT: W ← W + Re(IFFT2(M ⊙ (Ā − A) e^{iφ})), which is the
   paper's IFFT2((M ⊙ Ā + (1 − M) ⊙ A) e^{iφ}) computed as a change, so a zero change is exact.

The box is symmetric around frequency 0: the official slice [c − b, c + b) of the shifted
spectrum misses the mirror +b of its edge −b, and taking the real part then applies half the
change there; with the symmetric box the client's box amplitude becomes Ā exactly (its change is
Hermitian, its inverse FFT real). A dimension with b = 0 (n·L < 2, e.g. the 2 rows of a binary
head) shares nothing, as in the official code. Normalisation layers (BatchNorm; every norm layer,
as raysim's FedBN) are never sent. Other communicated tensors (biases, embeddings) take the plain
mean, as the official code does for "not bn, conv, fc" parameters. A client is trained and scored
with its own model after the latest mean was applied; nothing per client is sent down (the payload
is the mean boxes, the same for everyone), so the server holds one accumulator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from raysim.algorithms.base import Algorithm, ServerState, register_algorithm
from raysim.algorithms.fedbn import norm_keys
from raysim.client.training import make_optimizer, train_epochs
from raysim.types import Tensors, Update, nbytes

if TYPE_CHECKING:
    from raysim.client.client import Client

PREFIX = "pfa.amplitude/"  # payload / update key of a weight's amplitude box: PREFIX + state-dict key ("/" never occurs in one)
SPECTRAL = (nn.Linear, nn.modules.conv._ConvNd)  # modules whose weight is aggregated in the Fourier domain


def check_fraction(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"algorithm.{name} must be a number in [0, 1], got {value!r}")


@dataclass
class PFAParams:
    box_start: float = 0.7  # L_t after round 1: the box's fraction of each dimension (paper and official l_rate: 0.7)
    box_end: float = 0.95  # the fraction L_t grows towards, reached at t = T + 1 (paper: 0.95); box_start = box_end = 0 shares nothing

    def __post_init__(self) -> None:
        check_fraction("box_start", self.box_start)
        check_fraction("box_end", self.box_end)


# --- the Fourier-domain operations (pure) --------------------------------------------------------


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The 2D view of a weight: 2D as it is; (C_out, C_in, *k) as (C_in·k_1···k_{d−1}) × (k_d·C_out)."""
    if weight.dim() == 2:
        return weight
    if weight.dim() < 2:
        raise ValueError(f"pfa: a weight needs at least 2 dimensions, got shape {tuple(weight.shape)}")
    shape = weight.shape
    return weight.permute(*range(1, weight.dim()), 0).reshape(math.prod(shape[1:-1]), shape[-1] * shape[0])


def from_matrix(matrix: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of `as_matrix` for a weight of `shape`."""
    if len(shape) == 2:
        return matrix
    return matrix.reshape(*shape[1:], shape[0]).permute(len(shape) - 1, *range(len(shape) - 1))


def box(n: int, fraction: float) -> slice:
    """Rows of the shifted spectrum (frequency f at n // 2 + f) inside the box along a dimension of
    size n: |f| <= floor(fraction·n/2), the whole dimension at most; empty when that floor is 0."""
    half = math.floor(n * min(max(fraction, 0.0), 1.0) / 2)
    size = min(2 * half + 1, n) if half else 0
    start = n // 2 - size // 2
    return slice(start, start + size)


def _length(rows: slice) -> int:
    return rows.stop - rows.start


def centred(n: int, size: int) -> slice:
    """Rows of a box of `size` frequencies (as `box` makes them) along a dimension of size n."""
    if size > n or (size % 2 == 0 and size not in (0, n)):
        raise ValueError(f"pfa: a box of {size} frequencies does not fit a dimension of {n}")
    start = n // 2 - size // 2
    return slice(start, start + size)


def shifted_spectrum(weight: torch.Tensor) -> torch.Tensor:
    """fftshift(FFT2(W)) of the weight's 2D view, in complex128."""
    return torch.fft.fftshift(torch.fft.fft2(as_matrix(weight.detach()).double()))


def amplitude_box(weight: torch.Tensor, fraction: float) -> torch.Tensor:
    """What a client sends for one weight: its shifted amplitude inside the box, in the weight's dtype."""
    amplitude = shifted_spectrum(weight).abs()
    rows, cols = box(amplitude.shape[0], fraction), box(amplitude.shape[1], fraction)
    return amplitude[rows, cols].to(weight.dtype).contiguous()


def with_amplitude(weight: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The weight with its central amplitude box replaced by `mean` (phase and other frequencies kept).

    The change is taken against the client's own box as it would send it (rounded to the weight's
    dtype), so a mean equal to what the client sent changes nothing, bit for bit."""
    spectrum = shifted_spectrum(weight)
    rows, cols = centred(spectrum.shape[0], mean.shape[0]), centred(spectrum.shape[1], mean.shape[1])
    inside = spectrum[rows, cols]
    own = inside.abs().to(weight.dtype).double()
    delta = torch.zeros_like(spectrum)
    delta[rows, cols] = (mean.to(spectrum.device, torch.float64) - own) * torch.exp(1j * inside.angle())
    change = torch.fft.ifft2(torch.fft.ifftshift(delta)).real
    return from_matrix(as_matrix(weight.detach()).double() + change, weight.shape).to(weight.dtype)


def spectral_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the conv and linear weights."""
    return {f"{prefix}.weight" if prefix else "weight" for prefix, m in model.named_modules() if isinstance(m, SPECTRAL) and isinstance(m.weight, torch.Tensor)}


# --- the method ----------------------------------------------------------------------------------


@register_algorithm("pfa")
class PFA(Algorithm):
    """Clients keep their whole model (`client.keep`); the payload and updates hold the amplitude
    boxes (PREFIX + key) and the plainly averaged other tensors (their own keys)."""

    Params = PFAParams
    params: PFAParams
    newcomer = None  # no global model: a site that never trained would be its initial weights with shared amplitudes (DET inherits the refusal)

    def communicated(self, model: nn.Module) -> list[str]:
        """Everything that trains except the normalisation layers: conv / linear weights as amplitude boxes, the rest as values."""
        local = norm_keys(model)
        return [k for k in super().communicated(model) if k not in local]

    def split(self, model: nn.Module) -> tuple[list[str], list[str]]:
        """(keys aggregated in the Fourier domain, keys averaged as they are)."""
        spectral = spectral_keys(model)
        keys = self.communicated(model)
        return [k for k in keys if k in spectral], [k for k in keys if k not in spectral]

    def box_fraction(self, round_: int) -> float:
        """L_t of the aggregation after round `round_` (1-based) of federation.rounds."""
        p = self.params
        return min(max(p.box_start + (round_ - 1) / self.cfg.federation.rounds * (p.box_end - p.box_start), 0.0), 1.0)

    # --- server side --------------------------------------------------------------------------

    def init_state(self, model: nn.Module) -> ServerState:
        """Round 1 sends empty boxes (every client starts from the same model) and the other tensors' initial values."""
        state = model.state_dict()
        # Each boxed weight's 2D shape and element size: the payload holds only last round's boxes,
        # and update_bytes must size this round's (the driver builds the state before any round).
        self.boxed = {k: (as_matrix(state[k]).shape, state[k].element_size()) for k in self.split(model)[0]}
        return {"weights": self.shared(model, 0.0)}

    def update_bytes(self, payload: Tensors, round_: int) -> int:
        """The round's amplitude boxes (their size grows with L_t) and the averaged tensors."""
        fraction = self.box_fraction(round_)
        boxes = sum(_length(box(rows, fraction)) * _length(box(cols, fraction)) * size for (rows, cols), size in self.boxed.values())
        return boxes + nbytes({k: v for k, v in payload.items() if not k.startswith(PREFIX)})

    def accumulate(self, fold: Any, update: Update) -> None:
        fold.add(update.tensors, 1.0, update.client_id)  # the plain mean (official: client weights 1/K)

    # --- client side --------------------------------------------------------------------------

    def shared(self, model: nn.Module, fraction: float) -> dict[str, torch.Tensor]:
        """What a client with `model` sends after a round whose box fraction is `fraction`."""
        spectral, averaged = self.split(model)
        state = model.state_dict()
        out = {PREFIX + k: amplitude_box(state[k], fraction).cpu() for k in spectral}
        out.update({k: state[k].detach().cpu().clone() for k in averaged})
        return out

    def received_model(self, client: Client, payload: Tensors) -> nn.Module:
        """The client's own model with the received means applied: averaged tensors set, amplitude boxes replaced."""
        model = client.load({k: v for k, v in payload.items() if not k.startswith(PREFIX)})
        live = model.state_dict()
        with torch.no_grad():
            for name, mean in payload.items():
                if name.startswith(PREFIX) and mean.numel():
                    key = name[len(PREFIX) :]
                    if key not in live:
                        raise ValueError(f"pfa: the payload's amplitude {name!r} names no weight of the client's model")
                    live[key].copy_(with_amplitude(live[key], mean))
        return model

    def client_fit(self, client: Client, payload: Tensors, round_: int) -> Update:
        model = self.received_model(client, payload)
        fed = self.cfg.federation
        epochs = client.train_epochs(round_, fed.local_epochs, fed.batch_size, self.cfg.seed)
        transform = self.batch_transform(client, round_)
        if transform is not None:
            epochs = (map(transform, batches) for batches in epochs)
        stats = train_epochs(model, epochs, make_optimizer(model, fed), loss_fn=self.loss, after_step=self.after_step)
        client.keep()  # the whole model is the client's own
        return Update(client.id, self.shared(model, self.box_fraction(round_)), client.num_train, stats)

    def eval_model(self, client: Client, payload: Tensors) -> nn.Module:
        return self.received_model(client, payload)
