"""Checkpoints you can trust: one format, verified on load, kept in pairs.

    checkpoints/round_0004/server.pt              the server state after round 4
    checkpoints/round_0004/clients/actor_001.pt   client actor 1's clients whose state changed
                                                  since the previous checkpoint (absent: none did)
    checkpoints/round_0004/MANIFEST.json          format version; every file this checkpoint
                                                  needs (its own and earlier rounds' client
                                                  files) with size and sha256; client id -> the
                                                  file with its latest state; clients out of the run
    checkpoints/round_0004/COMPLETE               written last, after everything is durable

Every file is written under a temporary name, fsynced and renamed; COMPLETE only after the
manifest. Every `.pt` holds tensors and plain types and loads with `weights_only=True`. A
client in no file (never trained yet, e.g. in a cross-device run) resumes from the initial
state it holds. The newest `checkpoint.keep` complete checkpoints stay, with every file they
name; a checkpoint that fails verification on load is skipped for the previous one, and the
caller says so. Checkpoints of raysim 0.2.0 and earlier (no MANIFEST.json) are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from raysim.config import ConfigError

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
SERVER = "server.pt"
CLIENTS = "clients"
FORMAT = 2  # 1: raysim <= 0.2.0 (one file per client, no manifest)


class CheckpointError(ConfigError):
    """No usable checkpoint: the message says which and why."""


def folder(run_dir: Path, round_: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"round_{round_:04d}"


def actor_file(checkpoint: Path, actor_index: int) -> Path:
    return checkpoint / CLIENTS / f"actor_{actor_index:03d}.pt"


def relative(path: Path) -> str:
    """How a manifest names a file: relative to checkpoints/, e.g. `round_0002/clients/actor_001.pt`."""
    parts = path.parts
    return "/".join(parts[parts.index(CHECKPOINTS) + 1 :]) if CHECKPOINTS in parts else path.name


def complete_folders(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders, newest first."""
    return sorted((p.parent for p in (Path(run_dir) / CHECKPOINTS).glob(f"round_*/{COMPLETE}")), reverse=True)


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, if any (not verified: see `usable`)."""
    found = complete_folders(run_dir)
    return found[0] if found else None


def usable(run_dir: Path) -> tuple[Path, list[str]]:
    """The newest complete checkpoint that verifies, and one line per newer one skipped (why)."""
    skipped: list[str] = []
    found = complete_folders(run_dir)
    if not found:
        raise CheckpointError(f"{Path(run_dir) / CHECKPOINTS}: no complete checkpoint to resume from")
    for checkpoint in found:
        problem = verify(checkpoint)
        if problem is None:
            return checkpoint, skipped
        skipped.append(f"checkpoint {checkpoint.name} is unusable ({problem}); using the previous one")
    raise CheckpointError(f"{Path(run_dir) / CHECKPOINTS}: no usable checkpoint: " + "; ".join(skipped))


def verify(checkpoint: Path) -> str | None:
    """None when every file the manifest names is there with its size and sha256; else what is wrong."""
    manifest_path = checkpoint / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(
            f"{checkpoint} was written by raysim 0.2.0 or earlier (no {MANIFEST}); this version cannot resume it: start the run again"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as err:
        return f"{MANIFEST} unreadable: {err}"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{checkpoint}: checkpoint format {manifest.get('format') if isinstance(manifest, dict) else None!r}, this version reads format {FORMAT}: start the run again")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not isinstance(manifest.get("clients", {}), dict) or not all(isinstance(v, dict) and {"bytes", "sha256"} <= v.keys() for v in files.values()):
        return f"{MANIFEST} is not a raysim manifest (its file list or sizes are missing)"
    root = checkpoint.parent
    for name, expected in files.items():
        path = root / name
        if not path.exists():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if sha256(path) != expected["sha256"]:
            return f"{name} does not match its sha256"
    return None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save through a temporary file, fsync and a rename: never a half-written file under `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def write_chunks(chunks: Iterable[bytes], path: Path) -> dict[str, Any]:
    """A file from the pieces an actor streams (`ClientHost.save_changed`), written like
    `save_atomic`; its size and sha256, computed on the way (the file is not read again)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    digest, size = hashlib.sha256(), 0
    with open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
            digest.update(chunk)
            size += len(chunk)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return {"bytes": size, "sha256": digest.hexdigest()}


def _write_text_atomic(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def load(source: Path | BinaryIO, device: str | torch.device = "cpu", *, name: str | None = None) -> Any:
    """A checkpoint file (a path, or its bytes as a file object, called `name` in errors):
    tensors and plain types only (`weights_only=True`), never code."""
    try:
        return torch.load(source, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds; each means the same here
        raise CheckpointError(f"{name or source}: not a raysim checkpoint file with tensors and plain values only ({str(err).splitlines()[0]})") from err


def write_server(checkpoint: Path, round_: int, state: Any) -> None:
    save_atomic({"round": round_, "state": state}, checkpoint / SERVER)


def load_server(checkpoint: Path) -> tuple[Any, int]:
    saved = load(checkpoint / SERVER)
    return saved["state"], int(saved["round"])


def complete(checkpoint: Path, round_: int, clients: dict[str, str], dead: dict[str, str], known: dict[str, dict[str, Any]], keep: int) -> dict[str, dict[str, Any]]:
    """Describe this checkpoint's files, write the manifest, then COMPLETE, then prune.

    `clients` maps each client to its file (relative to checkpoints/); `known` holds size and
    sha256 of files described by earlier checkpoints (not read again). Returns the files this
    checkpoint names, with their descriptions, for the next one.
    """
    root = checkpoint.parent
    files = {relative(checkpoint / SERVER): describe(checkpoint / SERVER)}
    for name in sorted(set(clients.values())):  # the driver passes what it wrote now in `known` too
        files[name] = known[name] if name in known else describe(root / name)
    manifest = {"format": FORMAT, "round": round_, "files": files, "clients": dict(sorted(clients.items())), "dead": dict(sorted(dead.items()))}
    _write_text_atomic(json.dumps(manifest, indent=1) + "\n", checkpoint / MANIFEST)
    _write_text_atomic(f"{round_}\n", checkpoint / COMPLETE)
    prune(root, keep=keep)
    return files


def load_manifest(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / MANIFEST).read_text())


def prune(root: Path, *, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints and every file their manifests name; delete
    the rest, including incomplete folders older than the newest complete one."""
    complete_ = sorted((p.parent for p in root.glob(f"round_*/{COMPLETE}")), reverse=True)
    kept = complete_[:keep]
    if not kept:
        return
    named: set[str] = set()
    for checkpoint in kept:
        try:
            named |= set(load_manifest(checkpoint)["files"])
        except (OSError, ValueError, KeyError):
            return  # a manifest we cannot read: delete nothing
    for other in root.glob("round_*"):
        if other in kept or other.name > kept[0].name:  # newer folders: a checkpoint being written
            continue
        for item in sorted(other.rglob("*"), reverse=True):  # files before their folders
            if item.is_file() and relative(item) not in named:
                item.unlink(missing_ok=True)
            elif item.is_dir() and not any(item.iterdir()):
                item.rmdir()
        if not any(other.iterdir()):
            other.rmdir()

