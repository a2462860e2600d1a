"""Sample pools as the overlap checks see them: FedHelp's public set and the small CLIP's
training pool (`raysim.client.clip_pretraining`) must share nothing with the clients' data."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysim.datasets.base import DataError, DataSource


@dataclass(frozen=True)
class Pool:
    """A set of samples as the overlap checks see it: its directory and, for a generated
    synthetic set, its generator parameters (truth.json)."""

    label: str
    root: Path | None
    params: Mapping[str, Any] | None = None

    def files(self) -> set[Path]:
        """The sample files under root/all (FairFedMed-Oph layout), resolved through links."""
        folder = self.root / "all" if self.root else None
        return {p.resolve() for p in folder.glob("*.npz")} if folder is not None and folder.is_dir() else set()


def pool_of(source: DataSource, label: str) -> Pool:
    try:
        root: Path | None = Path(source.root).resolve()
    except DataError:  # a source without a root directory
        root = None
    truth = root / "truth.json" if root is not None else None
    params = json.loads(truth.read_text())["params"] if truth is not None and truth.is_file() else None
    return Pool(label, root, params)


def overlap(a: Pool, b: Pool) -> str | None:
    """Why two pools may share samples, or None."""
    if a.root is not None and a.root == b.root:
        return f"both read {a.root}"
    if a.params is not None and b.params is not None:
        population = a.params.get("population", "clinical")
        if population == b.params.get("population", "clinical") and a.params.get("seed") == b.params.get("seed"):
            return f"both are the synthetic {population} population drawn with generator seed {a.params.get('seed')}"
    shared = a.files() & b.files()
    if shared:
        return f"{len(shared)} sample files are shared (e.g. {min(shared)})"
    return None
