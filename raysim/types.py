"""What crosses the actor boundary: updates go up, predictions come back. No pixels ever."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

Tensors = Mapping[str, torch.Tensor]


def nbytes(tensors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class Update:
    """One client's reply to a round: only what its method communicates."""

    client_id: str
    tensors: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)  # local training stats (loss, steps)
    extra: dict[str, object] = field(default_factory=dict)  # method-specific small values (e.g. group counts)

    @property
    def nbytes(self) -> int:
        return nbytes(self.tensors)


@dataclass
class Predictions:
    """A client's scores on one split: the only evaluation data the driver sees.

    Segmentation (`task` "segmentation") sends no scores (an (N, 0) array) but per-sample
    `values` (`raysim.client.tasks.SEGMENTATION_COLUMNS`: Dice, IoU, hd95, CDR, areas), never the
    true masks; its predicted masks only with `eval.masks` (`masks`). An evaluation that is not
    written to predictions.parquet sends what the metrics need only: no sample ids (None), no
    masks, and of the values `raysim.metrics.segmentation.SAMPLE_COLUMNS`."""

    client_id: str
    split: str
    sample_ids: np.ndarray | None  # pseudonyms with eval.pseudonymize; None when not written
    labels: np.ndarray
    scores: np.ndarray  # (N,) P(positive) for binary, (N, K) probabilities for multi-class
    attributes: dict[str, np.ndarray]  # attribute -> int group codes, -1 unknown
    role: str = ""
    task: str = "classification"  # a `raysim.client.tasks.TASKS` name
    values: dict[str, np.ndarray] | None = None  # segmentation: per-sample values by column
    masks: np.ndarray | None = None  # predicted masks (N, H, W) uint8, only with eval.masks
