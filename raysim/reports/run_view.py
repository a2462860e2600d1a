"""The run report's view of a run, and the figures its sections share.

`view_of` reshapes a run's long metrics frame once into wide frames (one column per metric) and
picks the round the tables report; every section of the page (`run_sections`,
`classification_sections`, `segmentation_sections`) reads that `View` and draws with the helpers
here (metric curves over rounds, per-group and per-client figures, the per-round and per-client
tables). A module of its own below the sections, so that they import it and not the page
(`run_report`) that imports them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from raysim.outputs.runs import HOLDOUT, MEAN, Run, RunReadError, Selection, clients, mean_dice, select_round
from raysim.reports import figures
from raysim.reports.figures import Section, percent

MANY = 50  # above this many clients: distributions instead of one line / bar per client
NAMED = 8  # up to this many clients each gets a colour and a legend entry; more are thin grey lines
WORST = 5  # the clients a large federation's report names
SPLITS = {"val": "validation", "test": "test"}  # the evaluated splits, and their titles
TITLES = SPLITS | {"train": "local training"}


@dataclass
class View:
    """The run reshaped once: wide frames (one column per metric) that every section reads."""

    run: Run
    overall: pd.DataFrame  # attribute "": index (round, split, client), a column per metric
    fair: pd.DataFrame  # the target attribute's group-"" rows (es_auc, eod, spd, ...), same index
    groups: pd.DataFrame  # the target attribute's per-group rows, long
    clients: list[str]
    roles: dict[str, str]
    attribute: str
    selection: Selection | None
    at: int | None  # the round the tables report (the selected one; else the last evaluated)
    note: str  # why `at` is what it is
    task: str = "classification"  # `Run.task`: which sections the page gets

    @property
    def many(self) -> bool:
        return len(self.clients) > MANY

    def curve(self, split: str, metric: str, fair: bool = False) -> pd.DataFrame:
        """Rounds x clients (and the mean columns) of one metric; empty when absent."""
        wide = self.fair if fair else self.overall
        if metric not in wide.columns or split not in wide.index.get_level_values("split"):
            return pd.DataFrame()
        return wide.xs(split, level="split")[metric].unstack("client").dropna(how="all")

    def cell(self, split: str, metric: str, fair: bool = False) -> pd.Series:
        """One metric per client (and the means) at the reported round."""
        table = self.curve(split, metric, fair)
        return table.loc[self.at] if self.at in table.index else pd.Series(dtype=float)


def view_of(run: Run) -> View:
    m = run.metrics
    attribute = run.attribute
    plain = m[m["attribute"] == ""]
    overall = plain.groupby(["round", "split", "client", "metric"], sort=True)["value"].first().unstack("metric")
    target = m[m["attribute"] == attribute] if attribute else m.iloc[:0]
    fair_rows = target[target["group"] == ""]
    fair = fair_rows.groupby(["round", "split", "client", "metric"], sort=True)["value"].first().unstack("metric")
    named = m[(m["role"] != "") & (m["role"] != HOLDOUT) & ~m["client"].str.startswith(MEAN)].drop_duplicates("client")
    try:
        selection: Selection | None = select_round(m)
        at: int | None = selection.round
        note = selection.reason
    except RunReadError as err:
        selection = None
        evaluated = sorted(plain.loc[plain["split"].isin(list(SPLITS)), "round"].unique())
        at = int(evaluated[-1]) if evaluated else None
        note = f"no round selected: {err}; " + (f"the tables show the last evaluated round, {at}" if at else "the run has no evaluation rows yet")
    task = run.task
    if task in ("segmentation", "joint") and {"dice_disc", "dice_cup"} <= set(overall.columns):
        overall["dice"] = mean_dice(overall)  # D, the selection metric: a column like the stored ones
    return View(run, overall, fair, target[target["group"] != ""], clients(m), dict(zip(named["client"], named["role"])), attribute, selection, at, note, task)


# --- figures and tables every section draws with ----------------------------------------------


def _curves(ax: Any, table: pd.DataFrame, view: View, scale: float) -> None:
    """One metric over rounds: each client (<= MANY) or the 10-90 % band and median over clients, and the mean."""
    present = [c for c in view.clients if c in table.columns]
    if view.many and present:
        q = table[present].quantile([0.1, 0.5, 0.9], axis=1).T * scale
        ax.fill_between(q.index, q[0.1], q[0.9], color=figures.color(5), alpha=0.35, label="10-90 % of clients")
        ax.plot(q.index, q[0.5], color=figures.color(0), marker="o", ms=4, label="median client")
    elif len(present) <= NAMED:
        for i, client in enumerate(present):
            ax.plot(table.index, table[client] * scale, color=figures.color(i + 1), marker=figures.marker(i + 1), ms=4, lw=1.2, label=client)
    else:
        for i, client in enumerate(present):
            ax.plot(table.index, table[client] * scale, color="#999999", lw=0.8, alpha=0.7, label="each client" if i == 0 else None)
    if MEAN in table.columns:
        ax.plot(table.index, table[MEAN] * scale, color="#000000", marker="o", ms=5, lw=2.4, label="mean over clients")
    if view.at is not None:
        ax.axvline(view.at, color="#555555", ls="--", lw=1, label="reported round")
    ax.set_xlabel("round")
    ax.xaxis.get_major_locator().set_params(integer=True)


def over_rounds(view: View, metric: str, title: str, ylabel: str, *, fair: bool = False, splits: Sequence[str] = ("val", "test"), scale: float = 100.0) -> str:
    tables = {s: view.curve(s, metric, fair) for s in splits}
    tables = {s: t for s, t in tables.items() if not t.empty}
    if not tables:
        return ""
    fig, axes = figures.new_figure(width=4.2 * len(tables) + 2.2, height=3.4, ncols=len(tables))
    axes = list(np.atleast_1d(axes))
    for ax, (split, table) in zip(axes, tables.items()):
        _curves(ax, table, view, scale)
        ax.set_title(TITLES.get(split, split))
        ax.set_ylabel(ylabel)
    low, high = min(ax.get_ylim()[0] for ax in axes), max(ax.get_ylim()[1] for ax in axes)
    for ax in axes:  # one y scale, so the splits compare at a glance
        ax.set_ylim(low, high)
    figures.legend_outside(axes[-1])
    who = "median and 10-90 % band over clients" if view.many else "each client"
    return figures.embed(fig, metric if not fair else f"{metric}_{view.attribute}", f"{title} per round: {who} and the mean over clients")


def group_figure(view: View, split: str = "test", metric: str = "auc", what: str = "AUC", name: str = "group_auc") -> str:
    rows = view.groups[(view.groups["round"] == view.at) & (view.groups["split"] == split)]
    if rows.empty:
        return ""
    table = rows.pivot_table(index=["client", "group"], columns="metric", values="value", aggfunc="first", sort=False)
    if metric not in table:  # undefined in every group (too few samples): the pivot drops it, nothing to draw
        return ""
    names = list(dict.fromkeys(rows["group"]))
    auc = table[metric].unstack("group").reindex(columns=names) * 100
    if view.many:
        fig, ax = figures.new_figure(width=7.5, height=3.8)
        per_client = auc[auc.index.isin(view.clients)]
        box = ax.boxplot([per_client[g].dropna().to_numpy() for g in names], tick_labels=names, patch_artist=True, medianprops={"color": "black"}, flierprops={"markersize": 3, "alpha": 0.5})
        for i, patch in enumerate(box["boxes"]):
            patch.set_facecolor(figures.color(i))
            patch.set_alpha(0.6)
        if MEAN in auc.index:
            ax.plot(range(1, len(names) + 1), auc.loc[MEAN, names], "kD", ms=6, label="mean over clients")
        ax.set_xlabel(f"{view.attribute} group")
        ax.set_ylabel(f"{SPLITS[split]} {what} (x100)")
        figures.legend_outside(ax)
        return figures.embed(fig, name, f"Per-group {split} {what} at round {view.at} ({view.attribute}): the distribution over {len(view.clients)} clients (box: quartiles; whiskers: 1.5 IQR)")
    order = [c for c in view.clients if c in auc.index] + ([MEAN] if MEAN in auc.index else [])
    lo = table[f"{metric}_lo"].unstack("group").reindex(index=order, columns=names) * 100 if f"{metric}_lo" in table else None
    hi = table[f"{metric}_hi"].unstack("group").reindex(index=order, columns=names) * 100 if f"{metric}_hi" in table else None
    fig, ax, along = per_client_axes(order, len(names))
    step = 0.8 / max(len(names), 1)
    for i, group in enumerate(names):
        y = auc.reindex(order)[group].to_numpy(dtype=float)
        err = None
        if lo is not None and hi is not None:
            err = np.vstack([np.clip(y - lo[group].to_numpy(dtype=float), 0, None), np.clip(hi[group].to_numpy(dtype=float) - y, 0, None)])
            err = np.where(np.isnan(err), 0, err)
        pos = along - 0.4 + step * (i + 0.5)
        style = {"fmt": figures.marker(i), "color": figures.color(i), "ms": 6, "capsize": 3, "lw": 1.2, "label": group}
        ax.errorbar(*((y, pos) if horizontal_layout(order) else (pos, y)), **({"xerr": err} if horizontal_layout(order) else {"yerr": err}), **style)
    (ax.set_xlabel if horizontal_layout(order) else ax.set_ylabel)(f"{SPLITS[split]} {what} (x100)")
    figures.legend_outside(ax, title=view.attribute)
    has = lo is not None and bool(lo.notna().any().any())
    return figures.embed(fig, name, f"Per-group {split} {what} at round {view.at} ({view.attribute}) per client" + (", bar: the client's bootstrap interval" if has else ""))


def horizontal_layout(order: Sequence[str]) -> bool:
    return len(order) > 12  # many clients: one row each, names readable, instead of squeezed columns


def per_client_axes(order: Sequence[str], per_client: int) -> tuple[Any, Any, np.ndarray]:
    """Axes with one slot per client (columns; rows when there are many), and the slot positions."""
    along = np.arange(len(order))
    if horizontal_layout(order):
        fig, ax = figures.new_figure(width=7.5, height=1.2 + 0.12 * len(order) * max(per_client, 2))
        ax.set_yticks(along, order)
        ax.set_ylim(len(order) - 0.5, -0.5)  # the first client on top
        ax.set_ylabel("client")
    else:
        fig, ax = figures.new_figure(width=min(12.0, 4.5 + 0.3 * len(order) * max(per_client, 2)), height=3.6)
        ax.set_xticks(along, order)
        ax.set_xlabel("client")
    return fig, ax, along


def spread_figure(view: View, metric: str = "auc", what: str = "AUC", name: str = "auc_spread") -> str:
    """> MANY clients: the histogram of per-client AUC (`metric`) at the reported round (val and test)."""
    fig, ax = figures.new_figure(width=6.8, height=3.4)
    samples = {split: view.cell(split, metric).reindex(view.clients).dropna() * 100 for split in ("val", "test")}
    pooled = pd.concat(list(samples.values()))
    bins = np.histogram_bin_edges(pooled, bins=30) if len(pooled) else 30  # one set of bins: the splits compare bar by bar
    for i, (split, values) in enumerate(samples.items()):
        if len(values):  # validation filled, test as a thick outline: both stay visible where they overlap
            style = {"alpha": 0.5} if i == 0 else {"histtype": "step", "lw": 2.2}
            ax.hist(values, bins=bins, color=figures.color(3 * i), label=f"{SPLITS[split]} ({len(values)} clients)", **style)
    ax.set_xlabel(f"{what} at round {view.at} (x100)")
    ax.set_ylabel("clients")
    figures.legend_outside(ax)
    return figures.embed(fig, name, f"Per-client {what} at round {view.at}: the distribution over {len(view.clients)} clients")


def per_round_table(section: Section, view: View, metrics: Sequence[tuple[str, str, bool]]) -> None:
    """The `per_round` table: the mean over clients of each (label, metric, fair) per evaluated
    round, val then test columns (x100); nothing when no metric has mean rows."""
    columns: dict[str, pd.Series] = {}
    for split, name in SPLITS.items():
        for label, metric, fair in metrics:
            table = view.curve(split, metric, fair)
            if MEAN in table.columns:
                columns[f"{name} {label}"] = table[MEAN]
    if columns:
        frame = pd.DataFrame(columns).sort_index()
        out = frame.apply(lambda c: c.map(percent)).reset_index(names="round")
        section.add(figures.table(out, "per_round", "mean over clients per evaluated round (x100)"))


def cells(frame: pd.DataFrame, view: View) -> pd.DataFrame:
    out = frame.apply(lambda c: c.map(percent)).reset_index(names="client")
    if view.roles:
        out.insert(1, "role", out["client"].map(view.roles).fillna(""))
    return out
