"""q-FFL / q-FedAvg (Li et al., "Fair Resource Allocation in Federated Learning", ICLR 2020)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from raysim.algorithms.aggregation import AggregationError
from raysim.algorithms.base import ServerState, register_algorithm
from raysim.algorithms.fedopt import ServerStep, apply_delta, update_sum
from raysim.client import EVAL_BATCH, Client
from raysim.training import forward
from raysim.types import Update

LOSS_KEY = "init_loss"  # Update.extra: F_k, the client's training loss at the received θ
_MIN_LOSS = 1e-10  # F_k floor (the reference code adds 1e-10): keeps F^q and F^(q-1) finite


@dataclass
class QFFLParams:
    """q = 1 as in the reference code's run script (litian96/fair_flearn); the paper sweeps q per data set."""

    q: float = 1.0  # fairness exponent q ≥ 0: 0 gives the (unweighted) mean, larger q favours high-loss clients

    def __post_init__(self) -> None:
        if not (isinstance(self.q, (int, float)) and self.q >= 0):
            raise ValueError(f"q must be a number >= 0, got {self.q!r}")


def qffl_step(
    weights: Mapping[str, torch.Tensor], tensors: Sequence[Mapping[str, torch.Tensor]], losses: Sequence[float], *, q: float, lipschitz: float, keys: Sequence[str]
) -> dict[str, torch.Tensor]:
    """θ ← θ − Σ_k Δ_k / Σ_k h_k over `keys`, with g_k = L(θ − θ̄_k), Δ_k = F_k^q g_k and
    h_k = q F_k^(q−1) ‖g_k‖² + L F_k^q (‖·‖ over all keys together), summed in the given order."""
    sq_norms = []
    for update in tensors:
        sq = sum(float(((update[k].to(torch.float64) - weights[k].to(torch.float64)) ** 2).sum()) for k in keys)
        sq_norms.append(lipschitz**2 * sq)
    fq = [max(f, _MIN_LOSS) ** q for f in losses]
    # q = 0: the ‖g‖² term is multiplied by 0, not evaluated as 0 · F^-1 (inf for F → 0).
    h = [(q * max(f, _MIN_LOSS) ** (q - 1) * n if q != 0 else 0.0) + lipschitz * fk for f, n, fk in zip(losses, sq_norms, fq)]
    total_h = sum(h)
    # −Σ Δ_k / Σ h = Σ_k (F_k^q L / Σh) (θ̄_k − θ)
    delta = update_sum(tensors, [fk * lipschitz / total_h for fk in fq], weights, keys)
    return apply_delta(weights, delta)


@torch.no_grad()
def loss_at(client: Client, model: nn.Module) -> float:
    """Mean cross-entropy of the received model on the client's whole train split (eval mode, no update)."""
    model.eval()
    total, count = 0.0, 0
    for batch in client.batches("train", batch_size=EVAL_BATCH):
        total += float(nn.functional.cross_entropy(forward(model, batch).float(), batch.y, reduction="sum"))
        count += len(batch.y)
    return total / max(count, 1)


@register_algorithm("qffl")
class QFFL(ServerStep):
    """Clients send F_k (loss at the received θ) in `Update.extra`; the server takes the q-FFL step with
    L = 1 / federation.lr on the trainable parameters. Buffers (BatchNorm statistics) get FedAvg."""

    Params = QFFLParams

    def before_training(self, client: Client, model: nn.Module) -> dict[str, object]:
        return {LOSS_KEY: loss_at(client, model)}  # F_k at the global θ

    def server_step(self, updates: list[Update], state: ServerState) -> tuple[dict[str, torch.Tensor], ServerState]:
        missing = [u.client_id for u in updates if LOSS_KEY not in u.extra]
        if missing:
            raise AggregationError(f"qffl needs each client's loss at the received model (extra[{LOSS_KEY!r}]); missing from {missing}")
        losses = [float(cast(float, u.extra[LOSS_KEY])) for u in updates]
        lipschitz = 1.0 / self.cfg.federation.lr
        return qffl_step(state["weights"], [u.tensors for u in updates], losses, q=self.params.q, lipschitz=lipschitz, keys=state["stepped"]), state
