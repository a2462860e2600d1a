"""The run report's classification sections: model selection, AUC / ES-AUC / accuracy per round,
the clients at the reported round, and fairness across the target attribute's groups (per-group
AUC with intervals, EOD and SPD).

A joint run (grades and segments) gets these before `segmentation_sections`' view.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from raysim.outputs.runs import MEAN
from raysim.reports import figures
from raysim.reports.figures import Section, percent
from raysim.reports.run_view import SPLITS, WORST, View, cells, group_figure, horizontal_layout, over_rounds, per_client_axes, per_round_table, spread_figure


def _gap_figure(view: View, split: str = "test") -> str:
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
    fig, ax, along = per_client_axes(order, 2)
    for i, (name, s) in enumerate((("EOD", eod), ("SPD", spd))):
        values = s.reindex(order).to_numpy(dtype=float) * 100
        style = {"color": figures.color(i), "hatch": ("", "//")[i], "edgecolor": "white", "label": name}
        if horizontal_layout(order):
            ax.barh(along - 0.2 + 0.4 * i, values, height=0.4, **style)
        else:
            ax.bar(along - 0.2 + 0.4 * i, values, width=0.4, **style)
    (ax.set_xlabel if horizontal_layout(order) else ax.set_ylabel)(label)
    figures.legend_outside(ax)
    return figures.embed(fig, "eod_spd", f"EOD and SPD ({view.attribute}, {split} split) at round {view.at}, per client and the mean")


def selection_section(view: View) -> Section:
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


def performance_section(view: View) -> Section:
    section = Section("AUC, ES-AUC and accuracy per round", anchor="rounds")
    section.add(over_rounds(view, "auc", "AUC", "AUC (x100)"))
    if view.attribute:
        section.add(over_rounds(view, "es_auc", f"ES-AUC ({view.attribute})", f"ES-AUC {view.attribute} (x100)", fair=True))
    else:
        section.text("No ES-AUC: the source has no sensitive attributes.")
    section.add(over_rounds(view, "acc", "Accuracy", "accuracy (x100)"))
    per_round_table(section, view, (("AUC", "auc", False), ("ES-AUC", "es_auc", True), ("acc", "acc", False), ("bacc", "bacc", False)))
    return section


def clients_section(view: View) -> Section:
    section = Section("Clients at the reported round", anchor="clients")
    if view.at is None:
        return section.text("No evaluated round yet.")
    columns = [("val AUC", "val", "auc", False), ("test AUC", "test", "auc", False), ("test acc", "test", "acc", False)]
    if view.attribute:
        columns += [(f"test ES-AUC ({view.attribute})", "test", "es_auc", True), ("test EOD", "test", "eod", True), ("test SPD", "test", "spd", True)]
    values = pd.DataFrame({label: view.cell(split, metric, fair) for label, split, metric, fair in columns})
    per_client = values.reindex(view.clients)
    if view.many:
        section.add(spread_figure(view))
        worst = per_client.dropna(subset=["test AUC"]).sort_values(["test AUC"], kind="stable").head(WORST)
        section.add(figures.table(cells(worst, view), "worst_clients", f"the {len(worst)} clients with the lowest test AUC at round {view.at} (x100)"))
        spread = per_client.quantile([0.0, 0.1, 0.5, 0.9, 1.0]).rename(index={0.0: "min", 0.1: "10 %", 0.5: "median", 0.9: "90 %", 1.0: "max"})
        section.add(figures.table(spread.apply(lambda c: c.map(percent)).reset_index(names="over clients"), "client_spread", "the distribution over clients (x100)"))
    else:
        rows = per_client if MEAN not in values.index else pd.concat([per_client, values.loc[[MEAN]]])
        section.add(figures.table(cells(rows, view), "clients", f"each client and the mean at round {view.at} (x100)"))
    return section


def fairness_section(view: View) -> Section:
    section = Section("Fairness", anchor="fairness")
    if not view.attribute:
        return section.text("The source has no sensitive attributes: no per-group AUC, ES-AUC, EOD or SPD.")
    if view.at is None:
        return section.text("No evaluated round yet.")
    section.text(f"Test split at round {view.at}; attribute {view.attribute} (the run's target attribute).")
    section.add(group_figure(view))
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
