"""The run report's sections every task's page has: the run in brief, training traffic and loss,
role means, privacy spent, missing clients and the unseen (held-out) site.

Apart from the task's own sections (`classification_sections`, `segmentation_sections`): these
read only what every run records (config, provenance, train rows, server rows), whatever it scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from raysim.outputs.runs import MEAN, clients, holdout_clients
from raysim.reports import figures
from raysim.reports.figures import Section, percent
from raysim.reports.run_view import SPLITS, View, over_rounds
from raysim.reports.segmentation_sections import SEG_NAMES

MB = 1e6


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


def run_section(view: View) -> Section:
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


def training_section(view: View) -> Section:
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
        section.add(over_rounds(view, "loss", "Training loss", "training loss", splits=("train",), scale=1.0).replace('data-plot="loss"', 'data-plot="train_loss"'))
        if MEAN in loss.columns:
            out = pd.DataFrame({"mean loss": loss[MEAN].map(lambda v: f"{v:.4f}")}).reset_index(names="round")
            section.add(figures.table(out, "train_loss", "mean over clients"))
    return section


ROLE_ROWS = (("val AUC", "val", "auc"), ("test AUC", "test", "auc"), ("test acc", "test", "acc"))


def roles_section(view: View, metric: str = "auc", what: str = "AUC", rows_of: Sequence[tuple[str, str, str]] = ROLE_ROWS) -> Section | None:
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


def privacy_section(view: View) -> Section | None:
    m = view.run.metrics
    server = m[(m["client"] == "server") & m["metric"].isin(["epsilon", "delta"])]
    if not (server["metric"] == "epsilon").any():
        return None
    wide = server.pivot_table(index="round", columns="metric", values="value", aggfunc="first").sort_index()
    section = Section("Privacy", anchor="privacy").text("The privacy spent so far after each round (the method's accountant; client `server` rows).")
    section.add(_line_figure(wide[["epsilon"]].rename(columns={"epsilon": "ε"}), "epsilon", "ε spent per round (cumulative)", "ε (cumulative)"))
    out = wide.apply(lambda c: c.map(lambda v: f"{v:.4g}")).reset_index()
    return section.add(figures.table(out, "privacy", "ε and δ after each round"))


def missing_section(view: View) -> Section:
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


HOLDOUT_METRICS = {"classification": ("auc", "acc"), "segmentation": ("dice", "dice_disc", "dice_cup"), "joint": ("auc", "acc", "dice", "dice_disc", "dice_cup")}


def holdout_section(view: View) -> Section | None:
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
