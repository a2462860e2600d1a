"""compare.html and the files `raysim.compare --out` writes (`write`): the rendering of a
`compare.Comparison` (tables and matplotlib figures, self-contained).

Sections: the pooled table (every cell with its 95 % interval) and the runs behind it; the
accuracy-fairness trade-off (test AUC against ES-AUC and against EOD, error bars one sample std
over seeds, the Pareto front dashed); test AUC per group of the target attribute per method; and
the per-client view: each client's test AUC per method and its difference to the baseline, so
which hospital a method helps or hurts shows (distributions above `compare.MANY_CLIENTS`).
Segmentation comparisons (`Comparison.task`) plot Dice (D, the mean of the disc and cup Dice)
in AUC's place: D against ES-Dice and against the worst client's D (FL-MedSegBench's client
fairness), D per group and D per client against the baseline. Joint comparisons keep the AUC
plots and add the two Dice trade-off panels after them.

Apart from the data model (`compare`: finding, checking and pooling runs) so that the model never
imports matplotlib or the page; this module imports the model, never the other way round.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raysim.reports import figures
from raysim.reports.compare import MANY_CLIENTS, Comparison, ci_cell, pareto_front, simulated_curves
from raysim.reports.system_sections import time_unit


def write(comp: Comparison, out: Path) -> list[Path]:
    """table.md, table.csv, per_run.csv, clients.csv and compare.html of `comp` in `out` (made if
    absent); their paths, compare.html last."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(comp.markdown() + "\n", encoding="utf-8")
    comp.pooled().to_csv(out / "table.csv", index=False)
    comp.per_run.drop(columns=["label"]).to_csv(out / "per_run.csv", index=False)
    comp.client_table().rename_axis("group").to_csv(out / "clients.csv")
    figures.write_page(out / "compare.html", page(comp))
    return [out / n for n in ("table.md", "table.csv", "per_run.csv", "clients.csv", "compare.html")]


def page(comp: Comparison) -> str:
    n_runs = len(comp.per_run)
    subtitle = f"{n_runs} run(s) in {len(comp.labels)} group(s) by {', '.join(comp.by)}; baseline {comp.baseline}" + (f"; target attribute {comp.attribute}" if comp.attribute else "")
    sections = [table_section(comp)]
    if comp.task != "segmentation" and comp.attribute:
        sections.append(tradeoff_section(comp))
    if comp.task == "segmentation":
        sections.append(segmentation_tradeoff_section(comp))
    elif comp.task == "joint":  # a joint run segments too: its Dice trade-off after the grading one
        sections.append(segmentation_tradeoff_section(comp, title="Segmentation: accuracy–fairness trade-off", anchor="tradeoff_dice", name="pareto_dice"))
    if comp.groups:
        sections.append(groups_section(comp))
    if comp.clients:
        sections.append(clients_section(comp))
    timed = simulated_curves(comp) if comp.task != "segmentation" else pd.DataFrame()
    if not timed.empty:
        sections.append(simulated_time_section(comp, timed))
    return figures.page("raysim compare", subtitle, sections)


def table_section(comp: Comparison) -> figures.Section:
    rows = []
    for name, group in comp.per_run.groupby("label", sort=False):
        row = {comp.title: name, "n": len(group)}
        for column in comp.columns(ci=False):
            cell = column.cell(group[column.key])
            interval = ci_cell(group[column.key]) if column.interval else "-"
            if interval != "-":
                cell = f"{cell} {interval}"
            row[column.header] = cell
        rows.append(row)
    runs = comp.per_run[["run", "label", "seed", "round", "selected_by"]].rename(columns={"label": comp.title, "round": "selected round", "selected_by": "selected on validation"})
    section = figures.Section("Table", anchor="table").add(figures.table(pd.DataFrame(rows), "compare", "mean ± sample std [95 % t interval], ×100"))
    section.text(comp.footnote())
    return section.add(figures.table(runs.astype(str), "runs", "the runs pooled"))


def _errors(values: pd.Series) -> np.ndarray:
    return np.nan_to_num(values.to_numpy(dtype=float))


def tradeoff_section(comp: Comparison) -> figures.Section:
    fig, axes = figures.new_figure(11.0, 4.4, ncols=2)
    fronts = []
    for ax, key, name, higher in ((axes[0], "es_auc", "ES-AUC", True), (axes[1], "eod", "EOD", False)):
        fronts.append(_tradeoff_panel(ax, comp, "auc", key, name, higher))
        ax.set_xlabel("test AUC (×100, higher is better)")
        ax.set_ylabel(f"test {name} of {comp.attribute} (×100, {'higher' if higher else 'lower'} is better)")
    figures.legend_outside(axes[1], title=comp.title)
    section = figures.Section("Accuracy–fairness trade-off", anchor="tradeoff")
    section.add(figures.embed(fig, "pareto", f"Test AUC against ES-AUC (left) and against EOD (right), mean over seeds, error bars one sample std; dashed: the Pareto front ({'; '.join(fronts)})"))
    return section.text("Pareto front (no other group is better on both axes): " + "; ".join(fronts) + ".")


def _tradeoff_panel(ax: Any, comp: Comparison, x_key: str, key: str, name: str, higher: bool) -> str:
    """One scatter of group means (error bars one sample std) with its Pareto front dashed; the front in words."""
    x, x_std = 100 * comp.means(x_key), 100 * comp.stds(x_key)
    y, y_std = 100 * comp.means(key), 100 * comp.stds(key)
    for i, label in enumerate(comp.labels):
        ax.errorbar(x[label], y[label], xerr=_errors(x_std[[label]]), yerr=_errors(y_std[[label]]), fmt=figures.marker(i), color=figures.color(i), markersize=7, capsize=3, label=label)
    front = pareto_front(pd.DataFrame({"x": x, "y": y}), "x", "y", higher_y=higher)
    if front:
        xs = x[front].sort_values()
        ax.plot(xs.to_numpy(), y[xs.index].to_numpy(), linestyle="--", color="black", linewidth=1, zorder=0, label="Pareto front")
    return f"{name}: {', '.join(front) or 'none'}"


def segmentation_tradeoff_section(comp: Comparison, *, title: str = "Accuracy–fairness trade-off", anchor: str = "tradeoff", name: str = "pareto") -> figures.Section:
    """Dice (D) against ES-Dice (with a target attribute) and against the worst client's Dice."""
    panels = [("es_dice", "ES-Dice", f"test ES-Dice of {comp.attribute}")] if comp.attribute else []
    panels.append(("worst_dice", "worst client Dice", "test Dice of the worst client"))
    fig, axes = figures.new_figure(5.5 * len(panels) + 1.6, 4.4, ncols=len(panels))
    axes = list(np.atleast_1d(axes))
    fronts = []
    for ax, (key, label, ylabel) in zip(axes, panels):
        fronts.append(_tradeoff_panel(ax, comp, "dice", key, label, True))
        ax.set_xlabel("test Dice, mean of disc and cup (×100, higher is better)")
        ax.set_ylabel(f"{ylabel} (×100, higher is better)")
    figures.legend_outside(axes[-1], title=comp.title)
    section = figures.Section(title, anchor=anchor)
    which = " and ".join(f"against {label}" for _, label, _ in panels)
    alt = f"Test Dice {which} ({'left to right' if len(panels) > 1 else 'one panel'}), mean over seeds, error bars one sample std; dashed: the Pareto front ({'; '.join(fronts)})"
    section.add(figures.embed(fig, name, alt))
    return section.text("Pareto front (no other group is better on both axes): " + "; ".join(fronts) + ".")


def groups_section(comp: Comparison) -> figures.Section:
    keys = [f"{comp.group_prefix}:{g}" for g in comp.groups]
    means = comp.per_run.groupby("label", sort=False)[keys].mean()
    stds = comp.per_run.groupby("label", sort=False)[keys].std(ddof=1)
    fig, ax = figures.new_figure(max(6.4, 1.0 + 0.5 * len(comp.groups) * len(comp.labels)), 3.8)
    figures.grouped_bars(ax, comp.groups, {label: (means.loc[label].to_numpy(), stds.loc[label].to_numpy()) for label in comp.labels}, scale=100)
    _zoom(ax, list(100 * means.min(axis=0)))
    ax.set_xlabel(f"{comp.attribute} group")
    seg = comp.task == "segmentation"
    ax.set_ylabel("test Dice (×100)" if seg else "test AUC (×100)")
    figures.legend_outside(ax, title=comp.title)
    what = "Dice (the mean of the group's disc and cup Dice)" if seg else "AUC"
    alt = f"Test {what} per {comp.attribute} group and method at the selected round, mean over seeds, error bars one sample std"
    return figures.Section(f"{'Dice' if seg else 'AUC'} per {comp.attribute} group", anchor="groups").add(figures.embed(fig, "group_dice" if seg else "group_auc", alt))


def _zoom(ax: Any, lows: list[float]) -> None:
    """Bars of AUC start near the lowest value shown (not at 0), so small differences are visible."""
    finite = [v for v in lows if not math.isnan(v)]
    if finite:
        ax.set_ylim(bottom=max(0.0, 5 * math.floor((min(finite) - 5) / 5)))


def clients_section(comp: Comparison) -> figures.Section:
    table, deltas = comp.client_table(), comp.client_deltas()
    section = figures.Section("Per client", anchor="clients")
    many = len(comp.clients) > MANY_CLIENTS
    fig, ax = figures.new_figure(max(6.4, 1.0 + 0.35 * len(comp.clients) * len(comp.labels)) if not many else 7.0, 3.8)
    if many:
        _boxes(ax, [100 * table.loc[label].dropna().to_numpy() for label in comp.labels], comp.labels, range(len(comp.labels)))
        ax.set_xlabel(comp.title)
    else:
        stds = comp.per_run.groupby("label", sort=False)[[f"client:{c}" for c in comp.clients]].std(ddof=1)
        figures.grouped_bars(ax, comp.clients, {label: (table.loc[label].to_numpy(), stds.loc[label].to_numpy()) for label in comp.labels}, scale=100)
        _zoom(ax, list(100 * table.min(axis=0)))
        ax.set_xlabel("client")
        figures.legend_outside(ax, title=comp.title)
    score, plot = comp.score, "client_dice" if comp.task == "segmentation" else "client_auc"
    ax.set_ylabel(f"{score} (×100)")
    shape = "distribution over clients" if many else "error bars one sample std over seeds"
    section.add(figures.embed(fig, plot, f"{score[0].upper()}{score[1:]} per client at each run's selected round, mean over seeds ({shape})"))
    if len(deltas):
        fig, ax = figures.new_figure(max(6.4, 1.0 + 0.35 * len(comp.clients) * len(deltas)) if not many else 7.0, 3.8)
        if many:
            _boxes(ax, [100 * deltas.loc[label].dropna().to_numpy() for label in deltas.index], list(deltas.index), [comp.labels.index(label) for label in deltas.index])
            ax.set_xlabel(comp.title)
        else:
            styles = [comp.labels.index(label) for label in deltas.index]  # each method keeps its colour without the baseline
            figures.grouped_bars(ax, comp.clients, {label: (deltas.loc[label].to_numpy(), None) for label in deltas.index}, scale=100, styles=styles)
            ax.set_xlabel("client")
            figures.legend_outside(ax, title=comp.title)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel(f"{score} − {comp.baseline}'s (×100)")
        section.add(
            figures.embed(fig, "client_delta", f"Difference to {comp.baseline} per client (mean over seeds minus {comp.baseline}'s mean): above 0 the method helps that client, below it hurts")
        )
    shown = table.T.describe().T[["min", "50%", "max"]].rename(columns={"50%": "median"}) if many else table
    cells = (100 * shown).round(1).astype(str)
    cells.insert(len(cells.columns), "worst client", table.idxmin(axis=1).astype(str) + " (" + (100 * table.min(axis=1)).round(1).astype(str) + ")")
    return section.add(figures.table(cells.reset_index(names=comp.title), "clients", f"{score} per client ×100, mean over seeds"))


def _boxes(ax: Any, data: list[np.ndarray], labels: list[str], styles: Iterable[int]) -> None:
    """One box per group (the distribution over clients), in the group's colour."""
    boxes = ax.boxplot(data, tick_labels=labels, patch_artist=True)
    for patch, style in zip(boxes["boxes"], styles):
        patch.set_facecolor(figures.color(style))
        patch.set_alpha(0.8)


def simulated_time_section(comp: Comparison, timed: pd.DataFrame) -> figures.Section:
    """Mean validation AUC and ES-AUC against simulated time (`system.simulate` runs), one line per run."""
    scale, unit = time_unit(float(timed["sim_time"].max()))
    fig, axes = figures.new_figure(width=10.6, height=3.4, ncols=2)
    for i, ((label, run), curve) in enumerate(timed.groupby(["label", "run"], sort=False)):
        style = {"color": figures.color(comp.labels.index(label) if label in comp.labels else i), "marker": figures.marker(i), "ms": 4, "lw": 1.4}
        axes[0].plot(curve["sim_time"] / scale, curve["auc"] * 100, **style)
        axes[1].plot(curve["sim_time"] / scale, curve["es_auc"] * 100, label=f"{label} ({run})", **style)
    axes[0].set_ylabel("mean val AUC (x100)")
    axes[1].set_ylabel(f"mean val ES-AUC, {comp.attribute} (x100)")
    for ax in axes:
        ax.set_xlabel(f"simulated time ({unit})")
    figures.legend_outside(axes[1])
    section = figures.Section("Against simulated time", anchor="simulated_time").text("Runs on the simulated clock (system.simulate): accuracy and fairness by simulated time, not rounds.")
    return section.add(figures.embed(fig, "simulated_time", "Mean validation AUC and ES-AUC against simulated time, one line per run"))
