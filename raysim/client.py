"""A client (hospital) in plain Python: its shards, its own state, batches and predictions.

Several clients may share one model object inside an actor (the scale mode); each client's
turn starts by loading the global payload plus the client's own saved tensors, so nothing a
client changes ever reaches another one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import nn

from raysim.datasets.base import ClientSpec, Shard
from raysim.models import normalization
from raysim.seeding import derive_seed
from raysim.training import Batch, forward
from raysim.types import Predictions

EVAL_BATCH = 256


class Client:
    def __init__(
        self,
        spec: ClientSpec,
        shards: Mapping[str, Shard],
        model: nn.Module,
        *,
        initial_state: Mapping[str, torch.Tensor],
        channels: int,
        device: torch.device,
        attribute: str | None = None,
    ) -> None:
        self.spec = spec
        self.id = spec.id
        self.shards = dict(shards)
        self.model = model
        self.device = device
        self.mean, self.std = (t.to(device) for t in normalization(model, channels))
        # The model's initial values (shared, read-only) overlaid with what this client keeps
        # between rounds: whatever its method does not communicate.
        self.initial_state = initial_state
        self.own_state: dict[str, torch.Tensor] = {}
        # Whatever else a method keeps for this client (Ditto's personal model, FedRDN's
        # statistics, ...): checkpointed with it, never sent anywhere.
        self.memory: dict[str, object] = {}
        self.attribute = attribute  # the target attribute: FairLoRA's group

    @property
    def num_train(self) -> int:
        return len(self.shards["train"].table)

    def load(self, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
        """Put this client's state, overlaid with `tensors` from the server, into the model."""
        state = {**self.initial_state, **self.own_state, **tensors}
        self.model.load_state_dict(state, strict=True)
        return self.model

    def keep(self, keys: set[str] | None = None) -> None:
        """Save the model's current values of `keys` (default: all) as this client's own state.

        Only values that differ from the shared initial state are stored: `load` overlays
        them on it anyway, and a frozen backbone (an adapter method's) would otherwise be
        copied once per client. A value back at its initial one is dropped.
        """
        current = self.model.state_dict()
        for key in keys if keys is not None else current:
            value = current[key]
            initial = self.initial_state.get(key)
            if initial is not None and torch.equal(value, initial):
                self.own_state.pop(key, None)
            else:
                self.own_state[key] = value.detach().clone()

    def batches(self, split: str, *, batch_size: int, seed: int | None = None) -> Iterator[Batch]:
        """Batches of a split; shuffled by `seed` (training) or in order (evaluation)."""
        shard = self.shards[split]
        n = len(shard.table)
        order = torch.arange(n) if seed is None else torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            if seed is not None and len(index) == 1 and n > 1:
                continue  # a single-sample batch breaks BatchNorm in training mode
            yield self.batch_of(shard, index)

    def train_epochs(self, round_: int, epochs: int, batch_size: int, base_seed: int) -> Iterator[Iterator[Batch]]:
        for epoch in range(epochs):
            yield self.batches("train", batch_size=batch_size, seed=derive_seed(base_seed, "order", round_, self.id, epoch))

    @torch.no_grad()
    def predict(self, split: str, model: nn.Module | None = None) -> Predictions:
        """Scores of `model` (default: the client's model as loaded) on one of its splits."""
        model = model if model is not None else self.model
        model.eval()
        shard = self.shards[split]
        probs = [torch.softmax(forward(model, b).float(), dim=1).cpu() for b in self.batches(split, batch_size=EVAL_BATCH)]
        scores = torch.cat(probs).numpy().astype(np.float64)
        if scores.shape[1] == 2:
            scores = scores[:, 1]
        table = shard.table
        return Predictions(self.id, split, table.sample_ids, table.labels, scores, dict(table.attributes), self.spec.role)

    def batch_of(self, shard: Shard, index: torch.Tensor) -> Batch:
        """The rows `index` of a shard as a normalised batch on this client's device."""
        idx = index.numpy()
        x = torch.from_numpy(shard.images[idx]).to(self.device, torch.float32).div_(255.0)
        x = (x - self.mean) / self.std
        y = torch.from_numpy(shard.table.labels[idx]).to(self.device)
        groups = {a: torch.from_numpy(codes[idx]).to(self.device) for a, codes in shard.table.attributes.items()}
        return Batch(x, y, groups, index, groups.get(self.attribute) if self.attribute else None)

    def state(self) -> dict[str, object]:
        """Everything this client keeps between rounds (what its checkpoint holds)."""
        return {"own_state": self.own_state, "memory": self.memory}

    def snapshot(self) -> dict[str, object]:
        """`state()` as it is now, cheaply: the dicts are copied, their values shared. Methods
        replace a client's values (`keep` stores fresh tensors), never change them in place, so
        the snapshot stays what it was."""
        return {"own_state": dict(self.own_state), "memory": dict(self.memory)}

    def set_state(self, saved: Mapping[str, object]) -> None:
        self.own_state = dict(saved["own_state"])  # type: ignore[arg-type]
        self.memory = dict(saved["memory"])  # type: ignore[arg-type]
