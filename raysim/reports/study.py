"""A Tune study's report: `python -m raysim.compare STUDY_DIR`, and STUDY_DIR/report.html at the end of a study.

A study directory (written by `raysim.tune`) holds trials.parquet / trials.csv (one row per
trial: its searched values, status, best validation objective and round, rounds done), best.yaml
(the best trial's complete config, its header naming the objective) and one Tune directory per
trial whose result.json / progress.csv has every reported round. The report shows the trials
table (with each trial's test metrics at its best round: AUC for a classification study; Dice and
ES-Dice for a segmentation one, `TEST_COLUMNS`), the objective against each searched parameter (log axis for a loguniform parameter, or,
without the study's search space, for a positive one spanning a factor of 10 or more), the ASHA
stopping picture (the objective over rounds per trial; a cross where a trial was stopped early)
and the best config. Plain pandas and matplotlib, no Ray.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raysim.outputs.runs import RunReadError
from raysim.reports import figures

TRIAL_FIELDS = {"trial_id", "status", "rounds_done", "stopped_early", "best_round", "objective", "final_objective"}
# The test metrics the trials table shows (at each trial's best round), per task (raysim.client.tasks).
TEST_COLUMNS = {
    "classification": {"test_auc": "test AUC at best"},
    "segmentation": {"test_dice": "test Dice at best", "test_es_dice": "test ES-Dice at best"},
    "joint": {"test_auc": "test AUC at best", "test_dice": "test Dice at best", "test_es_dice": "test ES-Dice at best"},
}


class StudyReadError(RunReadError):
    """A study directory that cannot be reported (the message names the file and what is wrong)."""


def _read(path: Path, reader: Callable[[Path], Any]) -> Any:
    """reader(path), any failure a StudyReadError naming the file."""
    try:
        return reader(path)
    except (OSError, ValueError, RecursionError, pd.errors.ParserError) as err:
        what = "not UTF-8 text" if isinstance(err, UnicodeDecodeError) else (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise StudyReadError(f"{path}: unreadable ({what})") from None


def _text(path: Path) -> str:
    return _read(path, lambda p: p.read_text(encoding="utf-8"))


def read_trials(study_dir: Path) -> pd.DataFrame:
    study_dir = Path(study_dir)
    if (study_dir / "trials.parquet").exists():
        trials, path = _read(study_dir / "trials.parquet", pd.read_parquet), study_dir / "trials.parquet"
    elif (study_dir / "trials.csv").exists():
        trials, path = _read(study_dir / "trials.csv", pd.read_csv), study_dir / "trials.csv"
    else:
        return pd.DataFrame(columns=["trial_id", "status"])
    if "trial_id" not in trials:
        raise StudyReadError(f"{path}: no trial_id column (not a raysim.tune trials table)")
    for column in ("objective", "final_objective", "best_round", "rounds_done"):
        if column in trials and pd.to_numeric(trials[column], errors="coerce").isna().gt(trials[column].isna()).any():
            raise StudyReadError(f"{path}: column {column} holds {trials[column].iloc[0]!r}..., expected numbers")
    return trials


def searched(trials: pd.DataFrame) -> list[str]:
    """The searched config keys: the trials table's columns that are neither bookkeeping nor metrics."""
    return [c for c in trials.columns if c not in TRIAL_FIELDS and not c.startswith(("val_", "test_", "final_"))]


def histories(study_dir: Path) -> dict[str, pd.DataFrame]:
    """trial_id -> its reported rounds (round, objective), from each trial's result.json, else progress.csv."""
    out: dict[str, pd.DataFrame] = {}
    for trial in sorted(p for p in Path(study_dir).iterdir() if p.is_dir()):
        frame = pd.DataFrame()
        if (trial / "result.json").is_file():
            rows = [_read(trial / "result.json", lambda _, line=line: json.loads(line)) for line in _text(trial / "result.json").splitlines() if line.strip()]
            if not all(isinstance(row, dict) for row in rows):
                raise StudyReadError(f"{trial / 'result.json'}: expected one JSON object per line")
            frame = pd.DataFrame(rows)
        if frame.empty and (trial / "progress.csv").is_file():
            frame = _read(trial / "progress.csv", pd.read_csv)
        if {"trial_id", "round", "objective"} <= set(frame.columns) and len(frame):
            curve = frame[["round", "objective"]].apply(pd.to_numeric, errors="coerce")
            if curve["round"].isna().any():
                raise StudyReadError(f"{trial}: a reported round that is not a number ({frame['round'][curve['round'].isna()].iloc[0]!r})")
            out[str(frame["trial_id"].iloc[0])] = curve.sort_values("round", ignore_index=True)
    return out


def study_task(trials: pd.DataFrame) -> str:
    """The study's task as its trials reported it (a segmentation trial reports `val_dice`, a
    joint one `val_dice` and `val_auc`); classification when no trial reported a round."""
    if "val_dice" not in trials:
        return "classification"
    return "joint" if "val_auc" in trials else "segmentation"


def objective_text(study_dir: Path) -> str:
    """The objective expression as best.yaml's header names it ("objective" when unknown)."""
    best = Path(study_dir) / "best.yaml"
    head = (_text(best).splitlines() or [""])[0] if best.is_file() else ""
    match = re.search(r"objective (.+?) = ", head)
    return match.group(1) if match else "objective"


def log_axis(values: pd.Series, spec: Mapping[str, Any] | None) -> bool:
    if spec is not None:
        return "loguniform" in spec
    numbers = pd.to_numeric(values, errors="coerce").dropna()
    return len(numbers) > 1 and bool((numbers > 0).all()) and numbers.max() / numbers.min() >= 10


def markdown(trials: pd.DataFrame, params: list[str], task: str | None = None) -> str:
    """The trials table (best first, as trials.parquet is sorted) in Markdown."""
    cells = _cells(trials, params, task or study_task(trials))
    lines = ["| " + " | ".join(cells.columns) + " |", "|" + "---|" * len(cells.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines)


def _cells(trials: pd.DataFrame, params: list[str], task: str) -> pd.DataFrame:
    def fmt(value: Any, spec: str = "g") -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return format(value, spec) if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) else str(value)

    out = pd.DataFrame({"trial": trials["trial_id"].astype(str), "status": trials["status"].astype(str)})
    for key in params:
        out[key] = [fmt(v, ".4g") for v in trials[key]]
    shown = [("objective", "objective (val)", ".4f"), ("best_round", "best round", "g"), ("rounds_done", "rounds reached", "g")]
    shown += [(key, name, ".4f") for key, name in TEST_COLUMNS.get(task, {}).items()]
    for key, name, spec in shown:
        out[name] = [fmt(v, spec) for v in trials[key]] if key in trials else "-"
    if "stopped_early" in trials:
        out["stopped early"] = ["-" if pd.isna(v) else ("yes" if v else "no") for v in trials["stopped_early"]]
    return out


def page(study_dir: Path, *, space: Mapping[str, Mapping[str, Any]] | None = None, task: str | None = None) -> tuple[str, str]:
    """(report HTML, trials table in Markdown) of the study in `study_dir`; `task` (what
    raysim.tune knows from the config) else the one the trials reported (`study_task`)."""
    study_dir = Path(study_dir)
    trials = read_trials(study_dir)
    task = task or study_task(trials)
    params = list(space) if space else searched(trials)
    objective = objective_text(study_dir)
    runs = histories(study_dir)
    table = markdown(trials, params, task)
    sections = [
        figures.Section("Trials", anchor="trials").add(
            figures.table(_cells(trials, params, task), "trials", f"{len(trials)} trial(s), best first; objective {objective} on validation, best over the reported rounds")
        )
    ]
    if params and "objective" in trials:
        sections.append(_per_parameter(trials, params, objective, space))
    if runs:
        sections.append(_stopping(trials, runs, objective))
    best = study_dir / "best.yaml"
    best_section = figures.Section("Best config", anchor="best")
    if best.is_file():
        best_section.text("best.yaml reruns the best trial: python -m raysim.run --config best.yaml").add(f"<pre>{html.escape(_text(best))}</pre>")
    else:
        best_section.text("no best.yaml: no trial reported a finite objective")
    sections.append(best_section)
    subtitle = f"{study_dir.name}: {len(trials)} trial(s) over {', '.join(params) or 'no searched key'}; objective {objective}"
    return figures.page(f"raysim study {study_dir.name}", subtitle, sections), table


def _per_parameter(trials: pd.DataFrame, params: list[str], objective: str, space: Mapping[str, Mapping[str, Any]] | None) -> figures.Section:
    section = figures.Section("Objective per searched parameter", anchor="parameters")
    fig, axes = figures.new_figure(max(6.4, min(4.2 * len(params), 13.0)), 3.6, ncols=len(params))
    axes = list(axes) if len(params) > 1 else [axes]
    scored = trials["objective"].astype(float)
    for ax, key in zip(axes, params):
        values = trials[key]
        numeric = pd.to_numeric(values, errors="coerce")
        if numeric.notna().all():
            x = numeric.to_numpy(dtype=float)
            if log_axis(values, (space or {}).get(key)):
                ax.set_xscale("log")
        else:  # a choice of strings (or lists): one position per value
            levels = list(dict.fromkeys(str(v) for v in values))
            x = np.array([levels.index(str(v)) for v in values], dtype=float)
            ax.set_xticks(range(len(levels)), levels)
        stopped = trials["stopped_early"].eq(True).to_numpy() if "stopped_early" in trials else np.zeros(len(trials), bool)
        ax.scatter(x[~stopped], scored[~stopped], color=figures.color(0), marker="o", label="ran every round")
        if stopped.any():
            ax.scatter(x[stopped], scored[stopped], color=figures.color(1), marker="x", label="stopped early")
        if scored.notna().any():
            best = int(np.flatnonzero(scored.notna().to_numpy())[0])  # trials.parquet is sorted best first
            ax.scatter([x[best]], [scored.iloc[best]], s=160, facecolors="none", edgecolors="black", label="best")
        ax.set_xlabel(key)
        ax.set_ylabel(f"best validation {objective}")
    figures.legend_outside(axes[-1])
    alt = f"The best validation objective ({objective}) of each trial against each searched parameter"
    return section.add(figures.embed(fig, "objective_per_parameter", alt))


def _stopping(trials: pd.DataFrame, runs: dict[str, pd.DataFrame], objective: str) -> figures.Section:
    fig, ax = figures.new_figure(7.5, 4.0)
    order = [t for t in trials["trial_id"].astype(str) if t in runs] + [t for t in runs if t not in set(trials["trial_id"].astype(str))]
    last_round = max(float(r["round"].max()) for r in runs.values())
    for i, trial in enumerate(order):
        curve = runs[trial]
        ax.plot(curve["round"], curve["objective"], marker=figures.marker(i), color=figures.color(i), linestyle=figures.linestyle(i), label=trial)
        if curve["round"].iloc[-1] < last_round:
            ax.scatter([curve["round"].iloc[-1]], [curve["objective"].iloc[-1]], marker="x", s=90, color="black", zorder=3)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(f"validation {objective}")
    if len(order) <= 16:
        figures.legend_outside(ax, title="trial")
    stopped = sum(1 for t in order if runs[t]["round"].iloc[-1] < last_round)
    alt = f"Validation objective over rounds per trial: {stopped} of {len(order)} trial(s) stopped before round {last_round:g} (black cross)"
    return figures.Section("Stopping (ASHA)", anchor="stopping").add(figures.embed(fig, "asha", alt))


def write(study_dir: Path, *, out: Path | None = None, space: Mapping[str, Mapping[str, Any]] | None = None, task: str | None = None) -> str:
    """Write STUDY_DIR/report.html (and OUT/compare.html); return the trials table in Markdown
    and the best trial's line (what the CLI prints)."""
    document, table = page(study_dir, space=space, task=task)
    figures.write_page(Path(study_dir) / "report.html", document)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        figures.write_page(Path(out) / "compare.html", document)
    best = Path(study_dir) / "best.yaml"
    if not best.is_file():
        return f"{table}\n\nno best.yaml: no trial reported a finite objective"
    head = (_text(best).splitlines() or [""])[0].lstrip("# ")
    return f"{table}\n\n{head}; rerun it: python -m raysim.run --config {best}"
