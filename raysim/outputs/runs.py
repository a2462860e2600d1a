"""Run directories read back, and the model-selection rule every report and table shares.

A run directory holds `config.yaml` (the resolved config), `provenance.json` and
`metrics.parquet` (long format: round, split, client, role, attribute, group, metric, value;
see `raysim.outputs.recorder`). `read_run` loads the three; `select_round` picks the round a run is
reported at: the evaluated round with the best mean validation AUC (the earliest on a tie),
chosen on validation rows only so the test rows stay an unbiased estimate. A segmentation run
(no AUC or accuracy rows) is selected by its mean validation Dice: `dice`, the mean of the
`dice_disc` and `dice_cup` means (the D of `raysim.metrics.segmentation`), else `dice_disc` alone.
`Run.task` says which report a run gets: "segmentation" or "classification" (see there).
A run with `eval.holdout_site` has that site's rows under its own client id with role `holdout`
(FL-MedSegBench's unseen-site protocol): they are in no `mean` row, so selection is the
participants' alone, and `clients` leaves them out (worst client, spread, per-client columns);
`holdout_clients` names them and `holdout_values` reads them at a round. Plain pandas, no Ray.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

MEAN = "mean"  # the client column of the mean-over-clients rows
HOLDOUT = "holdout"  # the role of eval.holdout_site's rows (raysim.algorithms.base.HOLDOUT; not imported: torch)
# The first one with a defined validation mean decides: classification's AUC, then accuracy;
# segmentation's Dice (`dice`: derived, the mean of dice_disc and dice_cup), then the disc's.
# A joint run (segmentation + grading) has AUC and Dice rows: it is selected by their mean, since
# its AUC alone saturates rounds before its Dice does; a classification run (no Dice rows) falls
# through to AUC, a segmentation run (no AUC rows) to Dice.
SELECTION_METRICS = ("auc_dice", "auc", "acc", "dice", "dice_disc")
DERIVED = {"dice": ("dice_disc", "dice_cup"), "auc_dice": ("auc", "dice")}  # selection metrics that are the mean of others
LABELS = {"dice": "Dice (mean of disc and cup)", "dice_disc": "disc Dice", "auc_dice": "mean of AUC and Dice (a joint run)"}  # in `Selection.reason`; others upper-cased
TASKS = ("classification", "segmentation", "joint")
CLASSIFICATION_METRICS = ("auc", "acc")  # rows only a classification run writes
SEGMENTATION_METRICS = ("dice_disc", "dice_cup")  # rows only a segmentation run writes
SEGMENTATION_MODELS = ("unet:",)  # `<decoder>:<encoder>` prefixes of raysim.models.DECODER_TASKS (not imported: torch)
JOINT_MODELS = ("joint:",)
CONFIG_SECTIONS = ("data", "model", "algorithm", "federation", "resources", "eval", "checkpoint", "fault", "report")  # raysim.config's sections
METRIC_COLUMNS = ("round", "split", "client", "role", "attribute", "group", "metric", "value")  # raysim.outputs.recorder's long format


class RunReadError(ValueError):
    """A directory is not a readable raysim run (the message names the path and what is missing)."""


@dataclass(frozen=True)
class Selection:
    """The round a run is reported at, and why."""

    round: int
    metric: str  # the validation metric that chose it
    value: float  # its mean over clients at that round
    candidates: tuple[int, ...]  # the evaluated rounds it was chosen from

    @property
    def reason(self) -> str:
        rounds = ", ".join(str(r) for r in self.candidates)
        return f"round {self.round}: the best mean validation {LABELS.get(self.metric, self.metric.upper())} ({100 * self.value:.1f}) among the evaluated rounds {rounds} (the earliest on a tie)"


@dataclass(frozen=True)
class Run:
    """One run directory: its resolved config, provenance and metric rows."""

    path: Path
    config: dict[str, Any]
    provenance: dict[str, Any]
    metrics: pd.DataFrame

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def algorithm(self) -> str:
        return str(self.config.get("algorithm", {}).get("name", "?"))

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def attribute(self) -> str:
        """The target sensitive attribute ("" for a source without any): as the run recorded it,
        else `data.attribute`, else the first attribute with fairness rows."""
        recorded = self.provenance.get("attribute") or self.config.get("data", {}).get("attribute")
        attributes = [a for a in self.metrics["attribute"].unique() if a]
        if recorded in attributes:
            return str(recorded)
        return str(attributes[0]) if attributes else ""

    def selection(self) -> Selection:
        return select_round(self.metrics)

    @property
    def task(self) -> str:
        """The run's task, "classification", "segmentation" or "joint": the metric rows decide
        (AUC or accuracy rows and Dice rows: joint; Dice rows alone: segmentation); a run without
        either (no evaluation yet) follows its model, as the engine does
        (`model.name=unet:<encoder>`: segmentation, `joint:<encoder>`: joint)."""
        return task_of(self.metrics, self.config)


def task_of(metrics: pd.DataFrame, config: dict[str, Any] | None = None) -> str:
    """The task of a run's metric rows (and config, when the rows cannot say): see `Run.task`."""
    names = set(metrics["metric"].unique())
    graded, segmented = bool(names & set(CLASSIFICATION_METRICS)), bool(names & set(SEGMENTATION_METRICS))
    if graded or segmented:
        return "joint" if graded and segmented else "classification" if graded else "segmentation"
    model = str(((config or {}).get("model") or {}).get("name", ""))
    return "joint" if model.startswith(JOINT_MODELS) else "segmentation" if model.startswith(SEGMENTATION_MODELS) else "classification"


def mean_dice(frame: pd.DataFrame) -> pd.Series:
    """D = (Dice_disc + Dice_cup) / 2 per row of a wide frame with `dice_disc` and `dice_cup`
    columns (`raysim.metrics.segmentation`' D; NaN where either is missing)."""
    return frame[list(DERIVED["dice"])].mean(axis=1, skipna=False)


@dataclass(frozen=True)
class ClientSpread:
    """FL-MedSegBench's client-fairness view of one metric over a federation's clients: the
    worst client (the lowest value; the first in natural order on a tie) and the spread, min /
    median / max / std. The std is the population one (ddof = 0): the clients are the whole
    federation, not a sample of it. Computed where reported, never stored as client rows."""

    worst: str
    min: float
    median: float
    max: float
    std: float
    n: int


def client_spread(per_client: pd.Series) -> ClientSpread:
    """`ClientSpread` of client -> value (NaN values left out; NaN everywhere with none)."""
    values = per_client.dropna().astype(float)
    values = values.reindex(sorted(values.index, key=natural_key))
    if values.empty:
        return ClientSpread("", math.nan, math.nan, math.nan, math.nan, 0)
    return ClientSpread(str(values.idxmin()), float(values.min()), float(values.median()), float(values.max()), float(values.std(ddof=0)), len(values))


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "config.yaml").is_file() and (Path(path) / "metrics.parquet").exists()


def read_run(path: Path | str) -> Run:
    """The run in `path`; a RunReadError naming the file when something is missing or unreadable."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise RunReadError(f"{path}: not a directory (expected a raysim run directory)")
    try:
        config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise RunReadError(f"{path}: no config.yaml (not a raysim run directory)") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as err:
        raise RunReadError(f"{path / 'config.yaml'}: unreadable ({_first_line(err)})") from None
    if not isinstance(config, dict):
        raise RunReadError(f"{path / 'config.yaml'}: expected a mapping of config sections, got {type(config).__name__}")
    for section in CONFIG_SECTIONS:
        if not isinstance(config.get(section, {}), dict):
            raise RunReadError(f"{path / 'config.yaml'}: {section} must be a mapping, got {config[section]!r}")
    if isinstance(config.get("seed", 0), bool) or not isinstance(config.get("seed", 0), int):
        raise RunReadError(f"{path / 'config.yaml'}: seed must be an integer, got {config['seed']!r}")
    if not (path / "metrics.parquet").exists():
        raise RunReadError(f"{path}: no metrics.parquet yet (the run has not finished a round)")
    try:
        metrics = pd.read_parquet(path / "metrics.parquet")
    except (OSError, ValueError) as err:
        raise RunReadError(f"{path / 'metrics.parquet'}: unreadable ({_first_line(err)})") from None
    provenance = _read_provenance(path / "provenance.json")
    return Run(path=path, config=config, provenance=provenance, metrics=_checked_metrics(path / "metrics.parquet", metrics))


def _read_provenance(path: Path) -> dict[str, Any]:
    """provenance.json as a mapping ({} when the run has none: it is informative only); a
    RunReadError when it is there but not a JSON object."""
    if not path.exists():
        return {}
    try:
        provenance = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise RunReadError(f"{path}: unreadable ({_first_line(err)})") from None
    if not isinstance(provenance, dict):
        raise RunReadError(f"{path}: expected a JSON object, got {type(provenance).__name__}")
    for key, kinds, expected in (("data", (dict,), "an object (the data fingerprint)"), ("attribute", (str, type(None)), "a string or null")):
        if key in provenance and not isinstance(provenance[key], kinds):
            raise RunReadError(f"{path}: {key} must be {expected}, got {provenance[key]!r}")
    return provenance


def _checked_metrics(path: Path, metrics: pd.DataFrame) -> pd.DataFrame:
    """The long metrics frame with its columns' types checked (a RunReadError naming the first
    missing column or the first cell of the wrong type): integer rounds, numeric values, text keys."""
    missing = [c for c in METRIC_COLUMNS if c not in metrics.columns]
    if missing:
        raise RunReadError(f"{path}: missing column(s) {', '.join(missing)} (expected {', '.join(METRIC_COLUMNS)})")
    if metrics.empty:
        raise RunReadError(f"{path}: no rows (the run has not finished a round)")
    for column, kind, fits in (("round", "an integer", _is_integer), ("value", "a number", _is_number)):
        good = metrics[column].map(fits)
        if not good.all():
            raise RunReadError(f"{path}: column {column}: row {int((~good).to_numpy().argmax())} holds {_plain(metrics[column][~good].iloc[0])!r}, expected {kind}")
        metrics[column] = metrics[column].astype(int if column == "round" else float)
    for column in ("split", "client", "role", "attribute", "group", "metric"):
        text = metrics[column].map(lambda cell: isinstance(cell, str))
        if not text.all():
            raise RunReadError(f"{path}: column {column}: row {int((~text).to_numpy().argmax())} holds {_plain(metrics[column][~text].iloc[0])!r}, expected text")
        metrics[column] = metrics[column].astype(object)  # plain str cells whatever Arrow gave
    return metrics


def _plain(cell: Any) -> Any:
    """A numpy scalar as the Python value it holds (for messages: 1.5, not np.float64(1.5))."""
    return cell.item() if isinstance(cell, np.generic) else cell


def _is_number(cell: Any) -> bool:
    return isinstance(cell, (int, float, np.integer, np.floating)) and not isinstance(cell, (bool, np.bool_))


def _is_integer(cell: Any) -> bool:
    return _is_number(cell) and math.isfinite(cell) and float(cell).is_integer()


def select_round(metrics: pd.DataFrame) -> Selection:
    """The evaluated round with the best mean validation AUC (accuracy where no AUC is defined;
    Dice for segmentation, `SELECTION_METRICS`); the earliest on a tie. A RunReadError when the run has no validation rows."""
    mean = metrics[(metrics["client"] == MEAN) & (metrics["split"] == "val") & (metrics["attribute"] == "") & (metrics["group"] == "")]
    for metric in SELECTION_METRICS:
        curve = _curve(mean, metric)
        if len(curve):
            best = int(curve.idxmax())  # idxmax: the first maximum, i.e. the earliest round
            return Selection(round=best, metric=metric, value=float(curve[best]), candidates=tuple(int(r) for r in curve.index))
    raise RunReadError("no mean validation AUC, accuracy or Dice in metrics.parquet (data.val_fraction=0, or no evaluation yet): no round to select")


def _curve(mean: pd.DataFrame, metric: str) -> pd.Series:
    """Round -> a selection metric's mean validation value (a derived one: the mean of its parts)."""
    parts = DERIVED.get(metric)
    if parts is None:
        return mean[mean["metric"] == metric].set_index("round")["value"].sort_index().dropna()
    curves = [_curve(mean, m) for m in parts]  # a part may be derived itself (Dice in auc_dice)
    return pd.concat(curves, axis=1).mean(axis=1, skipna=False).sort_index().dropna()


def value(metrics: pd.DataFrame, *, round_: int, split: str, metric: str, attribute: str = "", group: str = "", client: str = MEAN) -> float:
    """One cell of the long frame (NaN when absent)."""
    hit = metrics[
        (metrics["round"] == round_) & (metrics["split"] == split) & (metrics["client"] == client) & (metrics["metric"] == metric) & (metrics["attribute"] == attribute) & (metrics["group"] == group)
    ]["value"]
    return float(hit.iloc[0]) if len(hit) else math.nan


def clients(metrics: pd.DataFrame) -> list[str]:
    """The participating clients (no `mean`, `mean:<role>` or `server` rows, no held-out site), in
    natural order (site2 < site10): what the means, the worst client and the spread are over."""
    held = set(holdout_clients(metrics))
    names = {c for c in metrics["client"].unique() if c != MEAN and not c.startswith(f"{MEAN}:") and c != "server" and c not in held}
    return sorted(names, key=natural_key)


def holdout_clients(metrics: pd.DataFrame) -> list[str]:
    """The `eval.holdout_site` clients of a run (rows of role `holdout`; none without one)."""
    return sorted(set(metrics.loc[metrics["role"] == HOLDOUT, "client"]), key=natural_key)


def holdout_values(metrics: pd.DataFrame, round_: int, split: str = "test") -> dict[str, dict[str, float]]:
    """Held-out client -> its whole-population metrics (attribute "") at `round_` on `split`,
    segmentation's D (`dice`, the mean of disc and cup) included; {} without a held-out site."""
    out: dict[str, dict[str, float]] = {}
    for client in holdout_clients(metrics):
        rows = metrics[(metrics["client"] == client) & (metrics["round"] == round_) & (metrics["split"] == split) & (metrics["attribute"] == "") & (metrics["group"] == "")]
        values = {str(k): float(v) for k, v in zip(rows["metric"], rows["value"])}
        if set(DERIVED["dice"]) <= set(values):
            values["dice"] = (values["dice_disc"] + values["dice_cup"]) / 2
        out[client] = values
    return out


def natural_key(name: str) -> tuple[Any, ...]:
    import re

    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
