"""The run report's "Who was served" section: a run on the simulated clock (`system.simulate`),
read from its train rows (`sim_time`, `participated`, `participation_rate(_cum)`, `staleness`)
and its validation rows against simulated time."""

from __future__ import annotations

import numpy as np
import pandas as pd

from raysim.outputs.runs import MEAN
from raysim.reports import figures
from raysim.reports.figures import Section, percent
from raysim.reports.run_view import View

TARGETS = (0.6, 0.7, 0.8, 0.9)  # mean validation AUC levels the time-to-target table reports


def sim_times(metrics: pd.DataFrame) -> pd.Series:
    """round -> the round's simulated end (seconds); empty for a run without the clock."""
    rows = metrics[(metrics["metric"] == "sim_time") & (metrics["client"] == "server")]
    return rows.groupby("round")["value"].first().sort_index()


def time_unit(last_seconds: float) -> tuple[float, str]:
    """(divisor, name) for an axis of simulated time: minutes up to 2 hours, hours beyond."""
    return (60.0, "minutes") if last_seconds < 7200 else (3600.0, "hours")


def time_to_target(times: pd.Series, auc: pd.Series, target: float) -> float:
    """The first simulated time at which the mean validation AUC reaches `target` (NaN: never)."""
    reached = auc[auc >= target]
    return float(times.get(reached.index.min(), np.nan)) if not reached.empty else float("nan")


def served_section(view: View) -> Section | None:
    m = view.run.metrics
    times = sim_times(m)
    if times.empty:
        return None
    train = m[m["split"] == "train"]
    section = Section("Who was served", anchor="served").text(
        f"Simulated time (system.simulate): {len(times)} rounds in {_duration(times.iloc[-1])} of simulated time. "
        "participation_rate = the share of a group's training patients whose site's update was accepted in the round; "
        "its cumulative mean says which groups the federation actually trained on."
    )
    scale, unit = time_unit(float(times.iloc[-1]))
    cum = train[(train["metric"] == "participation_rate_cum") & (train["attribute"] == view.attribute)]
    if not cum.empty:
        wide = cum.pivot_table(index="round", columns="group", values="value", aggfunc="first").sort_index()
        fig, ax = figures.new_figure(width=7.6, height=3.4)
        for i, group in enumerate(wide.columns):
            ax.plot(times.reindex(wide.index) / scale, wide[group] * 100, color=figures.color(i), marker=figures.marker(i), ls=figures.linestyle(i), ms=5, label=str(group))
        ax.set_xlabel(f"simulated time ({unit})")
        ax.set_ylabel(f"participation, cumulative (%), {view.attribute}")
        figures.legend_outside(ax)
        section.add(figures.embed(fig, "participation", f"Cumulative participation rate per {view.attribute} group against simulated time"))
        last = wide.iloc[-1]
        section.add(figures.table(pd.DataFrame({"group": last.index, "participation, cumulative": [percent(v) for v in last]}), "participation", f"at round {wide.index[-1]} (x100)"))
    section.add(_clients_table(train))
    auc = view.curve("val", "auc")
    if MEAN in auc.columns:
        mean_auc = auc[MEAN].dropna()
        rows = [(f"{t:.2f}", _duration(time_to_target(times, mean_auc, t))) for t in TARGETS]
        section.add(figures.table(pd.DataFrame(rows, columns=["mean val AUC reaches", "at simulated time"]), "time_to_target", "time to target"))
        fair = view.curve("val", "es_auc", fair=True)
        fig, ax = figures.new_figure(width=7.6, height=3.4)
        ax.plot(times.reindex(mean_auc.index) / scale, mean_auc * 100, color="#000000", marker="o", ms=5, lw=2.4, label="mean val AUC")
        if MEAN in fair.columns:
            es = fair[MEAN].dropna()
            ax.plot(times.reindex(es.index) / scale, es * 100, color=figures.color(1), marker=figures.marker(1), ls="--", ms=5, label=f"mean val ES-AUC ({view.attribute})")
        ax.set_xlabel(f"simulated time ({unit})")
        ax.set_ylabel("x100")
        figures.legend_outside(ax)
        section.add(figures.embed(fig, "fairness_time", "Mean validation AUC and ES-AUC against simulated time"))
    return section


def _clients_table(train: pd.DataFrame) -> str:
    took = train[train["metric"] == "participated"].groupby("client")["value"].agg(["sum", "count"])
    stale = train[train["metric"] == "staleness"].groupby("client")["value"].mean()
    out = pd.DataFrame({"client": took.index, "rounds served": took["sum"].astype(int).to_numpy(), "of rounds": took["count"].astype(int).to_numpy()})
    out["share"] = [percent(s / c) if c else "-" for s, c in zip(took["sum"], took["count"])]
    if not stale.empty:
        out["mean staleness"] = [f"{stale.get(c, np.nan):.2f}" for c in took.index]
    return figures.table(out, "served_clients", "rounds in which each client's update was accepted")


def _duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "not reached"
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds:.1f} s"
