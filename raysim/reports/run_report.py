"""The per-run report (`python -m raysim.report RUN_DIR [--out FILE]` writes RUN_DIR/report.html).

One self-contained page (inline PNG figures, no scripts, nothing fetched) read from the run
directory alone (`raysim.runs.read_run`): the config and provenance in brief; which round is
reported and why (`raysim.runs.select_round`: model selection on the validation split); mean and
per-client AUC, ES-AUC and accuracy per round; per-group AUC with its bootstrap interval and EOD /
SPD per client at that round (test split); bytes up / down and the training loss per round; the
role means of role runs (FedHelp), ε per round of DP runs, and the clients a run dropped. Above
`MANY` clients every per-client view becomes a distribution (median and 10-90 % band, a box
plot, the worst clients named), so a 1,000-client report stays one page and a few seconds.
Every number in a table is the metrics.parquet value x100 with one decimal (`figures.percent`),
except MB, loss and ε. Plain pandas and matplotlib, no Ray.

A segmentation run (`raysim.runs.Run.task`: Dice rows, no AUC) gets the same page with Dice in
AUC's place (`raysim.segmetrics`' names): mean and per-client Dice of the optic disc, cup and
neuroretinal rim (the disc without the cup: FairSeg's code -1, which its paper reports beside the
cup; runs written before the rim rows existed show disc and cup) and ES-Dice per round; at the reported round each client's Dice with its bootstrap interval, IoU,
hd95 (a percentage of the image diagonal) and CDR error; FL-MedSegBench's client-fairness view
(the worst client by mean Dice D = (disc + cup) / 2, and min / median / max / std over clients,
computed here from the client rows, never stored); per-group Dice with intervals, ES-Dice and
the group gaps; traffic, loss, roles, ε and missing clients as for classification.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raysim.outputs.runs import HOLDOUT, MEAN, Run, RunReadError, Selection, client_spread, clients, holdout_clients, mean_dice, read_run, select_round
from raysim.reports import figures
from raysim.reports.figures import Section, percent

MANY = 50  # above this many clients: distributions instead of one line / bar per client
NAMED = 8  # up to this many clients each gets a colour and a legend entry; more are thin grey lines
WORST = 5  # the clients a large federation's report names
SPLITS = {"val": "validation", "test": "test"}  # the evaluated splits, and their titles
TITLES = SPLITS | {"train": "local training"}
MB = 1e6


@dataclass
class _View:
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


def _view(run: Run) -> _View:
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
    return _View(run, overall, fair, target[target["group"] != ""], clients(m), dict(zip(named["client"], named["role"])), attribute, selection, at, note, task)


# --- figures ------------------------------------------------------------------------------


def _curves(ax: Any, table: pd.DataFrame, view: _View, scale: float) -> None:
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


def _over_rounds(view: _View, metric: str, title: str, ylabel: str, *, fair: bool = False, splits: Sequence[str] = ("val", "test"), scale: float = 100.0) -> str:
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


def _group_figure(view: _View, split: str = "test", metric: str = "auc", what: str = "AUC", name: str = "group_auc") -> str:
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
    fig, ax, along = _per_client_axes(order, len(names))
    step = 0.8 / max(len(names), 1)
    for i, group in enumerate(names):
        y = auc.reindex(order)[group].to_numpy(dtype=float)
        err = None
        if lo is not None and hi is not None:
            err = np.vstack([np.clip(y - lo[group].to_numpy(dtype=float), 0, None), np.clip(hi[group].to_numpy(dtype=float) - y, 0, None)])
            err = np.where(np.isnan(err), 0, err)
        pos = along - 0.4 + step * (i + 0.5)
        style = {"fmt": figures.marker(i), "color": figures.color(i), "ms": 6, "capsize": 3, "lw": 1.2, "label": group}
        ax.errorbar(*((y, pos) if _horizontal(order) else (pos, y)), **({"xerr": err} if _horizontal(order) else {"yerr": err}), **style)
    (ax.set_xlabel if _horizontal(order) else ax.set_ylabel)(f"{SPLITS[split]} {what} (x100)")
    figures.legend_outside(ax, title=view.attribute)
    has = lo is not None and bool(lo.notna().any().any())
    return figures.embed(fig, name, f"Per-group {split} {what} at round {view.at} ({view.attribute}) per client" + (", bar: the client's bootstrap interval" if has else ""))


def _horizontal(order: Sequence[str]) -> bool:
    return len(order) > 12  # many clients: one row each, names readable, instead of squeezed columns


def _per_client_axes(order: Sequence[str], per_client: int) -> tuple[Any, Any, np.ndarray]:
    """Axes with one slot per client (columns; rows when there are many), and the slot positions."""
    along = np.arange(len(order))
    if _horizontal(order):
        fig, ax = figures.new_figure(width=7.5, height=1.2 + 0.12 * len(order) * max(per_client, 2))
        ax.set_yticks(along, order)
        ax.set_ylim(len(order) - 0.5, -0.5)  # the first client on top
        ax.set_ylabel("client")
    else:
        fig, ax = figures.new_figure(width=min(12.0, 4.5 + 0.3 * len(order) * max(per_client, 2)), height=3.6)
        ax.set_xticks(along, order)
        ax.set_xlabel("client")
    return fig, ax, along


def _gap_figure(view: _View, split: str = "test") -> str:
    eod, spd = view.cell(split, "eod", fair=True), view.cell(split, "spd", fair=True)
    if eod.empty and spd.empty:
        return ""
    present = [c for c in view.clients if c in eod.index or c in spd.index]
    label = f"{view.attribute} gap, {SPLITS[split]} (x100)"
    if view.many:
        fig, ax = figures.new_figure(width=7.5, height=3.4)
        ax.boxplot([s.reindex(present).dropna().to_numpy() * 100 for s in (eod, spd)], tick_labels=["EOD", "SPD"], medianprops={"color": "black"}, flierprops={"markersize": 3, "alpha": 0.5})
        for i, s in enumerate((eod, spd)):
            if MEAN in s.index:
                ax.plot(i + 1, s[MEAN] * 100, "kD", ms=6, label="mean over clients" if i == 0 else None)
        ax.set_ylabel(label)
        figures.legend_outside(ax)
        return figures.embed(fig, "eod_spd", f"EOD and SPD ({view.attribute}, {split} split) at round {view.at}: the distribution over {len(present)} clients")
    order = [*present, MEAN]
    fig, ax, along = _per_client_axes(order, 2)
    for i, (name, s) in enumerate((("EOD", eod), ("SPD", spd))):
        values = s.reindex(order).to_numpy(dtype=float) * 100
        style = {"color": figures.color(i), "hatch": ("", "//")[i], "edgecolor": "white", "label": name}
        if _horizontal(order):
            ax.barh(along - 0.2 + 0.4 * i, values, height=0.4, **style)
        else:
            ax.bar(along - 0.2 + 0.4 * i, values, width=0.4, **style)
    (ax.set_xlabel if _horizontal(order) else ax.set_ylabel)(label)
    figures.legend_outside(ax)
    return figures.embed(fig, "eod_spd", f"EOD and SPD ({view.attribute}, {split} split) at round {view.at}, per client and the mean")


def _spread_figure(view: _View, metric: str = "auc", what: str = "AUC", name: str = "auc_spread") -> str:
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


def _traffic_figure(traffic: pd.DataFrame) -> str:
    fig, axes = figures.new_figure(width=10.6, height=3.4, ncols=2)
    for i, (column, label) in enumerate((("down", "down (server to client)"), ("up", "up (client to server)"))):
        style = {"color": figures.color(i), "marker": figures.marker(i), "ms": (8, 4)[i], "ls": ("-", "--")[i], "lw": (2.4, 1.4)[i], "label": label}
        axes[0].plot(traffic.index, traffic[f"MB {column} per client"], **style)  # down drawn wider: equal values stay visible
        axes[1].plot(traffic.index, traffic[f"MB {column} in all"], **style)
    axes[0].set_ylabel("MB per client")
    axes[1].set_ylabel("MB, all clients")
    for ax in axes:
        ax.set_xlabel("round")
        ax.set_ylim(bottom=0)
        ax.xaxis.get_major_locator().set_params(integer=True)
    figures.legend_outside(axes[1])
    return figures.embed(fig, "bytes", "Bytes sent per round: the mean per client that trained (left) and over all clients (right), in MB")


def _line_figure(frame: pd.DataFrame, name: str, alt: str, ylabel: str, scale: float = 1.0, at: int | None = None) -> str:
    fig, ax = figures.new_figure(width=7.6, height=3.4)
    for i, column in enumerate(frame.columns):
        if column == MEAN:
            ax.plot(frame.index, frame[column] * scale, color="#000000", marker="o", ms=5, lw=2.4, label="mean over clients")
        else:
            ax.plot(frame.index, frame[column] * scale, color=figures.color(i), marker=figures.marker(i), ls=figures.linestyle(i), ms=5, label=str(column))
    if at is not None:
        ax.axvline(at, color="#555555", ls="--", lw=1, label="reported round")
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.xaxis.get_major_locator().set_params(integer=True)
    figures.legend_outside(ax)
    return figures.embed(fig, name, alt)


# --- sections -----------------------------------------------------------------------------


def _run_section(view: _View) -> Section:
    cfg, prov = view.run.config, view.run.provenance
    algo = {k: v for k, v in (cfg.get("algorithm") or {}).items() if k != "name"}
    data, model, fed, ev = (cfg.get(k) or {} for k in ("data", "model", "federation", "eval"))
    packages = prov.get("packages") or {}
    rounds = sorted(view.run.metrics["round"].unique())
    rows = [
        ("method", view.run.algorithm + (" (" + ", ".join(f"{k}={v}" for k, v in algo.items()) + ")" if algo else " (its defaults)")),
        ("data source", f"{data.get('name', '?')}" + (f", partition {data['partition']}" if data.get("partition") else "") + (f", root {data['root']}" if data.get("root") else "")),
        ("sensitive attribute", view.attribute or "none (the source has no sensitive attributes)"),
        ("model", f"{model.get('name', '?')}, {model.get('img_size', '?')} px" + (", pretrained" if model.get("pretrained") else "")),
        ("rounds", f"{rounds[-1] if rounds else 0} of {fed.get('rounds', '?')} done"),
        ("clients", f"{len(view.clients)}" + (f", {fed['clients_per_round']} per round" if fed.get("clients_per_round") else ", all every round")),
        ("local training", f"{fed.get('local_epochs', '?')} epoch(s), batch {fed.get('batch_size', '?')}, {fed.get('optimizer', '?')} lr {fed.get('lr', '?')}"),
        ("evaluation", f"every {ev.get('every', '?')} round(s), {ev.get('bootstrap', 0)} bootstrap resamples"),
        ("seed", str(cfg.get("seed", "?"))),
        ("versions", ", ".join(f"{k} {packages.get(k) or '?'}" for k in ("raysim", "torch", "ray")) + f", python {prov.get('python', '?')}"),
        ("git commit", str(prov.get("git_commit") or "unknown")),
        ("created", str(prov.get("created") or "unknown")),
        ("data fingerprint", str((prov.get("data") or {}).get("csv_sha256") or "-")),
    ]
    return Section("Run", anchor="run").add(figures.table(pd.DataFrame(rows, columns=["setting", "value"]), "run"))


def _selection_section(view: _View) -> Section:
    section = Section("Model selection", anchor="selection").text(view.note)
    if view.selection is not None:
        section.text("Selection uses the validation split only, so the test values below stay an unbiased estimate.")
    if view.at is None:
        return section
    metrics = [("AUC", "auc", False), ("accuracy", "acc", False), ("balanced accuracy", "bacc", False)]
    if view.attribute:
        metrics[1:1] = [(f"ES-AUC ({view.attribute})", "es_auc", True), (f"EOD ({view.attribute})", "eod", True), (f"SPD ({view.attribute})", "spd", True)]
    rows = [(label, *(percent(view.cell(s, metric, fair).get(MEAN, np.nan)) for s in SPLITS)) for label, metric, fair in metrics]
    frame = pd.DataFrame(rows, columns=["mean over clients (x100)", *SPLITS.values()])
    return section.add(figures.table(frame, "selected", f"at round {view.at}"))


def _performance_section(view: _View) -> Section:
    section = Section("AUC, ES-AUC and accuracy per round", anchor="rounds")
    section.add(_over_rounds(view, "auc", "AUC", "AUC (x100)"))
    if view.attribute:
        section.add(_over_rounds(view, "es_auc", f"ES-AUC ({view.attribute})", f"ES-AUC {view.attribute} (x100)", fair=True))
    else:
        section.text("No ES-AUC: the source has no sensitive attributes.")
    section.add(_over_rounds(view, "acc", "Accuracy", "accuracy (x100)"))
    _per_round_table(section, view, (("AUC", "auc", False), ("ES-AUC", "es_auc", True), ("acc", "acc", False), ("bacc", "bacc", False)))
    return section


def _per_round_table(section: Section, view: _View, metrics: Sequence[tuple[str, str, bool]]) -> None:
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


def _clients_section(view: _View) -> Section:
    section = Section("Clients at the reported round", anchor="clients")
    if view.at is None:
        return section.text("No evaluated round yet.")
    columns = [("val AUC", "val", "auc", False), ("test AUC", "test", "auc", False), ("test acc", "test", "acc", False)]
    if view.attribute:
        columns += [(f"test ES-AUC ({view.attribute})", "test", "es_auc", True), ("test EOD", "test", "eod", True), ("test SPD", "test", "spd", True)]
    values = pd.DataFrame({label: view.cell(split, metric, fair) for label, split, metric, fair in columns})
    per_client = values.reindex(view.clients)
    if view.many:
        section.add(_spread_figure(view))
        worst = per_client.dropna(subset=["test AUC"]).sort_values(["test AUC"], kind="stable").head(WORST)
        section.add(figures.table(_cells(worst, view), "worst_clients", f"the {len(worst)} clients with the lowest test AUC at round {view.at} (x100)"))
        spread = per_client.quantile([0.0, 0.1, 0.5, 0.9, 1.0]).rename(index={0.0: "min", 0.1: "10 %", 0.5: "median", 0.9: "90 %", 1.0: "max"})
        section.add(figures.table(spread.apply(lambda c: c.map(percent)).reset_index(names="over clients"), "client_spread", "the distribution over clients (x100)"))
    else:
        rows = per_client if MEAN not in values.index else pd.concat([per_client, values.loc[[MEAN]]])
        section.add(figures.table(_cells(rows, view), "clients", f"each client and the mean at round {view.at} (x100)"))
    return section


def _cells(frame: pd.DataFrame, view: _View) -> pd.DataFrame:
    out = frame.apply(lambda c: c.map(percent)).reset_index(names="client")
    if view.roles:
        out.insert(1, "role", out["client"].map(view.roles).fillna(""))
    return out


def _fairness_section(view: _View) -> Section:
    section = Section("Fairness", anchor="fairness")
    if not view.attribute:
        return section.text("The source has no sensitive attributes: no per-group AUC, ES-AUC, EOD or SPD.")
    if view.at is None:
        return section.text("No evaluated round yet.")
    section.text(f"Test split at round {view.at}; attribute {view.attribute} (the run's target attribute).")
    section.add(_group_figure(view))
    rows = view.groups[(view.groups["round"] == view.at) & (view.groups["split"] == "test")]
    wide = rows.pivot_table(index=["client", "group"], columns="metric", values="value", aggfunc="first", sort=False) if not rows.empty else None
    if wide is not None and "auc" not in wide:  # every group AUC undefined (too few samples): the pivot dropped them all
        section.text("No group AUC is defined at this round (each group has too few samples or a single class).")
    elif wide is not None:
        has_interval = "auc_lo" in wide.columns and bool(wide["auc_lo"].notna().any())
        if not has_interval:
            section.text("No bootstrap intervals in this run (eval.bootstrap = 0, or every group AUC undefined).")
        keep = [MEAN] if view.many else [*view.clients, MEAN]
        wide = wide[wide.index.get_level_values("client").isin(keep)]
        wide = wide.reindex(sorted(wide.index, key=lambda k: keep.index(k[0])))  # stable: groups keep their code order
        out = pd.DataFrame({"AUC": wide["auc"]} | ({"AUC low": wide["auc_lo"], "AUC high": wide["auc_hi"]} if has_interval else {}))
        out = out.apply(lambda c: c.map(percent)).reset_index()
        caption = "per group, each client and the mean (x100; the interval is the client's bootstrap interval, none for the mean)"
        section.add(figures.table(out, "group_auc", caption if not view.many else "per group, the mean over clients (x100)"))
    section.add(_gap_figure(view))
    attributes = view.run.metrics
    attributes = attributes[(attributes["client"] == MEAN) & (attributes["round"] == view.at) & (attributes["split"] == "test") & (attributes["attribute"] != "") & (attributes["group"] == "")]
    if not attributes.empty:
        wide = attributes.pivot_table(index="attribute", columns="metric", values="value", aggfunc="first", sort=False)
        names = {"es_auc": "ES-AUC", "es_acc": "ES-acc", "eod": "EOD", "spd": "SPD"}
        out = wide[[c for c in names if c in wide.columns]].rename(columns=names).apply(lambda c: c.map(percent)).reset_index()
        section.add(figures.table(out, "attributes", f"every attribute, mean over clients, test split at round {view.at} (x100)"))
    return section


def _training_section(view: _View) -> Section:
    section = Section("Training: traffic and loss", anchor="training")
    train = view.run.metrics
    train = train[(train["split"] == "train") & (train["attribute"] == "")]
    sent = train[train["metric"].isin(["bytes_up", "bytes_down"]) & ~train["client"].str.startswith(MEAN)]
    if sent.empty:
        section.text("No bytes_up / bytes_down rows.")
    else:
        per_round = sent.pivot_table(index="round", columns="metric", values="value", aggfunc=["mean", "sum", "count"])
        # a run with only one direction's rows (e.g. bytes_up alone) gets NaN for the other, not a KeyError
        per_round = per_round.reindex(columns=pd.MultiIndex.from_product([["mean", "sum", "count"], ["bytes_down", "bytes_up"]]))
        traffic = pd.DataFrame(
            {
                "clients trained": per_round[("count", "bytes_up")].fillna(0).astype(int),
                "MB down per client": per_round[("mean", "bytes_down")] / MB,
                "MB up per client": per_round[("mean", "bytes_up")] / MB,
                "MB down in all": per_round[("sum", "bytes_down")] / MB,
                "MB up in all": per_round[("sum", "bytes_up")] / MB,
            }
        )
        section.add(_traffic_figure(traffic))
        out = traffic.copy()
        for column in out.columns[1:]:
            out[column] = out[column].map(lambda v: f"{v:.2f}")
        section.add(figures.table(out.reset_index(), "traffic", "MB sent per round (1 MB = 10^6 bytes)"))
    loss = view.curve("train", "loss")
    if loss.empty:
        section.text("No training loss: this run predates the train-split `loss` rows.")
    else:
        section.add(_over_rounds(view, "loss", "Training loss", "training loss", splits=("train",), scale=1.0).replace('data-plot="loss"', 'data-plot="train_loss"'))
        if MEAN in loss.columns:
            out = pd.DataFrame({"mean loss": loss[MEAN].map(lambda v: f"{v:.4f}")}).reset_index(names="round")
            section.add(figures.table(out, "train_loss", "mean over clients"))
    return section


ROLE_ROWS = (("val AUC", "val", "auc"), ("test AUC", "test", "auc"), ("test acc", "test", "acc"))


def _roles_section(view: _View, metric: str = "auc", what: str = "AUC", rows_of: Sequence[tuple[str, str, str]] = ROLE_ROWS) -> Section | None:
    names = sorted(c for c in view.overall.index.get_level_values("client").unique() if c.startswith(f"{MEAN}:"))
    if not names:
        return None
    section = Section("Roles", anchor="roles").text(
        "Means over the clients of each role: " + ", ".join(f"{r} ({sum(1 for v in view.roles.values() if v == r)} clients)" for r in sorted(set(view.roles.values())))
    )
    for split in SPLITS:
        table = view.curve(split, metric)
        if not table.empty:
            frame = table[[c for c in [*names, MEAN] if c in table.columns]]
            section.add(_line_figure(frame, f"roles_{split}", f"{SPLITS[split]} {what} per round: the mean over each role's clients", f"{SPLITS[split]} {what} (x100)", 100.0, view.at))
    if view.at is not None:
        rows = {label: {c: percent(view.cell(split, key).get(c, np.nan)) for c in [*names, MEAN]} for label, split, key in rows_of}
        section.add(figures.table(pd.DataFrame(rows).reset_index(names="mean of"), "roles", f"role means at round {view.at} (x100)"))
    return section


def _privacy_section(view: _View) -> Section | None:
    m = view.run.metrics
    server = m[(m["client"] == "server") & m["metric"].isin(["epsilon", "delta"])]
    if not (server["metric"] == "epsilon").any():
        return None
    wide = server.pivot_table(index="round", columns="metric", values="value", aggfunc="first").sort_index()
    section = Section("Privacy", anchor="privacy").text("The privacy spent so far after each round (the method's accountant; client `server` rows).")
    section.add(_line_figure(wide[["epsilon"]].rename(columns={"epsilon": "ε"}), "epsilon", "ε spent per round (cumulative)", "ε (cumulative)"))
    out = wide.apply(lambda c: c.map(lambda v: f"{v:.4g}")).reset_index()
    return section.add(figures.table(out, "privacy", "ε and δ after each round"))


def _missing_section(view: _View) -> Section:
    m = view.run.metrics
    train = m[m["split"] == "train"]
    gone = train[train["metric"] == "missing"]
    section = Section("Missing clients", anchor="missing")
    if gone.empty:
        return section.text("No client was dropped (no `missing` rows).")
    first = gone.groupby("client")["round"].agg(["min", "max", "count"]).rename(columns={"min": "first round missing", "max": "last round missing", "count": "rounds missing"})
    first = first.reindex(sorted(first.index, key=lambda c: clients(gone).index(c) if c in clients(gone) else 0))
    section.text(f"{len(first)} of {len(view.clients)} clients were dropped (fault.on_client_loss=drop); every mean after that is over the clients left.")
    section.add(figures.table(first.reset_index(), "missing", "clients out of the run"))
    left = train[(train["metric"] == "n_clients") & (train["client"] == MEAN)].sort_values("round")
    if not left.empty:  # runs of rounds with the same count, one row each
        count = left["value"].astype(int)
        spans = left.assign(count=count, span=(count != count.shift()).cumsum()).groupby("span").agg(first=("round", "min"), last=("round", "max"), left=("count", "first"))
        out = pd.DataFrame({"rounds": [f"{a}-{b}" if a != b else str(a) for a, b in zip(spans["first"], spans["last"])], "clients left": spans["left"].to_numpy()})
        section.add(figures.table(out, "n_clients", "clients the means are over"))
    return section


# --- segmentation sections ------------------------------------------------------------------
# Segmentation runs (`Run.task`): Dice of the optic disc and cup instead of AUC (raysim.segmetrics'
# names and conventions); "dice" is D, the mean of the disc and cup Dice (the selection metric).

SEG_NAMES = {
    "dice": "Dice",
    "dice_disc": "Dice disc",
    "dice_cup": "Dice cup",
    "iou_disc": "IoU disc",
    "iou_cup": "IoU cup",
    "hd95_disc": "hd95 disc (% of diagonal)",
    "hd95_cup": "hd95 cup (% of diagonal)",
    "cdr_error": "CDR error",
    "es_dice": "ES-Dice",
    "es_dice_disc": "ES-Dice disc",
    "es_dice_cup": "ES-Dice cup",
    "dice_gap": "Dice gap",
    "dice_disc_gap": "Dice gap disc",
    "dice_cup_gap": "Dice gap cup",
    "dice_rim": "Dice rim",
    "iou_rim": "IoU rim",
    "hd95_rim": "hd95 rim (% of diagonal)",
    "es_dice_rim": "ES-Dice rim",
    "dice_rim_gap": "Dice gap rim",
}
GEOMETRY = ("iou_disc", "iou_cup", "hd95_disc", "hd95_cup", "cdr_error")
RIM_GEOMETRY = ("iou_rim", "hd95_rim")
SEG_ROLE_ROWS = (("val Dice", "val", "dice"), ("test Dice", "test", "dice"), ("test Dice disc", "test", "dice_disc"), ("test Dice cup", "test", "dice_cup"))
SEG_NOTE = (
    "Dice is the mean of the disc and cup Dice (raysim.segmetrics' D); ES-Dice is equity-scaled D over the groups of the target attribute; "
    "hd95 is the 95th percentile Hausdorff distance as a percentage of the image diagonal (lower is better); "
    "CDR error is |vertical cup-to-disc ratio predicted - true| (x100, lower is better; each region's largest connected component). "
    "The rim is the disc without the cup."
)
FAIRSEG_NOTE = (
    "FairSeg: mask code -1 is the neuroretinal rim and -2 the cup; FairSeg's evaluation reports rim and cup, so compare its Dice and IoU with "
    "Dice rim / Dice cup here (Dice disc is rim + cup). FairSeg reports medpy's HD95 in pixels at its own image size; raysim's hd95 is "
    "MONAI's form as a percentage of the image diagonal, so the two are not comparable without rescaling."
)


def _parts(view: _View) -> tuple[str, ...]:
    """The regions the run scored: disc and cup, and the rim in runs that write its rows."""
    return ("disc", "cup", "rim") if "dice_rim" in view.overall.columns else ("disc", "cup")


def _geometry(view: _View) -> tuple[str, ...]:
    return GEOMETRY + (RIM_GEOMETRY if "rim" in _parts(view) else ())


def _seg_notes(view: _View) -> str:
    fairseg = (view.run.config.get("data") or {}).get("name") == "fairseg"
    return SEG_NOTE + (" " + FAIRSEG_NOTE if fairseg else "")


def _seg_selection_section(view: _View) -> Section:
    section = Section("Model selection", anchor="selection").text(view.note)
    if view.selection is not None:
        section.text("Selection uses the validation split only, so the test values below stay an unbiased estimate.")
    if view.at is None:
        return section
    parts = _parts(view)
    metrics = [(SEG_NAMES[m], m, False) for m in ("dice", *(f"dice_{p}" for p in parts))]
    if view.attribute:
        metrics += [(f"{SEG_NAMES[m]} ({view.attribute})", m, True) for m in ("es_dice", *(f"es_dice_{p}" for p in parts), "dice_gap")]
    metrics += [(SEG_NAMES[m], m, False) for m in _geometry(view)]
    rows = [(label, *(percent(view.cell(s, metric, fair).get(MEAN, np.nan)) for s in SPLITS)) for label, metric, fair in metrics]
    frame = pd.DataFrame(rows, columns=["mean over clients (x100)", *SPLITS.values()])
    section.add(figures.table(frame, "selected", f"at round {view.at}"))
    return section.text(_seg_notes(view))


def _seg_performance_section(view: _View) -> Section:
    section = Section("Dice and ES-Dice per round", anchor="rounds")
    section.add(_over_rounds(view, "dice_disc", "Dice of the optic disc", "Dice disc (x100)"))
    section.add(_over_rounds(view, "dice_cup", "Dice of the optic cup", "Dice cup (x100)"))
    if "rim" in _parts(view):
        section.add(_over_rounds(view, "dice_rim", "Dice of the neuroretinal rim (the disc without the cup)", "Dice rim (x100)"))
    if view.attribute:
        section.add(_over_rounds(view, "es_dice", f"ES-Dice ({view.attribute})", f"ES-Dice {view.attribute} (x100)", fair=True))
    else:
        section.text("No ES-Dice: the source has no sensitive attributes.")
    per_round = [("dice", False), *((f"dice_{p}", False) for p in _parts(view)), ("es_dice", True), ("cdr_error", False)]
    _per_round_table(section, view, [(SEG_NAMES[m], m, fair) for m, fair in per_round])
    return section


def _seg_client_columns(view: _View) -> list[tuple[str, str, str, bool]]:
    columns = [("val Dice", "val", "dice", False), ("test Dice", "test", "dice", False)]
    for part in _parts(view):
        columns += [(f"test Dice {part}", "test", f"dice_{part}", False), (f"{part} low", "test", f"dice_{part}_lo", False), (f"{part} high", "test", f"dice_{part}_hi", False)]
    if view.attribute:
        columns += [(f"test ES-Dice ({view.attribute})", "test", "es_dice", True), ("test Dice gap", "test", "dice_gap", True)]
    return columns


def _client_dice_figure(view: _View, split: str = "test") -> str:
    """Dice of each region per client with the client's bootstrap interval (<= MANY clients)."""
    order, parts = [*view.clients, MEAN], _parts(view)
    fig, ax, along = _per_client_axes(order, len(parts))
    horizontal = _horizontal(order)
    for i, part in enumerate(parts):
        y = view.cell(split, f"dice_{part}").reindex(order).to_numpy(dtype=float) * 100
        lo = view.cell(split, f"dice_{part}_lo").reindex(order).to_numpy(dtype=float) * 100
        hi = view.cell(split, f"dice_{part}_hi").reindex(order).to_numpy(dtype=float) * 100
        err = np.nan_to_num(np.vstack([np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)]))
        pos = along + np.linspace(-0.2, 0.2, len(parts))[i]
        style = {"fmt": figures.marker(i), "color": figures.color(i), "ms": 6, "capsize": 3, "lw": 1.2, "label": part}
        ax.errorbar(*((y, pos) if horizontal else (pos, y)), **({"xerr": err} if horizontal else {"yerr": err}), **style)
    (ax.set_xlabel if horizontal else ax.set_ylabel)(f"{SPLITS[split]} Dice (x100)")
    figures.legend_outside(ax, title="structure")
    return figures.embed(fig, "client_dice", f"Dice of the optic {', '.join(parts[:-1])} and {parts[-1]} per client at round {view.at} ({split} split), bar: the client's bootstrap interval (none for the mean)")


def _seg_clients_section(view: _View) -> Section:
    section = Section("Clients at the reported round", anchor="clients")
    if view.at is None:
        return section.text("No evaluated round yet.")
    values = pd.DataFrame({label: view.cell(split, metric, fair) for label, split, metric, fair in _seg_client_columns(view)})
    geometry = pd.DataFrame({f"test {SEG_NAMES[m]}": view.cell("test", m) for m in _geometry(view)})
    per_client, shape = values.reindex(view.clients), geometry.reindex(view.clients)
    if view.many:
        section.add(_spread_figure(view, "dice", "Dice", "dice_spread"))
        worst = per_client.dropna(subset=["test Dice"]).sort_values(["test Dice"], kind="stable").head(WORST)
        section.add(figures.table(_cells(worst, view), "worst_clients", f"the {len(worst)} clients with the lowest test Dice at round {view.at} (x100)"))
        both = pd.concat([per_client.drop(columns=[c for c in per_client.columns if c.endswith((" low", " high"))]), shape], axis=1)  # quantiles of interval bounds say nothing
        spread = both.quantile([0.0, 0.1, 0.5, 0.9, 1.0]).rename(index={0.0: "min", 0.1: "10 %", 0.5: "median", 0.9: "90 %", 1.0: "max"})
        section.add(figures.table(spread.apply(lambda c: c.map(percent)).reset_index(names="over clients"), "client_spread", "the distribution over clients (x100)"))
        return section
    section.add(_client_dice_figure(view))
    rows = per_client if MEAN not in values.index else pd.concat([per_client, values.loc[[MEAN]]])
    caption = f"each client and the mean at round {view.at} (x100; low / high: the client's bootstrap interval of its mean Dice, none for the mean)"
    section.add(figures.table(_cells(rows, view), "clients", caption))
    rows = shape if MEAN not in geometry.index else pd.concat([shape, geometry.loc[[MEAN]]])
    section.add(
        figures.table(
            _cells(rows, view), "clients_geometry", f"overlap, boundary and cup-to-disc ratio at round {view.at} (x100; hd95 in % of the image diagonal; lower is better for hd95 and CDR error)"
        )
    )
    return section


def _client_fairness_section(view: _View) -> Section:
    """FL-MedSegBench's client fairness: the worst client and the spread over clients."""
    section = Section("Client fairness", anchor="client_fairness")
    if view.at is None:
        return section.text("No evaluated round yet.")
    section.text(
        f"How the federation's clients fare at round {view.at} (FL-MedSegBench's client-fairness view): the worst client by mean Dice "
        "and the spread of each Dice over the clients (std: population std over all clients, ddof = 0)."
    )
    rows = []
    for split, name in SPLITS.items():
        for metric in ("dice", *(f"dice_{p}" for p in _parts(view))):
            s = client_spread(view.cell(split, metric).reindex(view.clients))
            if s.n:
                rows.append(
                    {
                        "split": name,
                        "metric": SEG_NAMES[metric],
                        "worst client": s.worst,
                        "min": percent(s.min),
                        "median": percent(s.median),
                        "max": percent(s.max),
                        "std": percent(s.std),
                        "clients": str(s.n),
                    }
                )
    if not rows:
        return section.text("No per-client Dice at this round.")
    return section.add(figures.table(pd.DataFrame(rows), "client_fairness", f"worst client and spread over clients at round {view.at} (x100)"))


def _seg_gap_figure(view: _View, split: str = "test") -> str:
    parts = _parts(view)
    series = {SEG_NAMES[m]: view.cell(split, m, fair=True) for m in (*(f"dice_{p}_gap" for p in parts), "dice_gap")}
    if all(s.empty for s in series.values()):
        return ""
    label = f"{view.attribute} Dice gap, {SPLITS[split]} (x100)"
    if view.many:
        fig, ax = figures.new_figure(width=7.5, height=3.4)
        present = view.clients
        ax.boxplot(
            [s.reindex(present).dropna().to_numpy() * 100 for s in series.values()],
            tick_labels=[*parts, "mean of disc and cup"],
            medianprops={"color": "black"},
            flierprops={"markersize": 3, "alpha": 0.5},
        )
        ax.set_ylabel(label)
        return figures.embed(fig, "dice_gaps", f"Dice gap between the best and the worst {view.attribute} group ({split} split) at round {view.at}: the distribution over {len(present)} clients")
    order = [*view.clients, MEAN]
    fig, ax = figures.new_figure(width=min(12.0, 4.5 + 0.3 * len(order) * 3), height=3.6)
    figures.grouped_bars(ax, order, {name: (s.reindex(order).to_numpy(dtype=float), None) for name, s in zip((*parts, "mean of disc and cup"), series.values())}, scale=100)
    ax.set_xlabel("client")
    ax.set_ylabel(label)
    figures.legend_outside(ax, title="Dice gap of")
    return figures.embed(fig, "dice_gaps", f"Dice gap between the best and the worst {view.attribute} group ({split} split) at round {view.at}, per client and the mean (lower is fairer)")


def _seg_fairness_section(view: _View) -> Section:
    section = Section("Fairness across groups", anchor="fairness")
    if not view.attribute:
        return section.text("The source has no sensitive attributes: no per-group Dice, ES-Dice or group gaps.")
    if view.at is None:
        return section.text("No evaluated round yet.")
    section.text(f"Test split at round {view.at}; attribute {view.attribute} (the run's target attribute).")
    section.add(_group_figure(view, metric="dice_disc", what="Dice disc", name="group_dice_disc"))
    section.add(_group_figure(view, metric="dice_cup", what="Dice cup", name="group_dice_cup"))
    if "rim" in _parts(view):
        section.add(_group_figure(view, metric="dice_rim", what="Dice rim", name="group_dice_rim"))
    rows = view.groups[(view.groups["round"] == view.at) & (view.groups["split"] == "test")]
    if not rows.empty:
        wide = rows.pivot_table(index=["client", "group"], columns="metric", values="value", aggfunc="first", sort=False, dropna=False)
        has_interval = "dice_disc_lo" in wide.columns and bool(wide["dice_disc_lo"].notna().any())
        if not has_interval:
            section.text("No bootstrap intervals in this run (eval.bootstrap = 0).")
        keep = [MEAN] if view.many else [*view.clients, MEAN]
        wide = wide[wide.index.get_level_values("client").isin(keep)]
        wide = wide.reindex(sorted(wide.index, key=lambda k: keep.index(k[0])))  # stable: groups keep their code order
        columns: dict[str, pd.Series] = {}
        for part in _parts(view):
            columns[f"Dice {part}"] = wide.get(f"dice_{part}")
            if has_interval:
                columns |= {f"{part} low": wide.get(f"dice_{part}_lo"), f"{part} high": wide.get(f"dice_{part}_hi")}
        columns |= {SEG_NAMES[m]: wide.get(m) for m in _geometry(view)}
        out = pd.DataFrame({k: v for k, v in columns.items() if v is not None}, index=wide.index)
        out = out.apply(lambda c: c.map(percent)).reset_index()
        caption = "per group, each client and the mean (x100; low / high: the client's bootstrap interval, none for the mean; hd95 in % of the image diagonal)"
        section.add(figures.table(out, "group_dice", caption if not view.many else "per group, the mean over clients (x100; hd95 in % of the image diagonal)"))
    section.add(_seg_gap_figure(view))
    gaps = ("es_dice", "es_dice_disc", "es_dice_cup", "dice_gap", "dice_disc_gap", "dice_cup_gap") + (("es_dice_rim", "dice_rim_gap") if "rim" in _parts(view) else ())
    values = pd.DataFrame({SEG_NAMES[m]: view.cell("test", m, fair=True) for m in gaps})
    if not values.empty:
        keep = [MEAN] if view.many else [*view.clients, MEAN]
        values = values.reindex([c for c in keep if c in values.index])
        section.add(
            figures.table(_cells(values, view), "group_gaps", f"equity-scaled Dice and the gap between the best and the worst group, test split at round {view.at} (x100; a lower gap is fairer)")
        )
    m = view.run.metrics
    attributes = m[(m["client"] == MEAN) & (m["round"] == view.at) & (m["split"] == "test") & (m["attribute"] != "") & (m["group"] == "")]
    if not attributes.empty:
        wide = attributes.pivot_table(index="attribute", columns="metric", values="value", aggfunc="first", sort=False)
        out = wide[[c for c in gaps if c in wide.columns]].rename(columns=SEG_NAMES).apply(lambda c: c.map(percent)).reset_index()
        section.add(figures.table(out, "attributes", f"every attribute, mean over clients, test split at round {view.at} (x100)"))
    return section


HOLDOUT_METRICS = {"classification": ("auc", "acc"), "segmentation": ("dice", "dice_disc", "dice_cup"), "joint": ("auc", "acc", "dice", "dice_disc", "dice_cup")}


def _holdout_section(view: _View) -> Section | None:
    """The `eval.holdout_site` (unseen site) per evaluated round next to the participants' mean:
    its rows are in no mean, worst client or spread above."""
    held = holdout_clients(view.run.metrics)
    if not held:
        return None
    rule = (view.run.provenance.get("holdout") or {}).get("scored_with", "its method's newcomer model")
    section = Section("Unseen site", anchor="holdout").text(
        f"{', '.join(held)} never trained (eval.holdout_site): never sampled, never aggregated, in no mean, worst client or spread above; "
        f"scored at each evaluation with {rule}. The reported round is the participants' selection ({view.at})."
    )
    metrics = HOLDOUT_METRICS[view.task]  # a joint run's unseen site is graded and segmented (0.5.0 showed no Dice)
    names = {"auc": "AUC", "acc": "acc", **SEG_NAMES}
    columns: dict[str, pd.Series] = {}
    for split, name in SPLITS.items():
        for metric in metrics:
            table = view.curve(split, metric)
            for client in [*held, MEAN]:
                if client in table.columns:
                    columns[f"{name} {names[metric]} {'participants' if client == MEAN else client}"] = table[client]
    if columns:
        out = pd.DataFrame(columns).sort_index().apply(lambda c: c.map(percent)).reset_index(names="round")
        section.add(figures.table(out, "holdout", "the held-out site and the participants' mean per evaluated round (x100)"))
    return section


# --- the page ------------------------------------------------------------------------------


def build(run: Run) -> str:
    """The report of one run, as an HTML document."""
    view = _view(run)
    if view.task == "segmentation":
        sections = [_run_section(view), _seg_selection_section(view), _seg_performance_section(view), _seg_clients_section(view), _client_fairness_section(view), _seg_fairness_section(view)]
        sections += [_training_section(view)]
        roles = _roles_section(view, "dice", "Dice", SEG_ROLE_ROWS)
    else:
        sections = [_run_section(view), _selection_section(view), _performance_section(view), _clients_section(view), _fairness_section(view)]
        if view.task == "joint":  # segments and grades: the segmentation view after the grading one
            sections += [_seg_performance_section(view), _seg_clients_section(view), _client_fairness_section(view), _seg_fairness_section(view)]
        sections.append(_training_section(view))
        roles = _roles_section(view)
    sections += [s for s in (_holdout_section(view), roles, _privacy_section(view)) if s is not None]
    sections.append(_missing_section(view))
    cfg = run.config
    subtitle = f"{run.algorithm} on {(cfg.get('data') or {}).get('name', '?')}, {len(view.clients)} clients, seed {run.seed}; {run.path}"
    return figures.page(f"raysim run {run.name}", subtitle, sections)


def write_report(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Write the report of the run in `run_dir` (to RUN_DIR/report.html unless `out`); its path."""
    run = read_run(run_dir)
    return figures.write_page(Path(out) if out is not None else run.path / "report.html", build(run))
