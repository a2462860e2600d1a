"""The task axis: what a model predicts, how it is trained, scored and reported.

A run's task follows from its model, not from a config key: a segmentation architecture
(`model.name=unet:<timm encoder>`, `raysim.models.DECODER_TASKS`) makes a segmentation run, a
joint one (`joint:<timm encoder>`: masks and a grade, from a fundus image alone or with an OCT
volume beside it) a joint run, any other (timm) model a classification run. The data source must fit:
segmentation needs a source with masks (`DataSource.mask_classes`: `fairseg`, `synthetic`)
and a 2D image (not an OCT volume); a source without a classification label (`fairseg`)
refuses a classification model (its `num_classes` says so). Why the model decides: the
synthetic twin carries both a label and masks, so the source alone cannot.

Each task is one small object in `TASKS`; the engine consults it instead of branching:

- `output_size(source)`: classes of the model's output (labels, or mask classes per pixel);
  `model_outputs(source)`: the output sizes `raysim.models.build_model` takes;
- `check(source, cfg)`: a ConfigError before any training when model and source do not fit;
- `score(logits)` (in the actor): what a forward pass keeps per sample, on the CPU;
- `predictions(...)`: a client's `Predictions` of one split from those parts;
- `client_rows(preds, ...)` (in the driver): the long metric rows of one client and split;
- `prediction_columns(preds)`: the per-sample columns of `predictions.parquet`;
- `table_columns(attribute, group_names)`: the console table's columns.

Model selection (`raysim.outputs.runs.SELECTION_METRICS`) needs no task: it falls through from the mean
of validation AUC and Dice (a joint run, which has both), to AUC and accuracy (classification
rows), to the mean Dice (segmentation rows).

The training loss follows the batch (`raysim.client.training.supervised_loss`): a batch with masks
is a segmentation batch, so methods that add a term to the supervised loss need no change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from raysim.config import ConfigError
from raysim.metrics import classification as metrics
from raysim.metrics import segmentation as segmetrics
from raysim.types import Predictions

if TYPE_CHECKING:
    from raysim.config import ExperimentConfig, ModelConfig
    from raysim.datasets.base import DataSource, SampleTable

Column = tuple[str, str, str, str]  # (header, attribute, group, metric) of the console table


class Task:
    name: ClassVar[str] = ""
    needs_masks: ClassVar[bool] = False

    def output_size(self, source: DataSource) -> int:
        raise NotImplementedError

    def model_outputs(self, source: DataSource) -> dict[str, int]:
        return {"num_classes": self.output_size(source)}

    def check(self, source: DataSource, cfg: ExperimentConfig) -> None:
        """A ConfigError when the model and the data source do not fit this task."""

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predictions(self, client_id: str, split: str, table: SampleTable, parts: list[torch.Tensor], masks: np.ndarray | None, role: str, *, classes: int = 2) -> Predictions:
        """A client's predictions of one split from what `score` kept of its batches (`parts`;
        none for an empty split, whose scores still get the shape of `classes` classes)."""
        raise NotImplementedError

    def predicted_masks(self, parts: list[Any]) -> np.ndarray | None:
        """The argmax masks among what `score` kept (None for a task without masks)."""
        return None

    def client_rows(self, preds: Predictions, attributes: Mapping[str, np.ndarray], group_names: Mapping[str, Mapping[int, str]], *, n_boot: int, seed: int) -> list[metrics.Row]:
        raise NotImplementedError

    def prediction_columns(self, many: Sequence[Predictions]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def table_columns(self, attribute: str, group_names: Mapping[int, str]) -> list[Column]:
        raise NotImplementedError


class Classification(Task):
    """One label per image: softmax scores, AUC / accuracy and their group views."""

    name = "classification"

    def output_size(self, source: DataSource) -> int:
        return source.num_classes

    def check(self, source: DataSource, cfg: ExperimentConfig) -> None:
        _one_modality(source, cfg)

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=1).cpu()

    def predictions(self, client_id: str, split: str, table: SampleTable, parts: list[torch.Tensor], masks: np.ndarray | None, role: str, *, classes: int = 2) -> Predictions:
        scores = torch.cat(parts).numpy().astype(np.float64) if parts else np.empty((0, classes))  # an empty split: the others' shape
        if scores.shape[1] == 2:
            scores = scores[:, 1]
        return Predictions(client_id, split, table.sample_ids, table.labels, scores, dict(table.attributes), role)

    def client_rows(self, preds: Predictions, attributes: Mapping[str, np.ndarray], group_names: Mapping[str, Mapping[int, str]], *, n_boot: int, seed: int) -> list[metrics.Row]:
        return metrics.client_metrics(preds.labels, preds.scores, attributes, group_names, n_boot=n_boot, seed=seed)

    def prediction_columns(self, many: Sequence[Predictions]) -> dict[str, np.ndarray]:
        columns = {"label": np.concatenate([p.labels.astype(np.int64) for p in many]) if many else np.array([], dtype=np.int64)}
        scores = np.concatenate([p.scores for p in many]) if many else np.array([])
        if scores.ndim == 1:
            columns["score"] = scores
        else:
            columns.update({f"score_{k}": scores[:, k] for k in range(scores.shape[1])})
        return columns

    def table_columns(self, attribute: str, group_names: Mapping[int, str]) -> list[Column]:
        if not attribute:  # a source without sensitive attributes
            return [("AUC", "", "", "auc"), ("Acc", "", "", "acc"), ("BAcc", "", "", "bacc")]
        columns = [("AUC", "", "", "auc"), ("ES-AUC", attribute, "", "es_auc")]
        columns += [(f"AUC {name}", attribute, name, "auc") for name in group_names.values()]
        return columns + [("EOD", attribute, "", "eod"), ("SPD", attribute, "", "spd")]


# Per-sample columns actors send up and predictions.parquet keeps (segmetrics' names).
SEGMENTATION_COLUMNS = (*segmetrics.SAMPLE_COLUMNS, *segmetrics.EXTRA_COLUMNS)
MASK_CLASSES = ("background", "disc", "cup")  # raysim.metrics.segmentation' label codes 0 / 1 / 2


class Segmentation(Task):
    """Optic disc / cup masks (classes 0 background, 1 disc rim, 2 cup): argmax per pixel in the
    actor, per-sample Dice / IoU / hd95 / CDR (`raysim.metrics.segmentation`) up to the driver, never masks."""

    name = "segmentation"
    needs_masks = True

    def output_size(self, source: DataSource) -> int:
        return len(source.mask_classes)

    def check(self, source: DataSource, cfg: ExperimentConfig) -> None:
        _one_modality(source, cfg)
        model = cfg.model.name
        if not source.mask_classes:
            raise ConfigError(f"model.name={model} is a segmentation model, but data source {source.name} has no masks (segmentation sources: fairseg, synthetic)")
        if source.volume_slices:
            raise ConfigError(f"model.name={model} segments 2D images, but data.modality={getattr(cfg.data, 'modality', None)!r} of {source.name} gives volumes; use a fundus modality")
        if tuple(source.mask_classes) != MASK_CLASSES:
            raise ConfigError(f"data source {source.name}: mask classes {source.mask_classes}; the segmentation metrics expect {MASK_CLASSES}")

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=1).to(torch.uint8).cpu()

    def predictions(self, client_id: str, split: str, table: SampleTable, parts: list[torch.Tensor], masks: np.ndarray | None, role: str, *, classes: int = 2) -> Predictions:
        if masks is None:
            raise RuntimeError(f"{client_id}/{split}: a segmentation client without masks")
        predicted = torch.cat(parts).numpy() if parts else np.zeros((0, *masks.shape[1:]), np.uint8)
        values = segmetrics.sample_metrics(predicted, np.asarray(masks))
        return Predictions(client_id, split, table.sample_ids, table.labels, np.empty((len(table), 0)), dict(table.attributes), role, task=self.name, values=values)

    def predicted_masks(self, parts: list[Any]) -> np.ndarray | None:
        return torch.cat(parts).numpy() if parts else None

    def client_rows(self, preds: Predictions, attributes: Mapping[str, np.ndarray], group_names: Mapping[str, Mapping[int, str]], *, n_boot: int, seed: int) -> list[metrics.Row]:
        return segmetrics.client_segmentation_metrics(preds.values or {}, attributes, group_names, n_boot=n_boot, seed=seed)

    def prediction_columns(self, many: Sequence[Predictions]) -> dict[str, np.ndarray]:
        columns = {c: np.concatenate([p.values[c] for p in many if p.values is not None]) if many else np.array([], dtype=np.float64) for c in SEGMENTATION_COLUMNS}
        scored = [p for p in many if len(p.labels)]  # an empty split sends no masks and needs none
        if scored and all(p.masks is not None for p in scored):
            columns.update(mask_columns(np.concatenate([p.masks for p in scored if p.masks is not None])))
        return columns

    def table_columns(self, attribute: str, group_names: Mapping[int, str]) -> list[Column]:
        columns = [("Dice disc", "", "", "dice_disc"), ("Dice cup", "", "", "dice_cup")]
        if attribute:
            columns.append(("ES-Dice", attribute, "", "es_dice"))
        columns.append(("CDR err", "", "", "cdr_error"))
        if attribute:
            columns += [(f"Disc {name}", attribute, name, "dice_disc") for name in group_names.values()]
            columns += [(f"Cup {name}", attribute, name, "dice_cup") for name in group_names.values()]
        return columns


class Joint(Task):
    """Disc / cup masks and a grade from one model (`joint:<encoder>`, raysim.models.joint): the
    actor keeps the argmax mask and the grade's probabilities of each sample, and sends the
    segmentation task's per-sample values and the classification task's scores; the rows are
    both tasks' rows (their metric names differ), the predictions both tasks' columns."""

    name = "joint"
    needs_masks = True
    parts = (Segmentation(), Classification())

    def output_size(self, source: DataSource) -> int:
        return source.num_classes

    def model_outputs(self, source: DataSource) -> dict[str, int]:
        return {"num_classes": source.num_classes, "mask_classes": len(source.mask_classes)}

    def check(self, source: DataSource, cfg: ExperimentConfig) -> None:
        model, modality = cfg.model.name, getattr(cfg.data, "modality", None)
        if not source.mask_classes or not source.label_name:
            raise ConfigError(f"model.name={model} segments and grades, but data source {source.name} has {'no masks' if not source.mask_classes else 'no grade label'} (joint sources: synthetic)")
        split = source.channel_split
        if source.volume_slices and len(split) != 2:
            raise ConfigError(f"model.name={model} segments a fundus image, but data.modality={modality!r} is a volume alone; use slo_fundus, or slo_fundus+<volume> for fundus + OCT")
        if tuple(source.mask_classes) != MASK_CLASSES:
            raise ConfigError(f"data source {source.name}: mask classes {source.mask_classes}; the segmentation metrics expect {MASK_CLASSES}")

    def score(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        masks, grade = logits
        return self.parts[0].score(masks), self.parts[1].score(grade)

    def predictions(self, client_id: str, split: str, table: SampleTable, parts: list[torch.Tensor], masks: np.ndarray | None, role: str, *, classes: int = 2) -> Predictions:
        segmented = self.parts[0].predictions(client_id, split, table, [p[0] for p in parts], masks, role)
        graded = self.parts[1].predictions(client_id, split, table, [p[1] for p in parts], masks, role, classes=classes)
        return Predictions(client_id, split, table.sample_ids, table.labels, graded.scores, dict(table.attributes), role, task=self.name, values=segmented.values)

    def predicted_masks(self, parts: list[Any]) -> np.ndarray | None:
        return self.parts[0].predicted_masks([p[0] for p in parts])

    def client_rows(self, preds: Predictions, attributes: Mapping[str, np.ndarray], group_names: Mapping[str, Mapping[int, str]], *, n_boot: int, seed: int) -> list[metrics.Row]:
        return [row for part in self.parts for row in part.client_rows(preds, attributes, group_names, n_boot=n_boot, seed=seed)]

    def prediction_columns(self, many: Sequence[Predictions]) -> dict[str, np.ndarray]:
        return {**self.parts[1].prediction_columns(many), **self.parts[0].prediction_columns(many)}

    def table_columns(self, attribute: str, group_names: Mapping[int, str]) -> list[Column]:
        graded = [c for c in self.parts[1].table_columns(attribute, group_names) if c[3] in ("auc", "es_auc", "acc")]
        segmented = [c for c in self.parts[0].table_columns(attribute, group_names) if c[2] == ""]
        return graded + segmented


def mask_columns(masks: np.ndarray) -> dict[str, np.ndarray]:
    """predictions.parquet's predicted-mask columns: `mask`, each sample's (H, W) class codes
    (0 background, 1 disc rim, 2 cup) as row-major uint8 bytes, and `mask_size` (H = W);
    `decode_mask` reads one back."""
    return {"mask": np.array([m.tobytes() for m in masks], dtype=object), "mask_size": np.full(len(masks), masks.shape[1], dtype=np.int64)}


def decode_mask(mask: bytes, size: int) -> np.ndarray:
    """One predicted mask of predictions.parquet (`mask`, `mask_size`) as a (size, size) uint8 array."""
    return np.frombuffer(mask, dtype=np.uint8).reshape(size, size)


def _one_modality(source: DataSource, cfg: ExperimentConfig) -> None:
    """Stacked modalities (a fundus image with an OCT volume) need the two-branch joint model."""
    if len(source.channel_split) > 1:
        raise ConfigError(f"data.modality={getattr(cfg.data, 'modality', None)!r} stacks two modalities; model.name={cfg.model.name} reads one: use model.name=joint:<timm encoder> (fundus + OCT), or one modality")


TASKS: dict[str, Task] = {task.name: task for task in (Classification(), Segmentation(), Joint())}


def task_of(model: ModelConfig) -> Task:
    """The task a model makes (`raysim.models.model_task`): segmentation for a U-Net, joint for a
    joint model, else classification."""
    from raysim.models.kinds import model_task

    return TASKS[model_task(model.name)]


def get(name: str) -> Task:
    return TASKS[name]


def describe(preds: Any) -> Task:
    """The task of a `Predictions` (its `task` field)."""
    return TASKS[getattr(preds, "task", "classification")]
