"""Run outputs: metrics/predictions Parquet (the public contract), TensorBoard, console tables."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from raysim import metrics
from raysim.types import Predictions

METRIC_COLUMNS = ["round", "split", "client", "role", "attribute", "group", "metric", "value"]
PREDICTION_COLUMNS = ["round", "split", "client", "sample_id", "label", "score"]

Echo = Callable[[str], None]


def metric_frame(round_: int, scored: Sequence[tuple[Predictions, int]], group_names: Mapping[str, Mapping[int, str]], attributes: Sequence[str], *, n_boot: int) -> pd.DataFrame:
    """Long-format metric rows of many (predictions, bootstrap seed) pairs, built as one frame
    (a frame per client and split cost ~3 ms each: seconds at 1,000 clients)."""
    rows: list[tuple[object, ...]] = []
    for preds, seed in scored:
        values = metrics.client_metrics(
            preds.labels,
            preds.scores,
            {a: preds.attributes[a] for a in attributes if a in preds.attributes},
            {a: group_names[a] for a in attributes},
            n_boot=n_boot,
            seed=seed,
        )
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


def prediction_rows(round_: int, preds: Predictions | Sequence[Predictions], attributes: Sequence[str]) -> pd.DataFrame:
    """`predictions.parquet` rows of one or many clients' predictions (one frame for all)."""
    many = [preds] if isinstance(preds, Predictions) else list(preds)
    n = sum(len(p.labels) for p in many)
    columns: dict[str, object] = {
        "round": np.full(n, round_, dtype=np.int64),
        "split": np.concatenate([np.full(len(p.labels), p.split, dtype=object) for p in many]) if many else np.array([], dtype=object),
        "client": np.concatenate([np.full(len(p.labels), p.client_id, dtype=object) for p in many]) if many else np.array([], dtype=object),
        "sample_id": np.concatenate([p.sample_ids.astype(str).astype(object) for p in many]) if many else np.array([], dtype=object),
        "label": np.concatenate([p.labels.astype(np.int64) for p in many]) if many else np.array([], dtype=np.int64),
    }
    scores = np.concatenate([p.scores for p in many]) if many else np.array([])
    if scores.ndim == 1:
        columns["score"] = scores
    else:
        columns.update({f"score_{k}": scores[:, k] for k in range(scores.shape[1])})
    for attr in attributes:
        columns[attr] = np.concatenate([p.attributes[attr].astype(np.int64) for p in many]) if many else np.array([], dtype=np.int64)
    return pd.DataFrame(columns)


class RunRecorder:
    """Accumulates metric and prediction rows and rewrites the Parquet files atomically."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.metrics = pd.DataFrame(columns=METRIC_COLUMNS)
        self.predictions: list[pd.DataFrame] = []
        self._tb = None

    def add(self, metric_frame: pd.DataFrame, prediction_frames: list[pd.DataFrame]) -> None:
        self.metrics = pd.concat([self.metrics, metric_frame], ignore_index=True) if len(self.metrics) else metric_frame
        self.predictions.extend(prediction_frames)
        self._log_tensorboard(metric_frame)
        self.flush()

    def flush(self) -> None:
        _write_parquet(self.metrics.astype({"round": "int64", "value": "float64"}), self.run_dir / "metrics.parquet")
        if self.predictions:
            _write_parquet(pd.concat(self.predictions, ignore_index=True), self.run_dir / "predictions.parquet")

    def truncate(self, last_round: int) -> None:
        """Forget rows after `last_round` (resume continues from that checkpoint)."""
        self.metrics = self.metrics[self.metrics["round"] <= last_round].reset_index(drop=True)
        self.predictions = [p[p["round"] <= last_round] for p in self.predictions]
        self.flush()

    def load_existing(self) -> None:
        if (self.run_dir / "metrics.parquet").exists():
            self.metrics = pd.read_parquet(self.run_dir / "metrics.parquet")
        if (self.run_dir / "predictions.parquet").exists():
            self.predictions = [pd.read_parquet(self.run_dir / "predictions.parquet")]

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

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


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".parquet.tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)


# --- console ------------------------------------------------------------------------------


def format_table(frame: pd.DataFrame, *, round_: int, split: str, attribute: str, group_names: Mapping[int, str]) -> str:
    """Per client + mean: AUC, ES-AUC, group AUCs, EOD, SPD, all x100."""
    rows = frame[(frame["round"] == round_) & (frame["split"] == split)]
    if attribute:
        columns = [("AUC", "", "", "auc"), ("ES-AUC", attribute, "", "es_auc")]
        columns += [(f"AUC {name}", attribute, name, "auc") for name in group_names.values()]
        columns += [("EOD", attribute, "", "eod"), ("SPD", attribute, "", "spd")]
    else:  # a source without sensitive attributes
        columns = [("AUC", "", "", "auc"), ("Acc", "", "", "acc"), ("BAcc", "", "", "bacc")]
    roles = {r.client: r.role for r in rows.itertuples() if r.role and not r.client.startswith("mean")}
    if roles and ("Acc", "", "", "acc") not in columns:  # e.g. FedHelp, whose headline is accuracy
        columns.insert(1, ("Acc", "", "", "acc"))
    clients = list(dict.fromkeys(rows["client"]))
    clients = [c for c in clients if not c.startswith("mean")] + [c for c in clients if c.startswith("mean")]
    lookup = {(r.client, r.attribute, r.group, r.metric): r.value for r in rows.itertuples()}
    labels = {c: f"{c} ({roles[c]})" if c in roles else c for c in clients}
    width = max(10, *(len(label) for label in labels.values())) if clients else 10
    header = f"{'client':<{width}}" + "".join(f"{title:>{max(8, len(title) + 2)}}" for title, *_ in columns)
    title = f"{split} metrics after round {round_} (x100; attribute: {attribute})" if attribute else f"{split} metrics after round {round_} (x100)"
    lines = [title, header, "-" * len(header)]
    for client in clients:
        cells = []
        for title, attr, group, metric in columns:
            value = lookup.get((client, attr, group, metric), float("nan"))
            cells.append(f"{'-' if math.isnan(value) else f'{100 * value:.1f}':>{max(8, len(title) + 2)}}")
        lines.append(f"{labels[client]:<{width}}" + "".join(cells))
    return "\n".join(lines)


class Progress:
    """One line per round with the elapsed time and an ETA from the mean round time."""

    def __init__(self, total_rounds: int, first_round: int, echo: Echo) -> None:
        self.total = total_rounds
        self.first = first_round
        self.echo = echo
        self.start = time.perf_counter()

    def round_done(self, round_: int, *, clients: int, failed: Sequence[str], train_loss: float) -> None:
        elapsed = time.perf_counter() - self.start
        done = round_ - self.first + 1
        eta = elapsed / done * (self.total - round_)
        failed_note = f" | failed: {', '.join(failed)}" if failed else ""
        self.echo(
            f"round {round_:>3}/{self.total} | clients {clients} | train loss {train_loss:.4f} | "
            f"{elapsed / done:.1f} s/round | elapsed {_clock(elapsed)} | ETA {_clock(eta)}{failed_note}"
        )


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
