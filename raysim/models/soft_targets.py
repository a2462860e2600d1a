"""The soft-target store: a foundation model's answers for the public set, asked once per run.

`soft_targets` keeps class probabilities in a Parquet file (sample_id, p_0..p_{K-1}),
`soft_target_maps` a segmentation run's per-pixel maps in an .npz file; both next to the run,
reused every round and after a resume, and refused (never overwritten) when they hold other
samples, another K or another size. Apart from the backends: the files change with the runs
that read them back, not with how a model is asked.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raysim.config import ConfigError
from raysim.models.foundation_base import (
    FoundationModel,
    check_images,
    check_probabilities,
    check_probability_maps,
    predict_probabilities,
    predict_probability_maps,
)

log = logging.getLogger(__name__)


# --- the one-time query and its file --------------------------------------------------------


def prob_columns(num_classes: int) -> list[str]:
    return [f"p_{k}" for k in range(num_classes)]


def soft_targets(path: str | Path, factory: Callable[[], FoundationModel], images: np.ndarray, sample_ids: Sequence[Any] | np.ndarray, num_classes: int) -> np.ndarray:
    """Probabilities (N, num_classes) for the public `images`, from `path` when it holds them.

    Otherwise `factory()` builds the model, which is queried once for all images; the answer
    is written to `path` (Parquet: sample_id, p_0..p_{K-1}) before it is returned, so later
    rounds and resumed runs never call the model again. A file for other samples or another
    K is an error, never overwritten. Sample ids are stored as strings.
    """
    path = Path(path).expanduser()
    check_images(images, "soft_targets")
    ids = _as_ids(sample_ids, len(images))
    if path.exists():
        log.info("soft targets: reusing %s", path)
        return read_soft_targets(path, ids, num_classes)
    model = factory()
    probs = predict_probabilities(model, images, num_classes)
    write_soft_targets(path, ids, probs)
    log.info("soft targets: queried %s once for %d public images -> %s", model.label, len(ids), path)
    return probs


def _as_ids(sample_ids: Sequence[Any] | np.ndarray, n: int) -> np.ndarray:
    ids = np.asarray(sample_ids).astype(str)
    if ids.shape != (n,):
        raise ValueError(f"soft_targets: expected {n} sample ids (one per image), got shape {ids.shape}")
    if len(np.unique(ids)) != n:
        raise ValueError("soft_targets: sample ids must be unique (they key the stored soft targets)")
    return ids


def read_soft_targets(path: Path, sample_ids: np.ndarray, num_classes: int) -> np.ndarray:
    """The stored rows for `sample_ids` (string array), in that order; a clear error otherwise."""
    redo = "delete it (the foundation model is then queried again) or choose another file"
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid for a corrupt file is a ValueError
        raise ConfigError(f"soft targets file {path} cannot be read ({type(err).__name__}: {err}); {redo}") from err
    expected = ["sample_id", *prob_columns(num_classes)]
    if list(frame.columns) != expected:
        raise ConfigError(f"soft targets file {path} has columns {list(frame.columns)}; expected {expected} (num_classes={num_classes}); {redo}")
    stored = frame["sample_id"].astype(str).to_numpy()
    if not np.array_equal(stored, sample_ids):
        # The same samples in another order are the same answer: reorder instead of failing.
        if len(stored) != len(sample_ids) or set(stored) != set(sample_ids) or len(set(stored)) != len(stored):
            missing = len(set(sample_ids) - set(stored))
            raise ConfigError(f"soft targets file {path} holds other samples ({len(stored)} stored; {missing} of the {len(sample_ids)} requested ids missing); {redo}")
        frame = frame.set_index("sample_id").loc[sample_ids].reset_index()
    probs = frame[expected[1:]].to_numpy(dtype=np.float64)
    return check_probabilities(probs, n=len(sample_ids), num_classes=num_classes, source=f"soft targets file {path}")


def write_soft_targets(path: Path, sample_ids: np.ndarray, probs: np.ndarray) -> None:
    """Atomic: a crash never leaves a half-written file that a resumed run would trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {"sample_id": sample_ids, **{name: probs[:, k] for k, name in enumerate(prob_columns(probs.shape[1]))}}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pd.DataFrame(columns).to_parquet(tmp, index=False)
    tmp.replace(path)


# --- segmentation: per-pixel maps, asked once, kept in an .npz ---------------------------------


def soft_target_maps(path: str | Path, factory: Callable[[], FoundationModel], images: np.ndarray, sample_ids: Sequence[Any] | np.ndarray, num_classes: int) -> np.ndarray:
    """Per-pixel probabilities (N, num_classes, H, W) for the public `images`, as `soft_targets`
    does for class probabilities: from `path` when it holds them, else `factory()`'s model is
    asked once (`predict_maps`) and the answer written to `path` (npz: `sample_id`, float32
    `probabilities`) before it is returned. A file for other samples, K or size is an error."""
    path = Path(path).expanduser()
    check_images(images, "soft_target_maps")
    ids = _as_ids(sample_ids, len(images))
    size = (int(images.shape[2]), int(images.shape[3]))
    if path.exists():
        log.info("soft target maps: reusing %s", path)
        return read_soft_target_maps(path, ids, num_classes, size)
    model = factory()
    maps = predict_probability_maps(model, images, num_classes).astype(np.float32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(tmp, sample_id=ids, probabilities=maps)
    tmp.replace(path)
    log.info("soft target maps: queried %s once for %d public images -> %s", model.label, len(ids), path)
    return maps


def read_soft_target_maps(path: Path, sample_ids: np.ndarray, num_classes: int, size: tuple[int, int]) -> np.ndarray:
    """The stored maps for `sample_ids`, in that order (float32); a clear error otherwise."""
    redo = "delete it (the foundation model is then queried again) or choose another file"
    try:
        with np.load(path, allow_pickle=False) as stored:
            stored_ids, maps = stored["sample_id"].astype(str), stored["probabilities"]
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"soft target maps file {path} cannot be read ({type(err).__name__}: {err}); {redo}") from err
    if len(stored_ids) != len(sample_ids) or set(stored_ids) != set(sample_ids) or len(set(stored_ids)) != len(stored_ids):
        raise ConfigError(f"soft target maps file {path} holds other samples ({len(stored_ids)} stored, {len(sample_ids)} requested); {redo}")
    order = pd.Index(stored_ids).get_indexer(sample_ids)
    maps = maps[order]
    if maps.shape[1:] != (num_classes, *size):
        raise ConfigError(f"soft target maps file {path} holds maps shaped {maps.shape[1:]}; this run needs {(num_classes, *size)} (num_classes, img_size); {redo}")
    check_probability_maps(maps, n=len(sample_ids), num_classes=num_classes, size=size, source=f"soft target maps file {path}")
    return maps.astype(np.float32)
