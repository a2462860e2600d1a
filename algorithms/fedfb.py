"""FedFB (Zeng, Chen and Lee, "Improving Fairness via Federated Learning", 2021): FairBatch's group
reweighting (Roh et al., ICLR 2021) with the weights λ kept and updated by the server.

λ is a distribution over the G groups of the target attribute (`data.attribute`), starting at the
federation's group shares p_g = n_g / n (FedFB's initial λ), which every client reports once
before round 1 (its training examples per group). Each round:

- **Down**: w_g = λ_g / p_g with θ (`round_values`). A client trains on the reweighted loss
  (1/B) Σ_i w_{g_i} ℓ_i, whose expectation over its batches is Σ_g λ_g L_g: FairBatch's batch
  composition λ, as loss weights. Samples of an unknown group (-1) keep weight 1. While λ = p
  every w_g is exactly 1.0 and the loss is plain cross-entropy, so α = 0 is FedAvg bit for bit.
- **Up**: besides θ_k (FedAvg's example-weighted mean), per group g the sum of cross-entropies of
  the received θ over the client's training examples of g and their count (`Update.extra`).
- **Server**: L_g = Σ_k sums_kg / Σ_k n_kg over the groups the cohort holds, μ_g = L_g − mean_g L
  (0 for groups the cohort lacks) and λ ← Π_Δ(λ + α μ / ‖μ‖₂): FedFB's normalised step (its
  update is ±α μ/‖μ‖₂), moving weight toward the groups with the higher loss; Π_Δ projects onto
  the simplex. The losses describe the round's received model, so the new λ reaches the clients
  one round after the model it measured (FedFB measures the just-aggregated model, which would
  need a second exchange per round).

raysim's variant equalises the group *losses* over any number of groups. The paper's λ lives on
(label, group) cells of a binary attribute with rules for demographic parity, equal opportunity
and equalized odds; those rules are not implemented. α is constant, 0.005 as in the spec and in
declearn's FedFB (Inria); the authors' code tunes α per data set and decays it with the round.
The group-loss pass costs each trained client one forward pass over its train split per round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from raysim.algorithms.afl import project_to_simplex
from raysim.algorithms.aggregation import AggregationError, WeightedSum
from raysim.algorithms.base import Algorithm, ServerState, register_algorithm
from raysim.algorithms.fairlora import num_groups
from raysim.client.client import EVAL_BATCH, Client
from raysim.client.training import Batch, cross_entropy, forward
from raysim.config import ConfigError
from raysim.datasets.base import DataSource
from raysim.types import Update

LAMBDA_KEY = "fedfb_lambda"  # server state: λ_g per group code
SHARES_KEY = "fedfb_shares"  # server state: p_g, the federation's share of training examples per group
WEIGHTS_KEY = "fedfb_weights"  # round_values: w_g = λ_g / p_g
COUNTS_KEY = "group_counts"  # client_setup and Update.extra: training examples per group code
LOSSES_KEY = "group_losses"  # Update.extra: per group code, Σ cross-entropy of the received θ


@dataclass
class FedFBParams:
    """α = 0.005 as in specs/methods.md and declearn's FedFB controller (Inria)."""

    alpha: float = 0.005  # step α ≥ 0 of λ per round (ℓ2 length before the projection); 0 keeps λ = p: FedAvg

    def __post_init__(self) -> None:
        value = self.alpha
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value) and value >= 0):
            raise ValueError(f"algorithm.alpha must be a finite number >= 0, got {value!r}")


def group_weights(lam: Sequence[float], shares: Sequence[float]) -> list[float]:
    """w_g = λ_g / p_g (1.0 for a group without examples): exactly 1.0 wherever λ_g == p_g."""
    return [float(x) / float(p) if p > 0 else 1.0 for x, p in zip(lam, shares)]


def lambda_step(lam: Sequence[float], losses: Sequence[float], counts: Sequence[float], alpha: float) -> list[float]:
    """λ ← Π_Δ(λ + α μ/‖μ‖₂), μ_g = L_g − mean L over the groups with examples (μ = 0 elsewhere).

    Nothing moves (λ is returned as it was, bit for bit) when α = 0 or every group's loss is equal."""
    sums, n = np.asarray(losses, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    held = n > 0
    mu = np.zeros_like(sums)
    if held.any():
        mean_loss = sums[held] / n[held]
        mu[held] = mean_loss - mean_loss.mean()
    norm = float(np.linalg.norm(mu))
    if alpha == 0 or norm == 0:
        return [float(x) for x in lam]
    return [float(x) for x in project_to_simplex(np.asarray(lam, dtype=np.float64) + alpha * mu / norm)]


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(1/B) Σ_i w_{g_i} ℓ_i; `weights` holds w_g per code g, samples of an unknown group (-1) weigh 1."""
    per_sample = nn.functional.cross_entropy(logits, labels, reduction="none")
    known = groups >= 0
    w = torch.ones_like(per_sample)
    w[known] = weights.to(per_sample.device, per_sample.dtype)[groups[known]]
    return (w * per_sample).mean()


@dataclass
class FedFBFold:
    mean: WeightedSum  # FedAvg: Σ n_k θ_k
    losses: np.ndarray  # Σ_k group loss sums
    counts: np.ndarray  # Σ_k group counts


@register_algorithm("fedfb")
class FedFB(Algorithm):
    """λ and p live in the server state as lists over the target attribute's group codes."""
    tasks = ("classification",)  # its group weights reweight per-sample classification losses

    Params = FedFBParams

    def __init__(self, params: Any, cfg: Any) -> None:
        super().__init__(params, cfg)
        self.groups = 0  # G, from the data source (`adapt`)
        self.loss_weights: torch.Tensor | None = None  # in a client actor: this round's w_g (None: all 1.0)

    def adapt(self, model: nn.Module, source: DataSource) -> nn.Module:
        """Runs in the driver and in every client actor before training: the attribute and its groups."""
        if source.attribute is None:
            raise ConfigError(f"algorithm fedfb needs a target sensitive attribute (data.attribute); data source {source.name} has none")
        self.groups = num_groups(source)
        return model

    # --- server side --------------------------------------------------------------------------

    def init_state(self, model: nn.Module) -> ServerState:
        return {**super().init_state(model), LAMBDA_KEY: [], SHARES_KEY: []}

    def setup_state(self, state: ServerState, shared: dict[str, dict[str, Any]]) -> ServerState:
        """p_g from every client's group counts; λ starts at p."""
        rows = [cast(Sequence[int], shared[cid].get(COUNTS_KEY)) for cid in sorted(shared)]
        if not rows or any(r is None for r in rows) or len({len(r) for r in rows}) != 1:
            raise AggregationError(f"fedfb needs every client's training examples per group (client_setup {COUNTS_KEY!r}), all of one length")
        totals = np.sum(np.asarray(rows, dtype=np.float64), axis=0)
        if totals.sum() <= 0:
            raise ConfigError("algorithm fedfb: no training example has a known group of the target attribute (data.attribute)")
        shares = [float(x) for x in totals / totals.sum()]
        return {**state, LAMBDA_KEY: list(shares), SHARES_KEY: shares}

    def _lambda(self, state: ServerState) -> tuple[list[float], list[float]]:
        lam, shares = state.get(LAMBDA_KEY) or [], state.get(SHARES_KEY) or []
        if not lam or len(lam) != len(shares):
            raise AggregationError("fedfb: the server state holds no group weights λ; setup_state sets them before round 1")
        return list(lam), list(shares)

    def round_values(self, state: ServerState, round_: int) -> dict[str, Any]:
        return {WEIGHTS_KEY: group_weights(*self._lambda(state))}

    def fold_start(self, round_: int, state: ServerState, statistics: dict[str, dict[str, Any]]) -> FedFBFold:
        groups = len(self._lambda(state)[0])
        return FedFBFold(WeightedSum(), np.zeros(groups), np.zeros(groups))

    def accumulate(self, fold: FedFBFold, update: Update) -> None:
        losses, counts = update.extra.get(LOSSES_KEY), update.extra.get(COUNTS_KEY)
        if losses is None or counts is None:
            raise AggregationError(f"fedfb needs each client's group losses and counts (extra[{LOSSES_KEY!r}], extra[{COUNTS_KEY!r}]); missing from {[update.client_id]}")
        losses_, counts_ = np.asarray(losses, dtype=np.float64), np.asarray(counts, dtype=np.float64)
        if losses_.shape != fold.losses.shape or counts_.shape != fold.counts.shape:
            raise AggregationError(f"client {update.client_id}: {len(losses_)} group losses and {len(counts_)} counts for {len(fold.losses)} groups")
        fold.mean.add(update.tensors, float(update.num_examples), update.client_id)
        fold.losses += losses_
        fold.counts += counts_

    def finalize(self, round_: int, fold: FedFBFold, state: ServerState) -> ServerState:
        lam, _ = self._lambda(state)
        stepped = lambda_step(lam, fold.losses.tolist(), fold.counts.tolist(), self.params.alpha)
        return {**state, "weights": {**state["weights"], **fold.mean.mean()}, LAMBDA_KEY: stepped}

    # --- client side --------------------------------------------------------------------------

    def client_setup(self, client: Client) -> dict[str, Any]:
        """Shared once before round 1: this client's training examples per group (raw labels never leave)."""
        codes = client.shards["train"].table.attributes[cast(str, client.attribute)]
        return {COUNTS_KEY: [int((codes == g).sum()) for g in range(self.groups)]}

    def before_training(self, client: Client, model: nn.Module) -> dict[str, object]:
        """This round's w_g, and the received θ's summed loss and example count per group (train split, eval mode)."""
        weights = self.received.get(WEIGHTS_KEY)
        if weights is None or len(weights) != self.groups:
            raise RuntimeError(f"fedfb: the round's {self.groups} group weights did not come with the payload (round_values {WEIGHTS_KEY!r})")
        self.loss_weights = None if all(w == 1.0 for w in weights) else torch.tensor(weights, dtype=torch.float32)
        return dict(zip((LOSSES_KEY, COUNTS_KEY), group_losses(client, model, self.groups)))

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        if self.loss_weights is None or batch.group is None:
            return cross_entropy(model, batch)
        return weighted_cross_entropy(forward(model, batch), batch.y, batch.group, self.loss_weights)


@torch.no_grad()
def group_losses(client: Client, model: nn.Module, groups: int) -> tuple[list[float], list[int]]:
    """Per group code: Σ cross-entropy of `model` over the client's training examples of it, and their count."""
    model.eval()
    sums, counts = [0.0] * groups, [0] * groups
    for batch in client.batches("train", batch_size=EVAL_BATCH):
        if batch.group is None:
            break
        per_sample = nn.functional.cross_entropy(forward(model, batch).float(), batch.y, reduction="none")
        for g in range(groups):
            chosen = batch.group == g
            sums[g] += float(per_sample[chosen].sum())
            counts[g] += int(chosen.sum())
    return sums, counts
