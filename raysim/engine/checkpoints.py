"""Checkpoints you can trust: one format, verified on load, kept in pairs.

    checkpoints/round_0004/server.pt              the server state after round 4
    checkpoints/round_0004/clients/actor_001.pt   client actor 1's clients whose state changed
                                                  since the previous checkpoint (absent: none did)
    checkpoints/round_0004/MANIFEST.json          format version; every file this checkpoint
                                                  needs (its own and earlier rounds' client
                                                  files) with size and sha256; client id -> the
                                                  file with its latest state; clients out of the run
    checkpoints/round_0004/COMPLETE               written last, after everything is durable

Every file is written under a temporary name, fsynced and renamed, and its folder fsynced;
COMPLETE only after the manifest; older checkpoints are pruned only once the new one is
durable. Folders are ordered by their round as a number (`round_10000` follows `round_9999`).
Every `.pt` holds tensors and plain types and loads with `weights_only=True`. A client in no
file (never trained yet, e.g. in a cross-device run) resumes from the initial state it holds.
The newest `checkpoint.keep` complete checkpoints stay, with every file they name; a
checkpoint that fails verification on load (a file changed or missing, its manifest missing
or malformed, a name in it outside this layout) is skipped for the previous one, and the
caller says so. Checkpoints of raysim 0.2.0 and earlier (no MANIFEST.json) are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from raysim import durable
from raysim.config import ConfigError

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
SERVER = "server.pt"
CLIENTS = "clients"
FORMAT = 2  # 1: raysim <= 0.2.0 (one file per client, no manifest)
ROUND_NAME = re.compile(r"round_(\d{4,})")
FILE_NAME = re.compile(rf"round_\d{{4,}}/({re.escape(SERVER)}|{CLIENTS}/actor_\d{{3,}}\.pt)")  # a manifest's names


class CheckpointError(ConfigError):
    """No usable checkpoint: the message says which and why."""


def folder(run_dir: Path, round_: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"round_{round_:04d}"


def actor_file(checkpoint: Path, actor_index: int) -> Path:
    return checkpoint / CLIENTS / f"actor_{actor_index:03d}.pt"


def relative(path: Path) -> str:
    """How a manifest names a file: relative to the run's checkpoints/, e.g.
    `round_0002/clients/actor_001.pt`. The last folder called `checkpoints` is the run's (nothing
    inside a checkpoint has that name), so a run directory under one, e.g.
    `/scratch/checkpoints/exp1`, names its files the same way."""
    parts = path.parts
    if CHECKPOINTS not in parts:
        return path.name
    last = len(parts) - 1 - parts[::-1].index(CHECKPOINTS)
    return "/".join(parts[last + 1 :])


def round_of(folder: Path | str) -> int | None:
    """The round of a `round_NNNN` folder (any number of digits), None for any other name."""
    match = ROUND_NAME.fullmatch(Path(folder).name)
    return int(match.group(1)) if match else None


def by_round(folders: Iterable[Path]) -> list[Path]:
    """Checkpoint folders newest first, by their round as a number (`round_10000` after
    `round_9999`; as text it would sort first and be pruned as the oldest)."""
    numbered = [(number, f) for f in folders if (number := round_of(f)) is not None]
    return [f for _, f in sorted(numbered, reverse=True)]


def complete_folders(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders, newest first."""
    return by_round(p.parent for p in (Path(run_dir) / CHECKPOINTS).glob(f"round_*/{COMPLETE}"))


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
    if not any((checkpoint / MANIFEST).exists() for checkpoint in found):
        raise CheckpointError(f"{found[0]} was written by raysim 0.2.0 or earlier (no {MANIFEST}); this version cannot resume it: start the run again")
    raise CheckpointError(f"{Path(run_dir) / CHECKPOINTS}: no usable checkpoint: " + "; ".join(skipped))


def verify(checkpoint: Path) -> str | None:
    """None when every file the manifest names is there with its size and sha256; else what is
    wrong (a missing or malformed manifest too: its checkpoint is skipped for the previous one).
    A manifest of another format version is refused: the whole run is of that version."""
    try:
        manifest = json.loads((checkpoint / MANIFEST).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError) as err:
        return f"{MANIFEST} unreadable: {err}"
    if isinstance(manifest, dict) and isinstance(manifest.get("format"), int) and manifest["format"] != FORMAT:
        raise CheckpointError(f"{checkpoint}: checkpoint format {manifest['format']!r}, this version reads format {FORMAT}: start the run again")
    problem = _malformed(manifest)
    if problem is not None:
        return f"{MANIFEST} is not a raysim manifest ({problem})"
    root = checkpoint.parent
    for name, expected in manifest["files"].items():
        path = root / name
        if not path.exists():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if sha256(path) != expected["sha256"]:
            return f"{name} does not match its sha256"
    return None


def _malformed(manifest: Any) -> str | None:
    """What makes `manifest` unusable, or None. Every name it gives must be one the writer makes
    (`round_NNNN/server.pt`, `round_NNNN/clients/actor_NNN.pt`): a crafted `../../etc/x` or
    `/dev/zero` would be read (and hashed) outside the run directory."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return "no format version"
    files, clients, dead = manifest.get("files"), manifest.get("clients", {}), manifest.get("dead", {})
    if not isinstance(files, dict) or not isinstance(clients, dict) or not isinstance(dead, dict):
        return "its file list, clients or dead clients are missing"
    if not all(isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str) for v in files.values()):
        return "a file without its size or sha256"
    if bad := [name for name in files if not FILE_NAME.fullmatch(name)]:
        return f"file name {bad[0]!r} is not round_NNNN/server.pt or round_NNNN/clients/actor_NNN.pt"
    if bad := [cid for cid, name in clients.items() if name not in files]:
        return f"client {bad[0]!r} names a file the manifest does not list"
    return None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


def save_atomic(obj: Any, path: Path) -> dict[str, Any]:
    """torch.save through a temporary file, fsync and a rename: never a half-written file under
    `path`. Its size and sha256, computed on the way (the manifest needs them; reading a 45 MB
    server state back cost every round 70 ms)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        hashing = _HashingWriter(f)
        torch.save(obj, hashing)
        f.flush()
        os.fsync(f.fileno())
    durable.replace_durably(tmp, path)
    return {"bytes": hashing.size, "sha256": hashing.digest.hexdigest()}


class _HashingWriter:
    """A binary file that hashes what goes through it (all torch.save needs is `write`)."""

    def __init__(self, file: Any) -> None:
        self.file, self.digest, self.size = file, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


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
    durable.replace_durably(tmp, path)
    return {"bytes": size, "sha256": digest.hexdigest()}


def _write_text_atomic(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    durable.replace_durably(tmp, path)


def load(source: Path | BinaryIO, device: str | torch.device = "cpu", *, name: str | None = None) -> Any:
    """A checkpoint file (a path, or its bytes as a file object, called `name` in errors):
    tensors and plain types only (`weights_only=True`), never code."""
    try:
        return torch.load(source, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds; each means the same here
        raise CheckpointError(f"{name or source}: not a raysim checkpoint file with tensors and plain values only ({str(err).splitlines()[0]})") from err


def write_server(checkpoint: Path, round_: int, state: Any) -> dict[str, Any]:
    """The server state of round `round_`; its size and sha256 (`complete` takes them in `known`)."""
    return save_atomic({"round": round_, "state": state}, checkpoint / SERVER)


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
    server = relative(checkpoint / SERVER)
    files = {server: known[server] if server in known else describe(checkpoint / SERVER)}
    for name in sorted(set(clients.values())):  # the driver passes what it wrote now in `known` too
        files[name] = known[name] if name in known else describe(root / name)
    manifest = {"format": FORMAT, "round": round_, "files": files, "clients": dict(sorted(clients.items())), "dead": dict(sorted(dead.items()))}
    _write_text_atomic(json.dumps(manifest, indent=1) + "\n", checkpoint / MANIFEST)
    _write_text_atomic(f"{round_}\n", checkpoint / COMPLETE)
    for folder_ in (root, root.parent):  # round_NNNN's and checkpoints/' own entries: now it survives a power cut
        durable.fsync_dir(folder_)
    prune(root, keep=keep)  # only now: until here the previous checkpoints are what a crash falls back to
    return files


def load_manifest(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / MANIFEST).read_text())


def prune(root: Path, *, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints and every file their manifests name; delete
    the rest, including incomplete folders older than the newest complete one."""
    kept = by_round(p.parent for p in root.glob(f"round_*/{COMPLETE}"))[:keep]
    if not kept:
        return
    named: set[str] = set()
    for checkpoint in kept:
        try:
            named |= set(load_manifest(checkpoint)["files"])
        except (OSError, ValueError, KeyError):
            return  # a manifest we cannot read: delete nothing
    for other in root.glob("round_*"):
        number = round_of(other)
        if other in kept or number is None or number > round_of(kept[0]):  # newer: a checkpoint being written
            continue
        for item in sorted(other.rglob("*"), reverse=True):  # files before their folders
            if item.is_file() and relative(item) not in named:
                item.unlink(missing_ok=True)
            elif item.is_dir() and not any(item.iterdir()):
                item.rmdir()
        if not any(other.iterdir()):
            other.rmdir()
