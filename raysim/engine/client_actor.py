"""The Ray actor that hosts one or more clients: loads their shards, trains, scores, checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from raysim import provenance, secrets
from raysim.algorithms import build as build_algorithm
from raysim.client import precision
from raysim.client.client import Client
from raysim.config import CPU_PRECISION, ConfigError, ExperimentConfig
from raysim.datasets import DATASETS, ClientSpec, DataError
from raysim.datasets.cache import load_shards
from raysim.determinism import deterministic_torch
from raysim.engine import checkpoints
from raysim.types import Predictions, Tensors, Update

CHUNK_BYTES = 16 << 20  # a checkpoint file crosses from an actor to the driver in pieces of this size
SAVE_CHUNKS_IN_FLIGHT = 4  # an actor runs ahead of the driver's writing by this many pieces at most
GPU_MEMORY_MARGIN = 0.05  # of the actor's share, left for its CUDA context and allocator slack
RESET_SEED = 0  # the global torch RNG of an actor between runs (runs seed their own; nothing may inherit a previous run's)
WITHHELD = "<a sample file: path withheld under eval.pseudonymize>"


def withhold_sample_paths(err: Exception, root: str | Path | None) -> Exception:
    """`err` again (same type, no chained cause) with every path under `root` (data.root) but
    its CSVs replaced by `root/WITHHELD`: sample paths embed patient and study numbers (CheXpert,
    MIMIC), and an actor's errors reach Ray's session logs, which other users of the machine
    may read. `python -m raysim.datasets.inspect` names the file on the user's own terminal."""
    if root is None:
        return err
    text = str(err)
    for base in dict.fromkeys((str(root).rstrip("/"), str(Path(root).expanduser().resolve()))):
        text = re.sub(re.escape(base) + r"/[^\s:'\",;()]+", lambda m, base=base: m.group(0) if m.group(0).endswith(".csv") else f"{base}/{WITHHELD}", text)
    return type(err)(text)


# Of a GPU actor's memory cap, what one client split's images may take on the device for a call
# (`Client.staged`); a larger split is staged in pinned host memory instead.
STAGE_SHARE = 0.25


def stage_budget(device: torch.device, cap: float | None) -> int:
    """Bytes of one split's images a client may stage on `device` for a call: 0 on the CPU."""
    if device.type != "cuda":
        return 0
    return int(STAGE_SHARE * (cap or 1.0) * torch.cuda.get_device_properties(device).total_memory)


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on a GPU (what cuDNN's convolutions are fastest in, with tensor cores); the
    CPU keeps torch's default layout, so CPU results stay bit-identical to earlier releases."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def cap_gpu_memory(num_gpus: float, device: torch.device) -> float | None:
    """Cap this process's CUDA allocator to its share of the GPU (`gpu_memory_fraction`): Ray's
    GPU fractions are logical, so without it one actor could take the memory of the others.
    Returns the fraction (None: no GPU, no cap). `python -m raysim.doctor` checks the effect."""
    cap = gpu_memory_fraction(num_gpus)
    if device.type == "cuda" and cap is not None:
        torch.cuda.set_per_process_memory_fraction(cap, device)
    return cap


def gpu_memory_fraction(num_gpus: float, margin: float = GPU_MEMORY_MARGIN) -> float | None:
    """The share of its GPU's memory one client actor's PyTorch allocator may use.

    `resources.num_gpus` below 1 (several actors on one GPU) gives that fraction less
    `margin` of it, because the CUDA context (a few hundred MB per process) lives outside
    the allocator's limit; a whole GPU gives 1.0; no GPU gives None (no cap). Every client
    an actor hosts (raysim.engine.placement's plan) shares the actor's process and so its cap.
    """
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    if num_gpus <= 0:
        return None
    if num_gpus >= 1:
        return 1.0
    return num_gpus * (1 - margin)


class ClientHost:
    """Plain-Python body of the actor (testable without Ray)."""

    def __init__(self, cfg: ExperimentConfig, specs: list[ClientSpec], context: dict[str, Any] | None = None) -> None:
        deterministic_torch(cfg.resources.threads_per_client)  # first: before CUDA starts

        self.cfg = cfg
        self.startup_error: Exception | None = None  # bad input the Ray actor (`ClientActor`) caught
        use_cuda = cfg.resources.num_gpus > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_cuda else "cpu")
        if cfg.federation.precision != "fp32" and not use_cuda:  # num_gpus > 0 (config.validate), yet no CUDA device here
            raise ConfigError(f"federation.precision={cfg.federation.precision}: this client actor sees no CUDA device (torch.cuda.is_available() is False); {CPU_PRECISION}")
        cap = cap_gpu_memory(cfg.resources.num_gpus, self.device)
        source = DATASETS.get(cfg.data.name)(cfg.data, img_size=cfg.model.img_size, seed=cfg.seed)
        self.algorithm = build_algorithm(cfg)
        # One model object per actor; each client swaps its own state in for its turn.
        model = self.algorithm.build_model(source).to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=memory_format(self.device))
        initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        task = self.algorithm.task  # segmentation: masks load here, beside the images, and never leave
        id_key = secrets.id_key(cfg.eval, None)  # eval.pseudonymize: read here, so raw ids never leave (a key file on a cluster)
        wanted = [(spec, split) for spec in specs for split in spec.splits]
        shards = iter(load_shards(source, wanted, masks=task.needs_masks))  # one look-up and at most one pack written for all
        self.clients = {
            spec.id: Client(
                spec,
                {split: next(shards) for split in spec.splits},
                model,
                initial_state=initial,
                channels=source.channels,
                device=self.device,
                attribute=source.attribute,
                task=task,
                keep_masks=cfg.eval.masks,
                classes=task.output_size(source),
                id_key=id_key,
                stage_bytes=stage_budget(self.device, cap),
            )
            for spec in specs
        }
        self.algorithm.attach(source, context or {})
        self.payload: Tensors | None = None
        self.changed: set[str] = set()  # clients whose state changed since the last save
        self.before: dict[str, dict[str, object]] = {}  # this round's fitted clients: their state before it

    def describe(self) -> dict[str, Any]:
        """Per client: samples per split after the drop rules, and what was dropped why; or, when
        the actor could not load its clients, `{"_error": the DataError / ConfigError}`."""
        if self.startup_error is not None:
            return {"_error": self.startup_error}
        return {
            cid: {split: {"n": len(shard.table), "dropped": dict(shard.dropped)} for split, shard in c.shards.items()}
            for cid, c in self.clients.items()
        } | {"_pid": os.getpid(), "_device": str(self.device), "_machine": provenance.machine(str(self.device))}

    def setup(self, client_id: str) -> dict[str, Any]:
        """Once per client before round 1: what it shares with the server (`Algorithm.client_setup`)."""
        client = self.clients[client_id]
        shared = self.algorithm.client_setup(client)
        if client.own_state or client.memory:  # e.g. FedRDN keeps its statistics: that is state to save
            self.changed.add(client_id)
        return shared

    def setup_clients(self, client_ids: list[str]) -> dict[str, dict[str, Any]]:
        """`setup` of each of `client_ids`, in that order, in one call (the driver's start-up)."""
        return {cid: self.setup(cid) for cid in client_ids}

    def set_payload(self, payload: Tensors, values: dict[str, Any] | None = None) -> None:
        """What the server sends this round (or for this evaluation): fetched once per actor, used
        by every later `fit` / `statistics` / `evaluate` call that passes no payload of its own;
        `values`, the method's non-tensor `round_values`, go to `Algorithm.receive`."""
        self.payload = payload
        self.algorithm.receive(dict(values or {}))
        self.before.clear()  # the driver has folded the previous round: nothing is rolled back now

    def fit(self, client_id: str, payload: Tensors | None = None, round_: int = 0) -> Update:
        client = self.clients[client_id]
        self.before[client_id] = client.snapshot()
        self.changed.add(client_id)
        with self._computing(client, ["train"]):
            return self.algorithm.client_fit(client, self._payload(payload), round_)

    def _computing(self, client: Client, splits: list[str]) -> contextlib.ExitStack:
        """One client call's compute context: `federation.precision` (autocast), and on a GPU the
        splits it reads staged there for the call (`Client.staged`)."""
        stack = contextlib.ExitStack()
        stack.enter_context(client.staged(splits))
        stack.enter_context(precision.autocast(self.device, self.cfg.federation.precision))
        return stack

    def rollback(self, client_id: str) -> None:
        """Back to the client's state before this round's `fit` (its update was rejected)."""
        if client_id in self.before:
            self.clients[client_id].set_state(self.before.pop(client_id))

    def statistics(self, client_id: str, payload: Tensors | None = None, round_: int = 0) -> dict[str, Any]:
        """`Algorithm.client_statistics` of one sampled client, before the round's fold starts."""
        client = self.clients[client_id]
        with self._computing(client, ["train"]):
            return self.algorithm.client_statistics(client, self._payload(payload), round_)

    def evaluate(self, client_id: str, payload: Tensors | None = None, splits: list[str] | None = None, record: bool = True) -> list[Predictions]:
        """The client's predictions on `splits` (val and test); `record`: the driver writes them
        to predictions.parquet (`eval.predictions`), so sample ids and opted-in masks go along."""
        client = self.clients[client_id]
        model = self.algorithm.scoring_model(client, self._payload(payload))  # the held-out site's: `newcomer_model`
        record = record and self.cfg.eval.predictions != "none"  # never written: never sent, whoever asks
        splits = list(splits or ["val", "test"])
        with self._computing(client, splits):
            return client.predict_splits(splits, model, record=record)

    def _payload(self, payload: Tensors | None) -> Tensors:
        if payload is not None:
            return payload
        if self.payload is None:
            raise RuntimeError("no payload: the driver calls set_payload before a round's calls")
        return self.payload

    def save_changed(self) -> Iterator[Any]:
        """The clients whose state changed since the last save, for the driver to persist (an
        actor never writes the run directory: it may be on another node, or the run directory
        a URI). Yields their ids first, then their states as one `torch.save` file in chunks of
        at most `CHUNK_BYTES` (a streamed generator under Ray: a full model per client never
        sits whole in the driver). Nothing changed: only []. They stay marked changed until
        the driver confirms with `saved`."""
        changed = sorted(self.changed)
        yield changed
        if changed:
            buffer = io.BytesIO()
            torch.save({cid: self.clients[cid].state() for cid in changed}, buffer)
            view = buffer.getbuffer()
            for start in range(0, len(view), CHUNK_BYTES):
                yield bytes(view[start : start + CHUNK_BYTES])

    def saved(self, client_ids: list[str]) -> None:
        """The driver wrote these clients' states durably: unmark them."""
        self.changed.difference_update(client_ids)

    def restore(self, files: list[tuple[str, list[str]]], *contents: bytes) -> None:
        """Every client back to a checkpoint: `files` names each checkpoint file this actor needs
        with the clients it holds for it, `contents` are those files' bytes (read by the driver);
        every other client goes back to the initial state."""
        for client in self.clients.values():
            client.set_state({"own_state": {}, "memory": {}})
        self.before.clear()
        for (name, client_ids), data in zip(files, contents, strict=True):
            saved = checkpoints.load(io.BytesIO(data), self.device, name=name)
            for cid in client_ids:
                self.clients[cid].set_state(saved[cid])
        self.changed.clear()


def to_wire(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Tensors as numpy views, for the trip through Ray's object store.

    Ray writes numpy buffers into its object store and maps them back out of band (pickle
    protocol 5, no copy), where a torch tensor is copied through pickle on both sides: for a
    resnet18 update (45 MB) about 50 ms each way against well under 1 ms. Tensors numpy cannot
    hold (bfloat16, CUDA) travel as they are.
    """
    return {k: v.contiguous().numpy() if isinstance(v, torch.Tensor) and v.device.type == "cpu" and v.dtype in _NUMPY_DTYPES else v for k, v in tensors.items()}


def from_wire(arrays: Mapping[str, Any], *, copy: bool) -> dict[str, Any]:
    """Back to tensors: views of the (read-only) object-store buffers, or private copies with `copy`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {k: (torch.from_numpy(v.copy() if copy else v) if isinstance(v, np.ndarray) else v) for k, v in arrays.items()}


_NUMPY_DTYPES = {torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool}


@ray.remote(max_restarts=0)
class ClientActor(ClientHost):
    """ClientHost as a Ray actor (one process; `num_cpus` / `num_gpus` set by the driver).

    It starts empty (the process imports torch and the method code while the driver prepares
    the run) and serves one run at a time: `load` builds the run's `ClientHost`, `reset` drops
    it, so a warm actor (`raysim.engine.warm`) serves the next run without a new process.

    Tensors cross the actor boundary as numpy arrays (`to_wire`): the payload comes in once per
    round and is copied (the method's client code may change what it gets), updates go out as
    views of their own tensors, written into the object store when the call returns.
    """

    def __init__(self) -> None:  # noqa: D107 - empty until `load`
        self.startup_error: Exception | None = None
        self.startup_failure: BaseException | None = None

    def load(self, cfg: ExperimentConfig, specs: list[ClientSpec], context: dict[str, Any] | None = None) -> None:
        """This actor's part of a run: its clients' shards, the method, the model (`ClientHost`).
        Whatever an earlier run left is dropped first."""
        self.reset()
        try:
            ClientHost.__init__(self, cfg, specs, context)
        except (DataError, ConfigError) as err:
            # Expected bad input (a corrupt file, a wrong shape) comes back as a value from
            # `describe`: raised there, Ray would print the actor's traceback and report a
            # failed call instead of the one line that names the file.
            self.startup_error = withhold_sample_paths(err, cfg.data.root) if cfg.eval.pseudonymize else err
        except Exception as err:  # noqa: BLE001 - a bug or a resource error: `describe` raises it with its traceback
            self.startup_failure = err

    def reset(self) -> None:
        """Back to an empty actor: the run's clients, shards, model, method and payload go; the
        global torch RNG is reseeded, so nothing random carries over (every run seeds its own)."""
        self.__dict__.clear()
        self.startup_error, self.startup_failure = None, None
        gc.collect()
        torch.manual_seed(RESET_SEED)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def describe(self) -> dict[str, Any]:
        if self.startup_failure is not None:
            raise self.startup_failure
        return super().describe()

    def set_payload(self, payload: Mapping[str, Any], values: dict[str, Any] | None = None) -> None:
        super().set_payload(from_wire(payload, copy=True), values)

    @ray.method(num_returns="streaming", _generator_backpressure_num_objects=SAVE_CHUNKS_IN_FLIGHT)
    def save_changed(self) -> Iterator[Any]:
        yield from super().save_changed()

    def node_id(self) -> str:
        """The Ray node this actor runs on (tests and tools that lose a node on purpose)."""
        return ray.get_runtime_context().get_node_id()

    def fit(self, client_id: str, payload: Tensors | None = None, round_: int = 0) -> Update:
        update = super().fit(client_id, payload, round_)
        return dataclasses.replace(update, tensors=to_wire(update.tensors))
