"""The run report's segmentation sections (`Run.task` segmentation, and a joint run's second half).

Dice of the optic disc and cup instead of AUC (`raysim.metrics.segmentation`'s names and
conventions); "dice" is D, the mean of the disc and cup Dice (the selection metric): model
selection, Dice and ES-Dice per round, the clients at the reported round (Dice with intervals,
IoU, hd95, CDR error), FL-MedSegBench's client fairness, and fairness across groups (per-group
Dice, ES-Dice, the group gaps). Apart from the classification sections: they change with the
segmentation metrics, not with AUC's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from raysim.outputs.runs import MEAN, client_spread
from raysim.reports import figures
from raysim.reports.figures import Section, percent
from raysim.reports.run_view import SPLITS, WORST, View, cells, group_figure, horizontal_layout, over_rounds, per_client_axes, per_round_table, spread_figure

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
    "Dice is the mean of the disc and cup Dice (raysim.metrics.segmentation' D); ES-Dice is equity-scaled D over the groups of the target attribute; "
    "hd95 is the 95th percentile Hausdorff distance as a percentage of the image diagonal (lower is better); "
    "CDR error is |vertical cup-to-disc ratio predicted - true| (x100, lower is better; each region's largest connected component). "
    "The rim is the disc without the cup."
)
FAIRSEG_NOTE = (
    "FairSeg: mask code -1 is the neuroretinal rim and -2 the cup; FairSeg's evaluation reports rim and cup, so compare its Dice and IoU with "
    "Dice rim / Dice cup here (Dice disc is rim + cup). FairSeg reports medpy's HD95 in pixels at its own image size; raysim's hd95 is "
    "MONAI's form as a percentage of the image diagonal, so the two are not comparable without rescaling."
)


def _parts(view: View) -> tuple[str, ...]:
    """The regions the run scored: disc and cup, and the rim in runs that write its rows."""
    return ("disc", "cup", "rim") if "dice_rim" in view.overall.columns else ("disc", "cup")


def _geometry(view: View) -> tuple[str, ...]:
    return GEOMETRY + (RIM_GEOMETRY if "rim" in _parts(view) else ())


def _seg_notes(view: View) -> str:
    fairseg = (view.run.config.get("data") or {}).get("name") == "fairseg"
    return SEG_NOTE + (" " + FAIRSEG_NOTE if fairseg else "")


def seg_selection_section(view: View) -> Section:
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


def seg_performance_section(view: View) -> Section:
    section = Section("Dice and ES-Dice per round", anchor="rounds")
    section.add(over_rounds(view, "dice_disc", "Dice of the optic disc", "Dice disc (x100)"))
    section.add(over_rounds(view, "dice_cup", "Dice of the optic cup", "Dice cup (x100)"))
    if "rim" in _parts(view):
        section.add(over_rounds(view, "dice_rim", "Dice of the neuroretinal rim (the disc without the cup)", "Dice rim (x100)"))
    if view.attribute:
        section.add(over_rounds(view, "es_dice", f"ES-Dice ({view.attribute})", f"ES-Dice {view.attribute} (x100)", fair=True))
    else:
        section.text("No ES-Dice: the source has no sensitive attributes.")
    per_round = [("dice", False), *((f"dice_{p}", False) for p in _parts(view)), ("es_dice", True), ("cdr_error", False)]
    per_round_table(section, view, [(SEG_NAMES[m], m, fair) for m, fair in per_round])
    return section


def _seg_client_columns(view: View) -> list[tuple[str, str, str, bool]]:
    columns = [("val Dice", "val", "dice", False), ("test Dice", "test", "dice", False)]
    for part in _parts(view):
        columns += [(f"test Dice {part}", "test", f"dice_{part}", False), (f"{part} low", "test", f"dice_{part}_lo", False), (f"{part} high", "test", f"dice_{part}_hi", False)]
    if view.attribute:
        columns += [(f"test ES-Dice ({view.attribute})", "test", "es_dice", True), ("test Dice gap", "test", "dice_gap", True)]
    return columns


def _client_dice_figure(view: View, split: str = "test") -> str:
    """Dice of each region per client with the client's bootstrap interval (<= MANY clients)."""
    order, parts = [*view.clients, MEAN], _parts(view)
    fig, ax, along = per_client_axes(order, len(parts))
    horizontal = horizontal_layout(order)
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
    return figures.embed(
        fig, "client_dice", f"Dice of the optic {', '.join(parts[:-1])} and {parts[-1]} per client at round {view.at} ({split} split), bar: the client's bootstrap interval (none for the mean)"
    )


def seg_clients_section(view: View) -> Section:
    section = Section("Clients at the reported round", anchor="clients")
    if view.at is None:
        return section.text("No evaluated round yet.")
    values = pd.DataFrame({label: view.cell(split, metric, fair) for label, split, metric, fair in _seg_client_columns(view)})
    geometry = pd.DataFrame({f"test {SEG_NAMES[m]}": view.cell("test", m) for m in _geometry(view)})
    per_client, shape = values.reindex(view.clients), geometry.reindex(view.clients)
    if view.many:
        section.add(spread_figure(view, "dice", "Dice", "dice_spread"))
        worst = per_client.dropna(subset=["test Dice"]).sort_values(["test Dice"], kind="stable").head(WORST)
        section.add(figures.table(cells(worst, view), "worst_clients", f"the {len(worst)} clients with the lowest test Dice at round {view.at} (x100)"))
        both = pd.concat([per_client.drop(columns=[c for c in per_client.columns if c.endswith((" low", " high"))]), shape], axis=1)  # quantiles of interval bounds say nothing
        spread = both.quantile([0.0, 0.1, 0.5, 0.9, 1.0]).rename(index={0.0: "min", 0.1: "10 %", 0.5: "median", 0.9: "90 %", 1.0: "max"})
        section.add(figures.table(spread.apply(lambda c: c.map(percent)).reset_index(names="over clients"), "client_spread", "the distribution over clients (x100)"))
        return section
    section.add(_client_dice_figure(view))
    rows = per_client if MEAN not in values.index else pd.concat([per_client, values.loc[[MEAN]]])
    caption = f"each client and the mean at round {view.at} (x100; low / high: the client's bootstrap interval of its mean Dice, none for the mean)"
    section.add(figures.table(cells(rows, view), "clients", caption))
    rows = shape if MEAN not in geometry.index else pd.concat([shape, geometry.loc[[MEAN]]])
    section.add(
        figures.table(
            cells(rows, view), "clients_geometry", f"overlap, boundary and cup-to-disc ratio at round {view.at} (x100; hd95 in % of the image diagonal; lower is better for hd95 and CDR error)"
        )
    )
    return section


def client_fairness_section(view: View) -> Section:
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


def _seg_gap_figure(view: View, split: str = "test") -> str:
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


def seg_fairness_section(view: View) -> Section:
    section = Section("Fairness across groups", anchor="fairness")
    if not view.attribute:
        return section.text("The source has no sensitive attributes: no per-group Dice, ES-Dice or group gaps.")
    if view.at is None:
        return section.text("No evaluated round yet.")
    section.text(f"Test split at round {view.at}; attribute {view.attribute} (the run's target attribute).")
    section.add(group_figure(view, metric="dice_disc", what="Dice disc", name="group_dice_disc"))
    section.add(group_figure(view, metric="dice_cup", what="Dice cup", name="group_dice_cup"))
    if "rim" in _parts(view):
        section.add(group_figure(view, metric="dice_rim", what="Dice rim", name="group_dice_rim"))
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
            figures.table(cells(values, view), "group_gaps", f"equity-scaled Dice and the gap between the best and the worst group, test split at round {view.at} (x100; a lower gap is fairer)")
        )
    m = view.run.metrics
    attributes = m[(m["client"] == MEAN) & (m["round"] == view.at) & (m["split"] == "test") & (m["attribute"] != "") & (m["group"] == "")]
    if not attributes.empty:
        wide = attributes.pivot_table(index="attribute", columns="metric", values="value", aggfunc="first", sort=False)
        out = wide[[c for c in gaps if c in wide.columns]].rename(columns=SEG_NAMES).apply(lambda c: c.map(percent)).reset_index()
        section.add(figures.table(out, "attributes", f"every attribute, mean over clients, test split at round {view.at} (x100)"))
    return section
