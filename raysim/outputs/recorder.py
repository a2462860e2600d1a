"""Run outputs: metrics/predictions Parquet (the public contract), TensorBoard, console tables.

What each output holds, and who should see it:

- `metrics.parquet`: aggregate values per round, split, client and group (AUC, fairness
  gaps, losses, bytes sent); no sample-level data, but a small group's values describe few
  patients.
- `predictions.parquet` (`eval.predictions`: all, final or none): one row per evaluated
  sample with its id, label, score and every sensitive attribute: patient-level data, for
  those allowed to see the clients' data. CheXpert / MIMIC ids embed patient and study
  numbers; `eval.pseudonymize` replaces every id by an HMAC-SHA256 under a key kept outside
  the run directory (`pseudonym`), inside the client actors. Segmentation and joint runs write
  per-sample Dice, IoU, hd95 and CDR instead of (joint: beside) label and score, and with
  `eval.masks` each sample's predicted mask (`mask`, `mask_size`: `raysim.client.tasks.decode_mask`);
  the true masks never leave the client's actor. Ids and masks leave the actors only for the
  evaluations this file keeps (`RunRecorder.keeps`).

Both are Parquet dataset folders, one part per round and write (`part-r000003-k00.parquet`),
appended, never rewritten: `pd.read_parquet(RUN_DIR / "metrics.parquet")` reads one table.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from raysim import console, durable, secrets
from raysim.client import tasks
from raysim.metrics import classification as metrics
from raysim.types import Predictions

if TYPE_CHECKING:
    from raysim.config import ExperimentConfig

SERVER = "server"  # the client column of server-level rows (Algorithm.server_metrics: privacy spent)
METRIC_COLUMNS = ["round", "split", "client", "role", "attribute", "group", "metric", "value"]
PREDICTION_COLUMNS = ["round", "split", "client", "sample_id", "label", "score"]
OUTPUTS = ("metrics", "predictions")  # RUN_DIR/<name>.parquet, each a folder of parts
_PART = re.compile(r"part-r(\d+)-k(\d+)\.parquet")


def metric_frame(round_: int, scored: Sequence[tuple[Predictions, int]], group_names: Mapping[str, Mapping[int, str]], attributes: Sequence[str], *, n_boot: int) -> pd.DataFrame:
    """Long-format metric rows of many (predictions, bootstrap seed) pairs, built as one frame
    (a frame per client and split cost ~3 ms each: seconds at 1,000 clients)."""
    rows: list[tuple[object, ...]] = []
    for preds, seed in scored:
        if not len(preds.labels):  # a split carved from too few rows: its rows stay, every value NaN
            warnings.warn(f"{preds.client_id}/{preds.split} has no samples: all its metrics are undefined", metrics.UndefinedMetricWarning, stacklevel=2)
        bad = int(preds.scores.size - np.isfinite(preds.scores).sum())
        if bad:  # a diverged model (e.g. DP noise past what the weights bear): undefined, not a crash
            warnings.warn(f"{preds.client_id}/{preds.split}: {bad} of {preds.scores.size} scores are not finite (the model diverged): all its metrics are undefined", metrics.UndefinedMetricWarning, stacklevel=2)
            preds = dataclasses.replace(preds, scores=np.zeros_like(preds.scores))  # scored for the rows' shape; every value NaN below
        values = tasks.describe(preds).client_rows(  # AUC & co., or Dice & co. (raysim.client.tasks)
            preds,
            {a: preds.attributes[a] for a in attributes if a in preds.attributes},
            {a: group_names[a] for a in attributes},
            n_boot=n_boot,
            seed=seed,
        )
        if bad:
            values = [(*value[:-1], math.nan) for value in values]
        rows.extend((round_, preds.split, preds.client_id, preds.role, *value) for value in values)
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)


def with_means(frame: pd.DataFrame) -> pd.DataFrame:
    """Append the mean over clients (`mean`) and over clients of each role (`mean:<role>`).

    The per-client AUC intervals (`auc_lo` / `auc_hi`) get no mean rows: averaging two
    clients' bounds gives no interval of the mean (`metrics.NOT_AVERAGED`).
    """
    parts = [frame, metrics.mean_over_clients(frame, client="mean")]
    for role in sorted(r for r in frame["role"].unique() if r):
        part = metrics.mean_over_clients(frame[frame["role"] == role], client=f"mean:{role}")
        part["role"] = role
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def prediction_rows(round_: int, preds: Predictions | Sequence[Predictions], attributes: Sequence[str], *, id_key: bytes | None = None) -> pd.DataFrame:
    """`predictions.parquet` rows of one or many clients' predictions (one frame for all); with
    `id_key`, each sample id is replaced by its `pseudonym`. The task's columns follow the
    sample id: `label`, `score` (`score_<k>`) for classification, the per-sample Dice, IoU,
    hd95, CDR and areas for segmentation (`raysim.client.tasks.SEGMENTATION_COLUMNS`)."""
    many = [preds] if isinstance(preds, Predictions) else list(preds)
    if any(p.sample_ids is None for p in many):
        raise ValueError("predictions without sample ids: their evaluation was not one predictions.parquet keeps (RunRecorder.keeps)")
    n = sum(len(p.labels) for p in many)
    ids = np.concatenate([p.sample_ids.astype(str).astype(object) for p in many]) if many else np.array([], dtype=object)
    columns: dict[str, object] = {
        "round": np.full(n, round_, dtype=np.int64),
        "split": np.concatenate([np.full(len(p.labels), p.split, dtype=object) for p in many]) if many else np.array([], dtype=object),
        "client": np.concatenate([np.full(len(p.labels), p.client_id, dtype=object) for p in many]) if many else np.array([], dtype=object),
        "sample_id": ids if id_key is None else secrets.pseudonym(ids, id_key),
    }
    kinds = {p.task for p in many}
    if len(kinds) > 1:
        raise ValueError(f"predictions of several tasks in one frame: {sorted(kinds)}")
    columns.update(tasks.describe(many[0] if many else None).prediction_columns(many))
    for attr in attributes:
        columns[attr] = np.concatenate([p.attributes[attr].astype(np.int64) for p in many]) if many else np.array([], dtype=np.int64)
    return pd.DataFrame(columns)


# --- the run's Parquet outputs --------------------------------------------------------------


class RunRecorder:
    """Metric and prediction rows of a run, appended to `RUN_DIR/metrics.parquet/` and
    `RUN_DIR/predictions.parquet/` as one part per `add` and round (`part-r000003-k01.parquet`,
    written atomically): a round writes its own rows, never the run's so far. Part names are
    deterministic, so a replayed round writes the same names again.

    `predictions`: which evaluations keep predictions (`eval.predictions`: all, final or none);
    `final_round`: the run's last round; `id_key`: pseudonymise sample ids here (`id_key`; a
    run's recorder gets none: its client actors send pseudonyms already).
    """

    def __init__(self, run_dir: Path, *, predictions: str = "all", final_round: int | None = None, id_key: bytes | None = None) -> None:
        self.run_dir = run_dir
        self.keep_predictions = predictions
        self.final_round = final_round
        self.id_key = id_key
        self._frames: list[pd.DataFrame] = []  # metric rows, concatenated when read
        self._next: dict[tuple[str, int], int] = {}  # (output, round) -> its next part number
        self._started = False  # a fresh run clears what an earlier start left on its first write
        self._tb = None

    @classmethod
    def for_config(cls, run_dir: Path, cfg: ExperimentConfig) -> RunRecorder:
        """The recorder a run's `eval` section asks for; a ConfigError (before anything is
        written) when pseudonymisation is on without a usable key. The key is only checked here:
        the client actors read it and pseudonymise the ids before they leave (`raysim.client`)."""
        secrets.id_key(cfg.eval, run_dir)
        return cls(run_dir, predictions=cfg.eval.predictions, final_round=cfg.federation.rounds)

    @property
    def metrics(self) -> pd.DataFrame:
        """Every metric row so far, in the order `pd.read_parquet(RUN_DIR / "metrics.parquet")` gives."""
        if not self._frames:
            return pd.DataFrame(columns=METRIC_COLUMNS)
        if len(self._frames) > 1:
            self._frames = [pd.concat(self._frames, ignore_index=True)]
        return self._frames[0]

    def keeps(self, round_: int) -> bool:
        """Whether round `round_`'s evaluation is written to predictions.parquet (`eval.predictions`);
        the driver asks its client actors for sample ids and masks only then."""
        return self.keep_predictions == "all" or (self.keep_predictions == "final" and round_ == self.final_round)

    def prediction_frames(self, round_: int, preds: Sequence[Predictions], attributes: Sequence[str]) -> list[pd.DataFrame]:
        """The `predictions.parquet` rows of round `round_`'s evaluation that `eval.predictions`
        keeps (none, or only the final round's: []), ids pseudonymised when a key is set."""
        if not self.keeps(round_):
            return []
        return [prediction_rows(round_, preds, attributes, id_key=self.id_key)]

    def add(self, metric_frame: pd.DataFrame, prediction_frames: list[pd.DataFrame]) -> None:
        """Append one round's metric rows and prediction frames (each a part of its own)."""
        if len(metric_frame):
            frame = metric_frame.astype({"round": "int64", "value": "float64"}).reset_index(drop=True)
            self._write_part("metrics", frame)
            self._frames.append(frame)
            self._log_tensorboard(frame)
        for frame in prediction_frames:
            if len(frame):
                self._write_part("predictions", frame.reset_index(drop=True))

    def flush(self) -> None:
        """Parts are written as rows arrive; this flushes the TensorBoard events."""
        if self._tb is not None:
            self._tb.flush()

    def truncate(self, last_round: int) -> None:
        """Forget rows after `last_round` (resume and replay continue from that checkpoint): the
        parts of later rounds are deleted, so a replayed round writes them again."""
        self._started = True
        if self._frames:
            metrics_ = self.metrics
            self._frames = [metrics_[metrics_["round"] <= last_round].reset_index(drop=True)]
        for output in OUTPUTS:
            for round_, _, path in _parts(self.run_dir / f"{output}.parquet"):
                if round_ > last_round:
                    path.unlink()
        self._next = {key: n for key, n in self._next.items() if key[1] <= last_round}

    def load_existing(self) -> None:
        """Take over the parts a run directory holds (resume); a single-file output of an older
        raysim becomes parts first."""
        self._started = True
        for output in OUTPUTS:
            folder = self.run_dir / f"{output}.parquet"
            if folder.is_file():
                _split_into_parts(folder)
            for round_, k, _ in _parts(folder):
                self._next[(output, round_)] = max(self._next.get((output, round_), 0), k + 1)
        parts = _parts(self.run_dir / "metrics.parquet")
        self._frames = [pd.read_parquet(self.run_dir / "metrics.parquet")] if parts else []

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _write_part(self, output: str, frame: pd.DataFrame) -> None:
        if not self._started:  # a fresh run: nothing of an earlier attempt in the same directory stays
            self._started = True
            for name in OUTPUTS:
                _remove_output(self.run_dir / f"{name}.parquet")
        rounds = frame["round"].unique()
        if len(rounds) != 1:
            raise ValueError(f"{output}: one round per add, got rounds {sorted(rounds.tolist())}")
        round_ = int(rounds[0])
        k = self._next.get((output, round_), 0)
        self._next[(output, round_)] = k + 1
        folder = self.run_dir / f"{output}.parquet"
        folder.mkdir(parents=True, exist_ok=True)
        _write_parquet(frame, folder / _part_name(round_, k))

    def _log_tensorboard(self, frame: pd.DataFrame) -> None:
        from tensorboardX import SummaryWriter  # optional at import time: only the recorder needs it

        if self._tb is None:
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        for row in frame[frame["client"] == "mean"].itertuples():
            if isinstance(row.value, float) and math.isnan(row.value):
                continue
            tag = "/".join(p for p in (row.split, row.attribute, row.group, row.metric) if p)
            self._tb.add_scalar(tag, row.value, row.round)
        self._tb.flush()


def _part_name(round_: int, k: int) -> str:
    return f"part-r{round_:06d}-k{k:02d}.parquet"


def _parts(folder: Path) -> list[tuple[int, int, Path]]:
    """(round, number, path) of every part in an output folder, in name order; leftovers of an
    interrupted write (`.part-*.tmp`) are deleted."""
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        if path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)
        elif match := _PART.fullmatch(path.name):
            found.append((int(match.group(1)), int(match.group(2)), path))
    return found


def _remove_output(path: Path) -> None:
    if path.is_file():
        path.unlink()
    for _, _, part in _parts(path):
        part.unlink()


def _split_into_parts(path: Path) -> None:
    """An older run's single Parquet file -> a folder of the same name with one part per round."""
    frame = pd.read_parquet(path)
    staging = path.with_name(f".{path.name}.parts")
    staging.mkdir(exist_ok=True)
    for round_, rows in frame.groupby("round", sort=True):
        _write_parquet(rows.reset_index(drop=True), staging / _part_name(int(round_), 0))
    path.unlink()
    staging.rename(path)


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    """`frame` as `path`, atomically (a hidden `.tmp` first: Parquet readers and the run mirror skip it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    # Text columns as one Arrow type in every part, whatever pandas inferred for this one
    # (an all-empty column would otherwise be `null` here and `string` in the next part).
    # Bytes (predicted masks) stay binary.
    schema = pa.schema([pa.field(f.name, pa.binary() if _bytes(frame[f.name]) else pa.string()) if _text(frame[f.name]) else f for f in table.schema], metadata=table.schema.metadata)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        pq.write_table(table.cast(schema), f)
        f.flush()
        os.fsync(f.fileno())  # a checkpoint names the round done: its rows must be on disk first
    durable.replace_durably(tmp, path)


def _text(column: pd.Series) -> bool:
    return column.dtype == object or isinstance(column.dtype, pd.StringDtype)


def _bytes(column: pd.Series) -> bool:
    return column.dtype == object and len(column) > 0 and isinstance(column.iloc[0], bytes)


# --- console ------------------------------------------------------------------------------


def format_table(frame: pd.DataFrame, *, round_: int, split: str, attribute: str, group_names: Mapping[int, str], task: str = "classification") -> str:
    """Per client + mean, x100: AUC, ES-AUC, group AUCs, EOD, SPD (classification) or Dice disc,
    Dice cup, ES-Dice, CDR error, group Dice (segmentation: `raysim.client.tasks`); beyond
    `console.MAX_LISTED` clients the distribution over clients instead of a row each (the
    worst client by the first column)."""
    rows = frame[(frame["round"] == round_) & (frame["split"] == split)]
    columns = tasks.get(task).table_columns(attribute, group_names)
    roles = {r.client: r.role for r in rows.itertuples() if r.role and not r.client.startswith("mean")}
    if roles and task != "segmentation" and ("Acc", "", "", "acc") not in columns:  # e.g. FedHelp, whose headline is accuracy (Dice when segmenting)
        columns.insert(1, ("Acc", "", "", "acc"))
    clients = list(dict.fromkeys(rows["client"]))
    means = [c for c in clients if c.startswith("mean")]
    clients = [c for c in clients if not c.startswith("mean")]
    lookup = {(r.client, r.attribute, r.group, r.metric): r.value for r in rows.itertuples()}
    cells = {c: [lookup.get((c, attr, group, metric), float("nan")) for _, attr, group, metric in columns] for c in clients + means}
    title = f"{split} metrics after round {round_} (x100; attribute: {attribute})" if attribute else f"{split} metrics after round {round_} (x100)"
    if len(clients) > console.MAX_LISTED:  # 1,000 rows help no one: the spread, the means, the worst
        title = f"{title[:-1]}; {len(clients)} clients: min / median / max over clients)"
        cells = _spread_rows(cells, clients) | {c: cells[c] for c in means} | _worst_row(cells, clients, columns[0][0])
        labels = {c: c for c in cells}
    else:
        labels = {c: f"{c} ({roles[c]})" if c in roles else c for c in clients + means}
    return _table(title, columns, labels, cells)


def _spread_rows(cells: Mapping[str, list[float]], clients: Sequence[str]) -> dict[str, list[float]]:
    """Rows `min`, `median`, `max`: each column's distribution over the clients (NaN left out)."""
    values = np.array([cells[c] for c in clients], dtype=float)
    defined = ~np.isnan(values).all(axis=0)  # a column no client has stays "-", without a warning
    out = {}
    for name, reduce in (("min", np.nanmin), ("median", np.nanmedian), ("max", np.nanmax)):
        row = np.full(values.shape[1], np.nan)
        row[defined] = reduce(values[:, defined], axis=0)
        out[name] = row.tolist()
    return out


def _worst_row(cells: Mapping[str, list[float]], clients: Sequence[str], name: str = "AUC") -> dict[str, list[float]]:
    """The client with the lowest first column (AUC; the disc's Dice), labelled `worst <its header>: <client>`."""
    scored = [c for c in clients if not math.isnan(cells[c][0])]
    if not scored:
        return {}
    worst = min(scored, key=lambda c: (cells[c][0], c))
    return {f"worst {name}: {worst}": cells[worst]}


def _table(title: str, columns: Sequence[tuple[str, str, str, str]], labels: Mapping[str, str], cells: Mapping[str, list[float]]) -> str:
    width = max(10, *(len(label) for label in labels.values())) if labels else 10
    header = f"{'client':<{width}}" + "".join(f"{name:>{max(8, len(name) + 2)}}" for name, *_ in columns)
    lines = [title, header, "-" * len(header)]
    for key, label in labels.items():
        text = "".join(f"{'-' if math.isnan(v) else f'{100 * v:.1f}':>{max(8, len(name) + 2)}}" for (name, *_), v in zip(columns, cells[key], strict=True))
        lines.append(f"{label:<{width}}" + text)
    return "\n".join(lines)


class Progress:
    """One line per round with the elapsed time and an ETA from the mean round time."""

    def __init__(self, total_rounds: int, first_round: int, echo: console.Echo) -> None:
        self.total = total_rounds
        self.first = first_round
        self.echo = echo
        self.start = time.perf_counter()

    def round_done(self, round_: int, *, clients: int, failed: Sequence[str], train_loss: float) -> None:
        elapsed = time.perf_counter() - self.start
        done = round_ - self.first + 1
        eta = elapsed / done * (self.total - round_)
        failed_note = f" | failed: {console.first(list(failed))}" if failed else ""
        self.echo(
            f"round {round_:>3}/{self.total} | clients {clients} | train loss {train_loss:.4f} | "
            f"{elapsed / done:.1f} s/round | elapsed {console.clock(elapsed)} | ETA {console.clock(eta)}{failed_note}"
        )

