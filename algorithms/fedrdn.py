"""FedRDN (Yan et al., MICCAI 2023): each client computes its training images' channel mean/std
once and shares them (the statistics, never the images) before round 1; the server sends every
client's statistics down with the weights; in training each *image* is normalised with the
statistics of a client drawn at random (per sample, as in the paper; seeded by seed, round,
client id and step), at test with the client's own. Aggregation is FedAvg."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from itertools import count
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from raysim.algorithms.base import Algorithm, ServerState, register_algorithm
from raysim.client.training import Batch, make_optimizer, train_epochs
from raysim.seeding import rng
from raysim.types import Tensors, Update

if TYPE_CHECKING:
    from raysim.client.client import Client

# Payload keys of the shared statistics: "fedrdn.stats/<client id>". A state-dict key is a
# dotted path of attribute names and never holds "/"; `payload` still checks for a clash.
PREFIX = "fedrdn.stats/"
MEMORY = "fedrdn_stats"  # client.memory: (mean, std) of the client's own train images
STD_FLOOR = 1e-3  # a constant channel must not divide by zero


def channel_stats(images: np.ndarray, chunk: int = 512) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of uint8 images (N, C, H, W) on the [0, 1] scale.

    Two float64 passes in chunks: exact like numpy, without a float copy of the whole shard.
    """
    if len(images) == 0:
        raise ValueError("fedrdn: a client without training images has no statistics")
    per_channel = images[0, 0].size * len(images)
    chunks = [slice(i, i + chunk) for i in range(0, len(images), chunk)]
    mean = sum(images[c].astype(np.float64).sum(axis=(0, 2, 3)) for c in chunks) / 255.0 / per_channel
    var = sum(np.square(images[c].astype(np.float64) / 255.0 - mean[:, None, None]).sum(axis=(0, 2, 3)) for c in chunks) / per_channel
    return mean.tolist(), np.sqrt(var).tolist()


def split_payload(payload: Tensors) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model tensors, client id -> (2, C) statistics) of a FedRDN payload."""
    weights = {k: v for k, v in payload.items() if not k.startswith(PREFIX)}
    return weights, {k[len(PREFIX) :]: v for k, v in payload.items() if k.startswith(PREFIX)}


@register_algorithm("fedrdn")
class FedRDN(Algorithm):
    """The server keeps every client's statistics and sends them all down with the weights."""
    down_only = PREFIX

    newcomer = "the global model, its inputs normalised by the site's own channel statistics (FedRDN's test-time rule); they join no client's training pool"

    # --- before round 1 -----------------------------------------------------------------------

    def client_setup(self, client: Client) -> dict[str, Any]:
        """In the client's actor: its channel statistics, C floats each (what the paper shares; no pixels)."""
        mean, std = self.own_stats(client)
        return {"mean": mean, "std": std}

    def setup_state(self, state: ServerState, shared: dict[str, dict[str, Any]]) -> ServerState:
        return {**state, "stats": {**state["stats"], **{cid: (s["mean"], s["std"]) for cid, s in shared.items()}}}

    # --- server side --------------------------------------------------------------------------

    def init_state(self, model: nn.Module) -> ServerState:
        return {**super().init_state(model), "stats": {}}

    def payload(self, state: ServerState, round_: int) -> Tensors:
        weights = super().payload(state, round_)
        if clash := [k for k in weights if k.startswith(PREFIX)]:
            raise ValueError(f"fedrdn: model keys {clash[:3]} clash with the statistics prefix {PREFIX!r}")
        return {**weights, **{PREFIX + cid: torch.tensor(ms, dtype=torch.float64) for cid, ms in sorted(state["stats"].items())}}

    # --- client side --------------------------------------------------------------------------

    def own_stats(self, client: Client) -> tuple[list[float], list[float]]:
        """Computed once per client, then kept (and checkpointed) in its memory."""
        if MEMORY not in client.memory:
            client.memory[MEMORY] = channel_stats(client.shards["train"].images)
        return client.memory[MEMORY]  # type: ignore[return-value]

    def use_own_stats(self, client: Client) -> None:
        """Make the client's batches (and so its evaluation) normalised by its own statistics."""
        client.mean, client.std = self._as_norm(client, torch.tensor(self.own_stats(client), dtype=torch.float64))

    def client_fit(self, client: Client, payload: Tensors, round_: int) -> Update:
        weights, shared = split_payload(payload)
        self.use_own_stats(client)
        # Every client's statistics arrive before round 1 (`setup_state`); the client's own are
        # in the pool even when a payload lacks them (the hook not run, e.g. outside the driver).
        pool = {**shared, client.id: torch.tensor(self.own_stats(client), dtype=torch.float64)}
        model = client.load(weights)
        fed = self.cfg.federation
        epochs = self.randomly_normalised(client, client.train_epochs(round_, fed.local_epochs, fed.batch_size, self.cfg.seed), [pool[c] for c in sorted(pool)], round_)
        stats = train_epochs(model, epochs, make_optimizer(model, fed), loss_fn=self.loss, after_step=self.after_step)
        state = model.state_dict()
        client.keep(set(state) - set(weights))
        tensors = {k: state[k].detach().cpu().clone() for k in weights}
        return Update(client.id, tensors, client.num_train, stats)

    def randomly_normalised(self, client: Client, epochs: Iterator[Iterator[Batch]], pool: list[torch.Tensor], round_: int) -> Iterator[Iterator[Batch]]:
        """The epochs' batches with each image re-normalised by the statistics of a client drawn for
        it, by (seed, round, client id, step) and its place in the batch: raw pixels x·std + mean,
        then (raw − mean_r) / std_r."""
        norms = [self._as_norm(client, ms) for ms in pool]
        means, stds = (torch.cat([n[i] for n in norms]) for i in (0, 1))  # (P, C, 1, 1)
        steps = count()

        def shift(batches: Iterator[Batch]) -> Iterator[Batch]:
            for batch in batches:
                drawn = rng(self.cfg.seed, "fedrdn", round_, client.id, next(steps)).integers(len(norms), size=len(batch.x))
                index = torch.from_numpy(drawn).to(means.device)
                yield replace(batch, x=(batch.x * client.std + client.mean - means[index]) / stds[index])

        return (shift(batches) for batches in epochs)

    def eval_model(self, client: Client, payload: Tensors) -> nn.Module:
        self.use_own_stats(client)
        return client.load(split_payload(payload)[0])

    @staticmethod
    def _as_norm(client: Client, mean_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(2, C) statistics as the (1, C, 1, 1) float32 mean and floored std the batches use."""
        mean, std = mean_std.to(client.device, torch.float32).view(2, 1, -1, 1, 1)
        return mean, std.clamp_min(STD_FLOOR)
