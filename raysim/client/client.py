"""A client (hospital) in plain Python: its shards, its own state, batches and predictions.

Several clients may share one model object inside an actor (the scale mode); each client's
turn starts by loading the global payload plus the client's own saved tensors, so nothing a
client changes ever reaches another one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import nn

import raysim.client.precision as precision
from raysim.client.tasks import TASKS, Task
from raysim.client.training import Batch, forward
from raysim.datasets.base import ClientSpec, Shard
from raysim.metrics import segmentation as segmetrics
from raysim.models.backbones import normalization
from raysim.secrets import pseudonym
from raysim.seeding import derive_seed
from raysim.types import Predictions

EVAL_BATCH = 256


def load_in_place(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """`model.load_state_dict(state, strict=True)`, passing only the tensors that may differ.

    The clients of an actor share one model. A model tensor is skipped when it was last loaded
    from this very source tensor and neither has changed since: in-place changes bump torch's
    version counters (optimizer steps, `load_state_dict` anywhere), and a training-mode forward
    of a module with buffers (BatchNorm updates its running statistics inside the kernel,
    without a version bump) forgets everything loaded. Evaluating many clients with one global
    model then loads each client's own tensors only, not the whole model per client (8 ms for
    resnet18). The rest is `load_state_dict` itself (its checks and the modules' load hooks).
    """
    targets = model.state_dict(keep_vars=True)
    loaded = _load_record(model)
    if targets.keys() != state.keys():
        loaded.clear()
        model.load_state_dict(state, strict=True)  # raises, naming the keys
        return
    stale = {}
    for key, source in state.items():
        seen = loaded.get(key)
        if seen is None or seen[0] is not source or seen[1] != source._version or seen[2] != targets[key]._version:
            stale[key] = source
    if stale:
        model.load_state_dict(stale, strict=False)
    for key in stale:  # what each model tensor now holds; the source is kept, so its id is never reused
        loaded[key] = (stale[key], stale[key]._version, targets[key]._version)


def _load_record(model: nn.Module) -> dict[str, tuple[torch.Tensor, int, int]]:
    """What `load_in_place` last put into each of `model`'s tensors; set up once per model."""
    record = model.__dict__.get("_raysim_loaded")
    if record is None:
        record = model.__dict__["_raysim_loaded"] = {}

        def forget_if_training(module: nn.Module, _args: object) -> None:
            if module.training:
                record.clear()

        for module in model.modules():
            if any(True for _ in module.buffers(recurse=False)):
                module.register_forward_pre_hook(forget_if_training)
    return record


def _chunks(pieces: list[tuple[str, torch.Tensor]], size: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive pieces grouped into chunks of at most `size` rows (a piece is split when it straddles)."""
    chunk: list[tuple[str, torch.Tensor]] = []
    room = size
    for split, index in pieces:
        while len(index):
            take, index = index[:room], index[room:]
            chunk.append((split, take))
            room -= len(take)
            if room == 0:
                yield chunk
                chunk, room = [], size
    if chunk:
        yield chunk


def _split_rows(kept: torch.Tensor | tuple[torch.Tensor, ...], sizes: list[int]) -> list:
    """A forward pass's kept values split into consecutive pieces of `sizes` rows; a joint task
    keeps a tuple (masks, probabilities), split member by member into tuples."""
    if isinstance(kept, tuple):
        return list(zip(*(member.split(sizes) for member in kept)))
    return list(kept.split(sizes))


def _concat(batches: list[Batch]) -> Batch:
    if len(batches) == 1:
        return batches[0]
    first = batches[0]
    group = torch.cat([b.group for b in batches]) if first.group is not None else None  # type: ignore[misc]
    mask = torch.cat([b.mask for b in batches]) if first.mask is not None else None  # type: ignore[misc]
    return Batch(
        torch.cat([b.x for b in batches]),
        torch.cat([b.y for b in batches]),
        {a: torch.cat([b.groups[a] for b in batches]) for a in first.groups},
        torch.cat([b.index for b in batches]),
        group,
        mask,
    )


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
        task: Task = TASKS["classification"],
        keep_masks: bool = False,
        classes: int = 2,
        id_key: bytes | None = None,
        stage_bytes: int = 0,
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
        # Element-wise local values of communicated tensors (pFL-ResFIM's top-ρ parameters):
        # key -> (bool mask, values); `load` puts them over what the server sends.
        self.local_elements: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.attribute = attribute  # the target attribute: FairLoRA's group
        self.task = task  # what the model predicts (raysim.client.tasks); segmentation shards carry masks
        # What an evaluation sends beyond what the metrics need (only when its predictions are written):
        self.keep_masks = keep_masks  # the predicted masks (eval.masks)
        self.id_key = id_key  # sample ids pseudonymised here, before they leave (eval.pseudonymize)
        self.classes = classes  # the width of a score: an empty split's scores get it too
        # A GPU actor's budget for one split's images on the device (`staged`); 0: never staged.
        self.stage_bytes = stage_bytes
        self._staged: dict[int, torch.Tensor] = {}  # id(shard.images) -> its rows as one tensor, during one call

    @property
    def num_train(self) -> int:
        return len(self.shards["train"].table)

    def load(self, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
        """Put this client's state, overlaid with `tensors` from the server, into the model."""
        state = {**self.initial_state, **self.own_state, **tensors}
        for key, (mask, values) in self.local_elements.items():
            state[key] = torch.where(mask, values, state[key].to(values.device))  # the payload arrives on the CPU
        load_in_place(self.model, state)
        return self.model

    def keep_elements(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Keep the model's current values where `masks` (key -> bool tensor of the key's shape)
        is True as this client's own: every later `load` overlays them on the server's values.
        Replaces what was kept before; an empty mapping keeps nothing element-wise."""
        current = self.model.state_dict()
        kept = {}
        for key, mask in masks.items():
            if mask.shape != current[key].shape or mask.dtype != torch.bool:
                raise ValueError(f"mask of {key}: expected a bool tensor of shape {tuple(current[key].shape)}, got {mask.dtype} {tuple(mask.shape)}")
            if mask.any():
                kept[key] = (mask.detach().clone(), torch.where(mask, current[key], torch.zeros_like(current[key])).detach().clone())
        self.local_elements = kept

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

    def predict(self, split: str, model: nn.Module | None = None) -> Predictions:
        """Scores of `model` (default: the client's model as loaded) on one of its splits."""
        return self.predict_splits([split], model)[0]

    @torch.no_grad()
    def predict_splits(self, splits: list[str], model: nn.Module | None = None, *, record: bool = True) -> list[Predictions]:
        """Scores on several splits, their samples forwarded together in batches of EVAL_BATCH
        (what the task keeps of each forward pass: probabilities, or argmax masks). `record`:
        the predictions go to predictions.parquet, so sample ids (and masks, `keep_masks`) leave
        too; else only what the metrics need.

        A forward pass costs far more than its images at small batch sizes (resnet18 at 28 px:
        6.5 ms for 1 image, 16 ms for 8), so a cross-device client's few val and test images go
        through one pass, not one per split. The batches depend only on the client's data.
        """
        model = model if model is not None else self.model
        model.eval()
        pieces = [(split, torch.arange(len(self.shards[split].table))) for split in splits]
        scores: dict[str, list[torch.Tensor]] = {split: [] for split in splits}
        for chunk in _chunks(pieces, EVAL_BATCH):
            batches = [self.batch_of(self.shards[split], index) for split, index in chunk]
            kept = self.task.score(precision.as_float(forward(model, _concat(batches))))
            for (split, _), part in zip(chunk, _split_rows(kept, [len(i) for _, i in chunk])):
                scores[split].append(part)
        return [self._predictions(split, scores[split], record) for split in splits]

    def _predictions(self, split: str, parts: list[torch.Tensor], record: bool) -> Predictions:
        shard = self.shards[split]
        preds = self.task.predictions(self.id, split, shard.table, parts, shard.masks, self.spec.role, classes=self.classes)
        if not record:  # nothing of it is written: no ids, no masks, no per-sample extras (true areas, CDR)
            values = None if preds.values is None else {c: preds.values[c] for c in segmetrics.SAMPLE_COLUMNS}
            return dataclasses.replace(preds, sample_ids=None, values=values)
        if self.id_key is not None:
            preds = dataclasses.replace(preds, sample_ids=pseudonym(preds.sample_ids, self.id_key))
        if self.keep_masks:  # the predicted masks leave too (never the true ones)
            preds = dataclasses.replace(preds, masks=self.task.predicted_masks(parts))
        return preds

    @contextlib.contextmanager
    def staged(self, splits: list[str]) -> Iterator[None]:
        """The images of `splits` staged for one client call (a GPU actor's): copied once onto the
        device when a split fits `stage_bytes`, else once into pinned host memory on a GPU, and
        batches gathered from there instead of read from the shard cache's memory map and copied
        to the device batch by batch. Only this client's splits, only for the call: an actor
        hosting thousands of clients holds one client's images at a time, never a memory-mapped
        cache wholesale. The pixels are the same uint8 values either way, so the batches are too.
        `stage_bytes` 0 (every CPU actor): nothing changes."""
        if self.stage_bytes <= 0:
            yield
            return
        for split in splits:
            images = self.shards[split].images if split in self.shards else None
            if images is None or len(images) == 0:
                continue
            with warnings.catch_warnings():  # a read-only memory map: only ever copied from
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                rows = torch.from_numpy(np.ascontiguousarray(images))  # the one read of this split's pages for the call
            if images.nbytes <= self.stage_bytes:
                self._staged[id(images)] = rows.to(self.device)
            elif self.device.type == "cuda":
                self._staged[id(images)] = rows.pin_memory()
        try:
            yield
        finally:
            self._staged.clear()

    def batch_of(self, shard: Shard, index: torch.Tensor) -> Batch:
        """The rows `index` of a shard as a normalised batch on this client's device."""
        idx = index.numpy()
        staged = self._staged.get(id(shard.images))
        if staged is None:
            x = torch.from_numpy(shard.images[idx]).to(self.device, torch.float32).div_(255.0)
        else:
            x = staged.index_select(0, index.to(staged.device)).to(self.device, torch.float32).div_(255.0)
        x = (x - self.mean) / self.std
        if self.device.type == "cuda" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)  # the model's layout on a GPU (client_actor.memory_format)
        y = torch.from_numpy(shard.table.labels[idx]).to(self.device)
        groups = {a: torch.from_numpy(codes[idx]).to(self.device) for a, codes in shard.table.attributes.items()}
        mask = torch.from_numpy(shard.masks[idx].astype(np.int64)).to(self.device) if shard.masks is not None else None
        return Batch(x, y, groups, index, groups.get(self.attribute) if self.attribute else None, mask)

    def state(self) -> dict[str, object]:
        """Everything this client keeps between rounds (what its checkpoint holds)."""
        return {"own_state": self.own_state, "memory": self.memory, "local_elements": self.local_elements}

    def snapshot(self) -> dict[str, object]:
        """`state()` as it is now, cheaply: the dicts are copied, their values shared. Methods
        replace a client's values (`keep` stores fresh tensors), never change them in place, so
        the snapshot stays what it was."""
        return {"own_state": dict(self.own_state), "memory": dict(self.memory), "local_elements": dict(self.local_elements)}

    def set_state(self, saved: Mapping[str, object]) -> None:
        self.own_state = dict(saved["own_state"])  # type: ignore[arg-type]
        self.memory = dict(saved["memory"])  # type: ignore[arg-type]
        self.local_elements = dict(saved.get("local_elements", {}))  # type: ignore[call-overload]  # absent in 0.2 checkpoints
