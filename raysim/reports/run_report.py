"""The per-run report (`python -m raysim.report RUN_DIR [--out FILE]` writes RUN_DIR/report.html).

One self-contained page (inline PNG figures, no scripts, nothing fetched) read from the run
directory alone (`raysim.outputs.runs.read_run`): the config and provenance in brief; which round is
reported and why (`raysim.outputs.runs.select_round`: model selection on the validation split); mean and
per-client AUC, ES-AUC and accuracy per round; per-group AUC with its bootstrap interval and EOD /
SPD per client at that round (test split); bytes up / down and the training loss per round; the
role means of role runs (FedHelp), ε per round of DP runs, and the clients a run dropped. Above
`MANY` clients every per-client view becomes a distribution (median and 10-90 % band, a box
plot, the worst clients named), so a 1,000-client report stays one page and a few seconds.
Every number in a table is the metrics.parquet value x100 with one decimal (`figures.percent`),
except MB, loss and ε. Plain pandas and matplotlib, no Ray.

A segmentation run (`raysim.outputs.runs.Run.task`: Dice rows, no AUC) gets the same page with Dice in
AUC's place (`raysim.metrics.segmentation`' names): mean and per-client Dice of the optic disc, cup and
neuroretinal rim (the disc without the cup: FairSeg's code -1, which its paper reports beside the
cup; runs written before the rim rows existed show disc and cup) and ES-Dice per round; at the reported round each client's Dice with its bootstrap interval, IoU,
hd95 (a percentage of the image diagonal) and CDR error; FL-MedSegBench's client-fairness view
(the worst client by mean Dice D = (disc + cup) / 2, and min / median / max / std over clients,
computed here from the client rows, never stored); per-group Dice with intervals, ES-Dice and
the group gaps; traffic, loss, roles, ε and missing clients as for classification.

This module assembles the page (which sections a task gets, in which order); the sections are in
`run_sections` (those of every task), `classification_sections` and `segmentation_sections`,
and the view of the run they all read (`MANY`, `WORST`, the shared figures) in `run_view`.
"""

from __future__ import annotations

from pathlib import Path

from raysim.outputs.runs import Run, read_run
from raysim.reports import figures
from raysim.reports.classification_sections import clients_section, fairness_section, performance_section, selection_section
from raysim.reports.run_sections import holdout_section, missing_section, privacy_section, roles_section, run_section, training_section
from raysim.reports.run_view import WORST, view_of
from raysim.reports.segmentation_sections import SEG_NAMES, SEG_ROLE_ROWS, client_fairness_section, seg_clients_section, seg_fairness_section, seg_performance_section, seg_selection_section
from raysim.reports.system_sections import served_section

__all__ = ["SEG_NAMES", "WORST", "build", "write_report"]  # WORST and SEG_NAMES: what the tests read beside the page


def build(run: Run) -> str:
    """The report of one run, as an HTML document."""
    view = view_of(run)
    if view.task == "segmentation":
        sections = [run_section(view), seg_selection_section(view), seg_performance_section(view), seg_clients_section(view), client_fairness_section(view), seg_fairness_section(view)]
        sections += [training_section(view)]
        roles = roles_section(view, "dice", "Dice", SEG_ROLE_ROWS)
    else:
        sections = [run_section(view), selection_section(view), performance_section(view), clients_section(view), fairness_section(view)]
        if view.task == "joint":  # segments and grades: the segmentation view after the grading one
            sections += [seg_performance_section(view), seg_clients_section(view), client_fairness_section(view), seg_fairness_section(view)]
        sections.append(training_section(view))
        roles = roles_section(view)
    sections += [s for s in (holdout_section(view), roles, privacy_section(view), served_section(view)) if s is not None]
    sections.append(missing_section(view))
    cfg = run.config
    subtitle = f"{run.algorithm} on {(cfg.get('data') or {}).get('name', '?')}, {len(view.clients)} clients, seed {run.seed}; {run.path}"
    return figures.page(f"raysim run {run.name}", subtitle, sections)


def write_report(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Write the report of the run in `run_dir` (to RUN_DIR/report.html unless `out`); its path."""
    run = read_run(run_dir)
    return figures.write_page(Path(out) if out is not None else run.path / "report.html", build(run))
