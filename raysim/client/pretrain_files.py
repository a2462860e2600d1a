"""What both pretrainers share (`raysim.client.pretraining`, the timm backbone;
`raysim.client.clip_pretraining`, the small CLIP): the public pool's generator arguments, fixed
torch threads, the checkpoint and its JSON sidecar written atomically, and a cache entry built
once per machine."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

OCT_SHAPE = (4, 4, 4)  # the pool's OCT volumes are unused: the smallest the generator allows


def public_pool_kwargs(*, img_size: int, patients: int, seed: int) -> dict[str, Any]:
    """The synthetic generator's arguments for the public pool, rendered at the training size."""
    return {"population": "public", "patients": patients, "seed": seed, "fundus_size": max(16, img_size), "oct_shape": OCT_SHAPE, "empty_fraction": 0.0}


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Torch's intra-op threads fixed to `n` (a deterministic result whatever the machine), then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_checkpoint(out: Path, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    """`out.json` (the sidecar) then `out` (the state dict), each written beside its target and
    renamed, so a reader never sees half a file and a checkpoint never lacks its sidecar."""
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    _atomic_write(out.with_suffix(out.suffix + ".json"), lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    _atomic_write(out, lambda p: torch.save(state, p))


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def ensure_built(path: Path, build: Callable[[], Any]) -> Path:
    """`path`, calling `build()` (which writes it) once if it is missing: one builder per file on
    this machine (a lock file beside it); the atomic rename alone keeps other machines safe."""
    if path.is_file():
        return path
    with _build_lock(path):
        if not path.is_file():  # another process may have built it while we waited
            build()
    return path


@contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent builders just both write the same file
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
