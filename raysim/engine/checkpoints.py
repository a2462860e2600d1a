"""Checkpoint layout: the server state, one file per actor with the clients that changed, a manifest.

    checkpoints/round_0004/server.pt        the server state after round 4
    checkpoints/round_0004/actor_001.pt     actor 1's clients whose state changed since the
                                            previous checkpoint (absent when none did)
    checkpoints/round_0004/manifest.json    client id -> the file holding its latest state
                                            (this round's or an earlier one's); clients that
                                            are out of the run and why
    checkpoints/round_0004/COMPLETE         written last: the checkpoint is usable

A client that never changed (e.g. never sampled in a cross-device run) is in no file: it
resumes from the initial state, which is what it holds. Older folders are pruned down to
the files the newest manifest still names.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
MANIFEST = "manifest.json"
SERVER = "server.pt"


def folder(run_dir: Path, round_: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"round_{round_:04d}"


def actor_file(checkpoint: Path, actor_index: int) -> Path:
    return checkpoint / f"actor_{actor_index:03d}.pt"


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, if any."""
    complete = sorted(p.parent for p in (Path(run_dir) / CHECKPOINTS).glob(f"round_*/{COMPLETE}"))
    return complete[-1] if complete else None


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save through a temporary file and a rename: never a half-written file under `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def write_server(checkpoint: Path, round_: int, state: Any) -> None:
    save_atomic({"round": round_, "state": state}, checkpoint / SERVER)


def load_server(checkpoint: Path) -> tuple[Any, int]:
    saved = torch.load(checkpoint / SERVER, map_location="cpu", weights_only=False)
    return saved["state"], int(saved["round"])


def complete(checkpoint: Path, round_: int, clients: dict[str, str], dead: dict[str, str]) -> None:
    """Write the manifest (client -> file relative to checkpoints/), then COMPLETE, then prune."""
    manifest = {"round": round_, "clients": dict(sorted(clients.items())), "dead": dict(sorted(dead.items()))}
    tmp = checkpoint / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(checkpoint / MANIFEST)
    (checkpoint / COMPLETE).write_text(f"{round_}\n")
    prune(checkpoint.parent, keep=checkpoint, referenced=set(clients.values()))


def load_manifest(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / MANIFEST).read_text())


def relative(path: Path) -> str:
    """How a manifest names a client file: `round_0002/actor_001.pt`."""
    return f"{path.parent.name}/{path.name}"


def prune(root: Path, *, keep: Path, referenced: set[str]) -> None:
    """Delete every other round folder's files except those the kept manifest names."""
    for other in root.glob("round_*"):
        if other == keep:
            continue
        for item in other.iterdir():
            if relative(item) not in referenced:
                shutil.rmtree(item) if item.is_dir() else item.unlink(missing_ok=True)
        if not any(other.iterdir()):
            other.rmdir()
