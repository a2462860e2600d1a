"""Comparisons (`python -m raysim.compare`): runs grouped by method, seeds pooled, one table and the plots that compare them.

    python -m raysim.compare benchmark-runs/methods                      # every run under a directory
    python -m raysim.compare runs/a runs/b --by algorithm.name federation.local_epochs --out cmp/
    python -m raysim.compare studies/lr                                   # a Tune study: its report

Inputs are run directories (config.yaml + metrics.parquet), directories holding run directories
(searched recursively, in natural order), or one Tune study directory (trials.parquet /
best.yaml; see `raysim.reports.study`). Runs are grouped by the `--by` config keys: `algorithm`
(the default) is the whole algorithm section, labelled `name+key=value...` as the benchmarks
name ablations (`fairlora+ema=0`); any other key is a dotted path. Each run is reported at
`runs.select_round`'s round (best mean validation AUC), and its test metrics there are pooled
over seeds: mean, sample standard deviation (ddof = 1) and a 95 % Student-t interval of the mean.

Runs are pooled only when their data fingerprint (provenance.json `data`, less its `root`) and
their protocol agree. The protocol is the resolved config less `seed`, the `--by` keys,
`resources.*`, `eval.predictions` and `report.*` (none of which changes a number), and less
`data.root` when both runs carry a data fingerprint (it says where the data is, the fingerprint
says what). Anything else that differs is refused, naming the key (exit 2).

The Markdown table goes to stdout, ready for RESULTS.md; `--out DIR` also writes table.md,
table.csv (per group: mean, std, ci_lo, ci_hi, n of each metric, in raw units: AUC in [0, 1],
MB in 10^6 bytes), per_run.csv (one row per run), clients.csv and compare.html (the
accuracy-fairness scatter with its Pareto front, per-group AUC bars, the per-client view).
This module is the data model (finding, checking and pooling runs: the `Comparison`); the
rendering, compare.html and the files `--out` writes, is `compare_plots`, which imports this
one and never the other way round. Plain pandas, no Ray.

Segmentation runs (`raysim.outputs.runs.Run.task`) are compared on Dice (`raysim.metrics.segmentation`' names),
selected by the best mean validation Dice D = (Dice disc + Dice cup) / 2: Dice disc, Dice cup and
Dice rim (the disc without the cup, FairSeg's code -1: rim and cup are the pair FairSeg reports;
each with its 95 % interval; the rim only for runs that wrote its rows), D, ES-Dice (and ES-Dice rim), the Dice per group (D of the group: the mean of its
disc and cup Dice, the quantity ES-Dice scales, so one column per group), CDR error, and
FL-MedSegBench's client fairness: the worst client's D and the population std of D over the
run's clients (`runs.client_spread`), each pooled over seeds like any other column. compare.html
plots Dice against ES-Dice and against the worst client's Dice (Pareto fronts), D per group and
D per client against the baseline. A segmentation run never pools with a classification run.

Joint runs (segmentation + grade, `model.name=joint:*`) are selected by the mean of validation
AUC and D and get both halves: the grading columns (AUC, ES-AUC, AUC per group, EOD, SPD), then
Dice disc, Dice cup, D, ES-Dice, CDR error and the segmentation client fairness (worst client's
D, std of D over clients); groups and clients are shown by their test AUC, and compare.html
adds the Dice trade-off plots beside the AUC ones.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from raysim import cli
from raysim.outputs.resume_check import ADDED_KEYS
from raysim.outputs.runs import MEAN, Run, RunReadError, client_spread, clients, is_run_dir, natural_key, read_run

EXIT_BAD_INPUT = cli.EXIT_BAD_INPUT
DEFAULT_BY = ("algorithm",)
NOT_PROTOCOL = ("seed", "resources", "eval.predictions", "report")  # keys (and sections) that change no reported number
ABSENT = "absent"
MANY_CLIENTS = 30  # above this, the per-client view shows distributions instead of one bar per client


class CompareError(ValueError):
    """Runs that cannot be compared (the message is one line naming the runs and the difference)."""


# --- finding and labelling runs -------------------------------------------------------------


def is_study_dir(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / "trials.parquet").exists() or (path / "best.yaml").is_file())


def find_runs(paths: Iterable[Path | str]) -> list[Path]:
    """Every run directory named or found (recursively, natural order) under `paths`; a
    CompareError for a path that is missing or holds no run."""
    found: list[Path] = []
    for given in paths:
        path = Path(given).expanduser()
        if is_run_dir(path):
            found.append(path.resolve())
            continue
        if not path.is_dir():
            raise CompareError(f"{path}: {'not a directory' if path.exists() else 'no such directory'} (expected a run directory, a directory holding runs, or a Tune study directory)")
        hits = _walk(path.resolve())
        if not hits:
            raise CompareError(f"no run found under {path} (a run directory holds config.yaml and metrics.parquet)")
        found += hits
    return list(dict.fromkeys(found))


def _walk(root: Path) -> list[Path]:
    runs = []
    for dirpath, dirnames, _ in os.walk(root):
        if is_run_dir(Path(dirpath)):
            runs.append(Path(dirpath))
            dirnames.clear()  # a run's own subdirectories (checkpoints) are not runs
        else:
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return sorted(runs, key=lambda p: natural_key(str(p.relative_to(root))))


def text(value: Any) -> str:
    """A config value as the command line would spell it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return str(value)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values (`{"federation": {"rounds": 6}}` -> `{"federation.rounds": 6}`)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def label(run: Run, key: str, name: str) -> str:
    """The run's value of one `--by` key; `algorithm` is the whole section (`fairlora+ema=0`)."""
    if key == "algorithm":
        section = dict(run.config.get("algorithm") or {})
        return str(section.pop("name", "?")) + "".join(f"+{k}={text(v)}" for k, v in section.items())
    flat = flatten(run.config)
    if key in flat:
        return text(flat[key])
    below = {k: v for k, v in flat.items() if k.startswith(f"{key}.")}
    if below:
        return ",".join(f"{k[len(key) + 1 :]}={text(v)}" for k, v in below.items())
    raise CompareError(f"--by {key}: no such config key in {name}")


def header(key: str) -> str:
    return "method" if key == "algorithm" else key


def protocol(run: Run, by: Sequence[str], *, skip_root: bool) -> dict[str, Any]:
    """The resolved config less the keys that may differ between pooled runs (see the module doc)."""
    skipped = (*NOT_PROTOCOL, *by, *(("data.root",) if skip_root else ()))
    # A key added after a run was made (model.prompt, system.*) is the value that run used: a
    # config.yaml written before it pools with one at its default (resume_check.ADDED_KEYS).
    flat = {**ADDED_KEYS, **flatten(run.config)}
    # A key set to null is a key left at its null default, as in a config.yaml written before the key existed (eval.holdout_site).
    return {k: v for k, v in flat.items() if v is not None and not any(k == s or k.startswith(f"{s}.") for s in skipped)}


def fingerprint(run: Run) -> dict[str, Any]:
    """What data the run read (provenance.json `data`), not where it lay (`root`)."""
    data = run.provenance.get("data")
    return {k: v for k, v in flatten(data).items() if k != "root"} if isinstance(data, dict) else {}


def check_poolable(runs: Sequence[Run], names: Sequence[str], by: Sequence[str]) -> None:
    """A CompareError naming the first key whose value differs from the first run's."""
    first, first_name = runs[0], names[0]
    for run, name in zip(runs[1:], names[1:]):
        if run.task != first.task:  # before the protocol: model.name would differ too, less clearly
            raise CompareError(f"cannot pool runs: {first_name} is a {first.task} run but {name} is a {run.task} run (AUC and Dice do not compare: give each task's runs on their own)")
        mine, theirs = fingerprint(first), fingerprint(run)
        both = bool(mine) and bool(theirs)
        if both:
            _same(mine, theirs, first_name, name, "data fingerprint ")
        _same(protocol(first, by, skip_root=both), protocol(run, by, skip_root=both), first_name, name)
        if run.attribute != first.attribute:
            raise CompareError(f"cannot pool runs: the target attribute is {first.attribute or 'none'} in {first_name} but {run.attribute or 'none'} in {name}")


def _same(a: dict[str, Any], b: dict[str, Any], name_a: str, name_b: str, what: str = "") -> None:
    for key in dict.fromkeys([*a, *b]):
        left, right = a.get(key, ABSENT), b.get(key, ABSENT)
        if left != right and not (_is_nan(left) and _is_nan(right)):
            left_text, right_text = (ABSENT if v is ABSENT else text(v) for v in (left, right))
            raise CompareError(f"cannot pool runs: {what}{key} is {left_text} in {name_a} but {right_text} in {name_b}")


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def display_names(paths: Sequence[Path]) -> list[str]:
    """Each run's path relative to what all share (just the directory name when they are siblings)."""
    if len(paths) == 1:
        return [paths[0].name]
    common = Path(os.path.commonpath([str(p) for p in paths]))
    return [str(p.relative_to(common)) or p.name for p in paths]


# --- one run at its selected round ----------------------------------------------------------


def run_row(run: Run, attribute: str) -> dict[str, Any]:
    """The run's test metrics at its selected round (NaN where absent): AUC, accuracy, ES-AUC,
    EOD, SPD and AUC per group of `attribute`, MB up per client per round, the last ε spent,
    and each client's test AUC (`client:<id>`; accuracy when the run has no AUC)."""
    if run.task == "segmentation":
        return segmentation_row(run, attribute)
    selection, test, mean, at = _selected_test(run)
    row: dict[str, Any] = {"seed": run.seed, "round": selection.round, "selected_by": selection.metric, "auc": at("auc"), "acc": at("acc")}
    if attribute:
        row |= {"es_auc": at("es_auc", attribute), "eod": at("eod", attribute), "spd": at("spd", attribute)}
        groups = mean[(mean["attribute"] == attribute) & (mean["metric"] == "auc") & (mean["group"] != "")]
        row |= {f"auc:{g}": float(v) for g, v in zip(groups["group"], groups["value"])}
    real = clients(run.metrics)
    if run.task == "joint":  # its segmentation half beside the grading one
        row |= _dice_fields(test, at, attribute, real)[0]
    row |= _traffic_and_privacy(run.metrics, real)
    shown = "auc" if selection.metric == "auc_dice" else selection.metric  # a joint run's clients by their AUC
    per_client = test[(test["metric"] == shown) & (test["attribute"] == "") & (test["group"] == "") & test["client"].isin(real)]
    row |= {f"client:{c}": float(v) for c, v in zip(per_client["client"], per_client["value"])}
    return row


def segmentation_row(run: Run, attribute: str) -> dict[str, Any]:
    """`run_row` of a segmentation run: test Dice disc / cup, D (`dice`), CDR error, ES-Dice,
    the Dice gap and D per group of `attribute` (`dice:<group>`), the worst client's D and the
    std of D over clients, MB up, ε, and each client's test D (`client:<id>`)."""
    selection, test, mean, at = _selected_test(run)
    real = clients(run.metrics)
    dice, per_client = _dice_fields(test, at, attribute, real)
    row: dict[str, Any] = {"seed": run.seed, "round": selection.round, "selected_by": selection.metric} | dice
    if attribute:
        groups = mean[(mean["attribute"] == attribute) & (mean["group"] != "") & mean["metric"].isin(["dice_disc", "dice_cup"])]
        per_group = groups.pivot_table(index="group", columns="metric", values="value", aggfunc="first", sort=False)
        row |= {f"dice:{g}": float((v["dice_disc"] + v["dice_cup"]) / 2) for g, v in per_group.iterrows()}
    row |= _traffic_and_privacy(run.metrics, real)
    row |= {f"client:{c}": float(v) for c, v in per_client.reindex(sorted(per_client.index, key=natural_key)).items()}
    return row


def _dice_fields(test: pd.DataFrame, at: Callable[..., float], attribute: str, real: Sequence[str]) -> tuple[dict[str, Any], pd.Series]:
    """The Dice half of a segmentation or joint run's row (Dice disc / cup, D, CDR error, ES-Dice
    and the Dice gap with a target attribute, the worst client's D and the std of D over
    clients), and D per client."""
    row: dict[str, Any] = {"dice_disc": at("dice_disc"), "dice_cup": at("dice_cup"), "dice_rim": at("dice_rim")}  # dice_rim: NaN in runs before the rim rows
    row |= {"dice": (row["dice_disc"] + row["dice_cup"]) / 2, "cdr_error": at("cdr_error")}
    if attribute:
        row |= {"es_dice": at("es_dice", attribute), "dice_gap": at("dice_gap", attribute), "es_dice_rim": at("es_dice_rim", attribute), "dice_rim_gap": at("dice_rim_gap", attribute)}
    own = test[(test["attribute"] == "") & (test["group"] == "") & test["client"].isin(real) & test["metric"].isin(["dice_disc", "dice_cup"])]
    per_client = own.pivot_table(index="client", columns="metric", values="value", aggfunc="first").reindex(columns=["dice_disc", "dice_cup"]).mean(axis=1, skipna=False)
    spread = client_spread(per_client)
    return row | {"worst_dice": spread.min, "worst_client": spread.worst, "client_std": spread.std}, per_client


def _selected_test(run: Run) -> tuple[Any, pd.DataFrame, pd.DataFrame, Callable[..., float]]:
    """The run's selection, its test rows at that round, their mean-over-clients rows, and a
    lookup `at(metric, attribute="", group="")` of one mean value (NaN when absent)."""
    m = run.metrics
    try:
        selection = run.selection()
    except RunReadError as err:
        raise RunReadError(f"{run.path}: {err}") from None
    test = m[(m["round"] == selection.round) & (m["split"] == "test")]
    mean = test[test["client"] == MEAN]

    def at(metric: str, attr: str = "", group: str = "") -> float:
        hit = mean[(mean["metric"] == metric) & (mean["attribute"] == attr) & (mean["group"] == group)]["value"]
        return float(hit.iloc[0]) if len(hit) else math.nan

    return selection, test, mean, at


def _traffic_and_privacy(m: pd.DataFrame, real: Sequence[str]) -> dict[str, float]:
    """MB up per client per round (the mean over a round's clients, then over rounds) and the
    whole run's ε spent (its last `epsilon` row; NaN for a non-private method)."""
    traffic = m[(m["split"] == "train") & (m["metric"] == "bytes_up") & m["client"].isin(real)]
    spent = m[(m["client"] == "server") & (m["metric"] == "epsilon")].sort_values("round")["value"]
    return {
        "mb_up": float(traffic.groupby("round")["value"].mean().mean()) / 1e6 if len(traffic) else math.nan,
        "epsilon": float(spent.iloc[-1]) if len(spent) else math.nan,
    }


# --- pooling --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """Seeds pooled: mean, sample std (ddof = 1), the 95 % t interval of the mean, and n (non-NaN values)."""

    mean: float
    std: float
    ci_lo: float
    ci_hi: float
    n: int


def pooled(values: Iterable[float], level: float = 0.95) -> Stats:
    x = np.asarray(list(values), dtype=float)
    x = x[~np.isnan(x)]
    n = len(x)
    if n == 0:
        return Stats(math.nan, math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return Stats(mean, math.nan, math.nan, math.nan, 1)
    from scipy import stats

    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return Stats(mean, std, mean - half, mean + half, n)


@dataclass(frozen=True)
class Column:
    """One column of a Markdown table: a per-run field, its header, and how a group's values read."""

    key: str
    header: str
    cell: Callable[[pd.Series], str]
    interval: bool = False  # a pooled value that has a 95 % interval (compare.html shows it beside the cell)


def pct_cell(values: pd.Series) -> str:
    """`mean ± std` x100 with one decimal; `(n=k)` when some seeds lack the value."""
    s = pooled(values)
    if s.n == 0:
        return "-"
    out = f"{100 * s.mean:.1f}" + (f" ± {100 * s.std:.1f}" if s.n > 1 else "")
    return out + (f" (n={s.n})" if s.n < len(values) else "")


def ci_cell(values: pd.Series) -> str:
    s = pooled(values)
    return f"[{100 * s.ci_lo:.1f}, {100 * s.ci_hi:.1f}]" if s.n > 1 else "-"


def mean_cell(digits: int) -> Callable[[pd.Series], str]:
    def cell(values: pd.Series) -> str:
        s = pooled(values)
        return f"{s.mean:.{digits}f}" if s.n else "-"

    return cell


def rounds_cell(values: pd.Series) -> str:
    return "/".join(str(int(r)) for r in values)


def max_cell(values: pd.Series) -> str:
    return f"{values.max():.2f}" if values.notna().any() else ""


def markdown(per_run: pd.DataFrame, labels: Sequence[str], columns: Sequence[Column], headers: Sequence[str] | None = None) -> str:
    """A Markdown table, one row per group of `labels` (in order of appearance): the labels, n
    (runs pooled) and each column's cell over the group's runs."""
    names = [*(headers or labels), "n", *(c.header for c in columns)]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for keys, group in per_run.groupby(list(labels), sort=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        lines.append("| " + " | ".join([*(str(k) for k in keys), str(len(group)), *(c.cell(group[c.key]) for c in columns)]) + " |")
    return "\n".join(lines)


# --- the comparison -------------------------------------------------------------------------


@dataclass
class Comparison:
    """Runs grouped by the `--by` keys (the baseline group first), one row per run."""

    by: tuple[str, ...]
    attribute: str
    groups: list[str]  # the attribute's groups, in order of appearance
    clients: list[str]
    per_run: pd.DataFrame  # label columns (one per --by key) + "label", run, path, seed, round, metrics, client:<id>
    baseline: str
    task: str = "classification"  # every run's `Run.task` (never mixed)

    @property
    def group_prefix(self) -> str:
        """The per-group columns of `per_run`: `auc:<group>`, or `dice:<group>` (D of the group)."""
        return "dice" if self.task == "segmentation" else "auc"

    @property
    def score(self) -> str:
        """The per-client metric and what the plots call it."""
        return "test Dice" if self.task == "segmentation" else "test AUC"

    @property
    def title(self) -> str:
        """What a group is called: "method" for the algorithm section, else the --by keys."""
        return ", ".join(header(k) for k in self.by)

    @property
    def labels(self) -> list[str]:
        return list(dict.fromkeys(self.per_run["label"]))

    @property
    def has_rim(self) -> bool:
        """Whether any run wrote the rim's rows (runs before issue 25 did not)."""
        return "dice_rim" in self.per_run and bool(self.per_run["dice_rim"].notna().any())

    def metric_keys(self) -> list[str]:
        if self.task == "segmentation":
            fair = ["es_dice", "es_dice_rim", *(f"dice:{g}" for g in self.groups), "dice_gap", "dice_rim_gap"] if self.attribute else []
            return ["dice_disc", "dice_cup", "dice_rim", "dice", *fair, "cdr_error", "worst_dice", "client_std", "mb_up", "epsilon", "round"]
        fair = ["es_auc", *(f"auc:{g}" for g in self.groups), "eod", "spd"] if self.attribute else []
        dice = ["dice_disc", "dice_cup", "dice", *(["es_dice", "dice_gap"] if self.attribute else []), "cdr_error", "worst_dice", "client_std"]
        return ["auc", "acc", *fair, *(dice if self.task == "joint" else []), "mb_up", "epsilon", "round"]

    def columns(self, *, ci: bool = True) -> list[Column]:
        """The table's columns: AUC (and its CI), ES-AUC (and its CI), AUC per group, EOD, SPD
        with a target attribute, accuracy without; MB up; the selected rounds; ε when spent.
        Segmentation: Dice disc and Dice cup (each with its CI), D, ES-Dice and D per group with a
        target attribute, CDR error, the worst client's D and the std over clients, then as above."""
        if self.task == "segmentation":
            return self._segmentation_columns(ci=ci)
        cols = [Column("auc", "AUC", pct_cell, True)] + ([Column("auc", "AUC 95 % CI", ci_cell)] if ci else [])
        if self.attribute:
            cols += [Column("es_auc", "ES-AUC", pct_cell, True)] + ([Column("es_auc", "ES-AUC 95 % CI", ci_cell)] if ci else [])
            cols += [Column(f"auc:{g}", f"AUC {g}", pct_cell, True) for g in self.groups]
            cols += [Column("eod", "EOD", pct_cell, True), Column("spd", "SPD", pct_cell, True)]
        else:
            cols += [Column("acc", "Acc", pct_cell, True)]
        if self.task == "joint":  # the segmentation half, without per-group Dice or intervals (table.csv has them)
            cols += [Column(k, h, pct_cell, True) for k, h in (("dice_disc", "Dice disc"), ("dice_cup", "Dice cup"), ("dice", "Dice"))]
            cols += [Column("es_dice", "ES-Dice", pct_cell, True)] if self.attribute else []
            cols += self._client_fairness_columns()
        return cols + self._tail_columns()

    def _client_fairness_columns(self) -> list[Column]:
        return [Column("cdr_error", "CDR error", pct_cell, True), Column("worst_dice", "worst client Dice", pct_cell, True), Column("client_std", "client std", pct_cell, True)]

    def _tail_columns(self) -> list[Column]:
        cols = [Column("mb_up", "MB up / client / round", mean_cell(3)), Column("round", "round", rounds_cell)]
        if self.per_run["epsilon"].notna().any():
            cols.append(Column("epsilon", "ε spent", max_cell))
        return cols

    def _segmentation_columns(self, *, ci: bool) -> list[Column]:
        cols: list[Column] = []
        for part in ("disc", "cup", "rim") if self.has_rim else ("disc", "cup"):
            cols += [Column(f"dice_{part}", f"Dice {part}", pct_cell, True)] + ([Column(f"dice_{part}", f"Dice {part} 95 % CI", ci_cell)] if ci else [])
        cols.append(Column("dice", "Dice", pct_cell, True))
        if self.attribute:
            cols += [Column("es_dice", "ES-Dice", pct_cell, True)] + ([Column("es_dice_rim", "ES-Dice rim", pct_cell, True)] if self.has_rim else []) + [Column(f"dice:{g}", f"Dice {g}", pct_cell, True) for g in self.groups]
        return cols + self._client_fairness_columns() + self._tail_columns()

    def footnote(self) -> str:
        rule = {"segmentation": "the best mean validation Dice", "joint": "the best mean of validation AUC and Dice"}.get(self.task, "the best mean validation AUC")
        parts = [
            f"Test metrics ×100 at each run's selected round ({rule}, the earliest on a tie; `round` lists it per seed); "
            "mean ± sample std (ddof = 1) over the n seeds; 95 % CI: Student-t interval of the mean (n − 1 degrees of freedom)."
        ]
        if self.task != "segmentation" and self.attribute:
            parts.append(f"Target attribute {self.attribute}; EOD and SPD: lower is fairer.")
        if self.task != "classification":
            parts.append(self._dice_footnote())
        if self.task == "joint":
            parts.append("Groups and clients (compare.html, clients.csv): their test AUC.")
        spent = " ε spent: the last round's, the largest over seeds." if self.per_run["epsilon"].notna().any() else ""
        return " ".join(parts) + f" MB up: 10^6 bytes sent per client per round, mean over clients and rounds.{spent}"

    def _dice_footnote(self) -> str:
        per_group = "; Dice <group>: the group's Dice (the mean of its disc and cup Dice)" if self.task == "segmentation" else ""
        target = f" ES-Dice: Dice equity-scaled over the {self.attribute} groups{per_group}." if self.attribute else ""
        rim = " Dice rim: the disc without the cup (FairSeg's rim, which FairSeg reports beside the cup); ES-Dice rim: its equity-scaled form." if self.task == "segmentation" and self.has_rim else ""
        return (
            f"Dice: the mean of the disc and cup Dice.{rim}{target} CDR error: |vertical cup-to-disc ratio predicted − true| of the largest connected components, lower is better. "
            "Worst client Dice: the lowest client Dice in the run; client std: the population std of the clients' Dice (FL-MedSegBench's client fairness; lower is more even)."
        )

    def markdown(self) -> str:
        """The table and its footnote: what stdout and table.md hold, and what RESULTS.md gets."""
        table = markdown(self.per_run, list(self.by), self.columns(), [header(k) for k in self.by])
        return f"{table}\n\n{self.footnote()}"

    def pooled(self) -> pd.DataFrame:
        """table.csv: one row per group; mean, std, ci_lo, ci_hi and n of every metric (raw units)."""
        rows = []
        for _, group in self.per_run.groupby("label", sort=False):
            row: dict[str, Any] = {k: group[k].iloc[0] for k in self.by} | {"runs": len(group)}
            for key in self.metric_keys():
                s = pooled(group[key])
                row |= {f"{key}_mean": s.mean, f"{key}_std": s.std, f"{key}_ci_lo": s.ci_lo, f"{key}_ci_hi": s.ci_hi, f"{key}_n": s.n}
            rows.append(row)
        return pd.DataFrame(rows)

    def means(self, key: str) -> pd.Series:
        return self.per_run.groupby("label", sort=False)[key].mean()

    def stds(self, key: str) -> pd.Series:
        return self.per_run.groupby("label", sort=False)[key].std(ddof=1)

    def client_table(self) -> pd.DataFrame:
        """Test AUC (segmentation: D) per client (columns) and group (rows), mean over seeds."""
        cols = [f"client:{c}" for c in self.clients]
        table = self.per_run.groupby("label", sort=False)[cols].mean()
        table.columns = self.clients
        return table

    def client_deltas(self) -> pd.DataFrame:
        """Each group's per-client test AUC minus the baseline's (means over seeds); baseline row left out."""
        table = self.client_table()
        return table.drop(index=self.baseline) - table.loc[self.baseline]


def pareto_front(points: pd.DataFrame, x: str, y: str, *, higher_y: bool = True) -> list[str]:
    """The index labels of the points no other point dominates (higher `x`, and higher `y` or,
    with higher_y False, lower `y`; at least as good on both and better on one). NaN points are out."""
    pts = points[[x, y]].dropna().astype(float)
    sign = 1.0 if higher_y else -1.0
    front = []
    for name, (a, b) in pts.iterrows():
        dominated = any(a2 >= a and sign * b2 >= sign * b and (a2 > a or sign * b2 > sign * b) for other, (a2, b2) in pts.iterrows() if other != name)
        if not dominated:
            front.append(str(name))
    return front


def compare(paths: Iterable[Path | str], by: Sequence[str] = DEFAULT_BY, baseline: str | None = None) -> Comparison:
    """Read, check and tabulate the runs under `paths` (see the module docstring)."""
    by = tuple(by) or DEFAULT_BY
    dirs = find_runs(paths)
    if not dirs:
        raise CompareError("no run given")
    names = display_names(dirs)
    runs = [read_run(d) for d in dirs]
    labels = [{k: label(run, k, name) for k in by} for run, name in zip(runs, names)]
    check_poolable(runs, names, by)
    attribute, task = runs[0].attribute, runs[0].task
    rows = []
    for run, name, keys in zip(runs, names, labels):
        rows.append(keys | {"label": ", ".join(keys.values()), "run": name, "path": str(run.path)} | run_row(run, attribute))
    per_run = pd.DataFrame(rows)
    graded = ("es_auc", "eod", "spd") if task != "segmentation" else ()
    for key in (*graded, *(("es_dice", "dice_gap") if task != "classification" else ()), "epsilon"):
        if key not in per_run:
            per_run[key] = math.nan
    duplicate = per_run[per_run.duplicated(["label", "seed"], keep=False)]
    if len(duplicate):
        a, b = duplicate["run"].iloc[:2]
        raise CompareError(f"cannot pool runs: {a} and {b} are both seed {duplicate['seed'].iloc[0]} of {duplicate['label'].iloc[0]}")
    order = list(dict.fromkeys(per_run["label"]))
    if baseline is not None and baseline not in order:
        raise CompareError(f"--baseline {baseline}: no such group; the groups are {', '.join(order)}")
    base = baseline or ("fedavg" if "fedavg" in order else order[0])
    rank = {name: i for i, name in enumerate([base, *(o for o in order if o != base)])}
    per_run = per_run.sort_values(["label", "seed"], key=lambda c: c.map(rank) if c.name == "label" else c, kind="stable", ignore_index=True)
    prefix = "dice:" if task == "segmentation" else "auc:"
    groups = list(dict.fromkeys(c[len(prefix) :] for c in per_run.columns if c.startswith(prefix)))
    client_ids = sorted({c[len("client:") :] for c in per_run.columns if c.startswith("client:")}, key=natural_key)
    fixed = [c for c in per_run.columns if not c.startswith((prefix, "client:"))]
    per_run = per_run[fixed + [f"{prefix}{g}" for g in groups] + [f"client:{c}" for c in client_ids]]
    return Comparison(by=by, attribute=attribute, groups=groups, clients=client_ids, per_run=per_run, baseline=base, task=task)


def simulated_curves(comp: Comparison) -> pd.DataFrame:
    """Runs on the simulated clock (`system.simulate`): label, run, round, sim_time (the round's
    simulated end), and the mean validation AUC and ES-AUC (the target attribute) of each
    evaluated round; empty when no run of `comp` has a clock."""
    rows = []
    for _, row in comp.per_run.iterrows():
        metrics = read_run(row["path"]).metrics
        times = metrics[(metrics["metric"] == "sim_time") & (metrics["client"] == "server")].groupby("round")["value"].first()
        if times.empty:
            continue
        val = metrics[(metrics["split"] == "val") & (metrics["client"] == MEAN)]
        auc = val[(val["metric"] == "auc") & (val["attribute"] == "")].groupby("round")["value"].first()
        es = val[(val["metric"] == "es_auc") & (val["attribute"] == comp.attribute) & (val["group"] == "")].groupby("round")["value"].first()
        for round_, value in auc.items():
            rows.append((row["label"], row["run"], int(round_), float(times.get(round_, np.nan)), float(value), float(es.get(round_, np.nan))))
    return pd.DataFrame(rows, columns=["label", "run", "round", "sim_time", "auc", "es_auc"])
