"""`python -m raysim.tune`: a Ray Tune study over any config key; each trial is one federated run.

    python -m raysim.tune tune_configs/fairlora_rank_lr.yaml --num-samples 2
    python -m raysim.tune tune_configs/segmentation_lr.yaml --num-samples 2   # objective dice - 0.5*dice_gap
    python -m raysim.tune STUDY.yaml --out studies/lr --resume     # continue an interrupted study (Ctrl-C exits 130)

A study file names a base config (preset or YAML file + overrides), a search space over config
keys, an objective over validation metrics of the mean-over-clients row, the scheduler (ASHA on
rounds by default) and the search algorithm. The objective names metrics that the base config's
task writes (`raysim.client.tasks`: the model decides; `raysim.engine.study.OBJECTIVE_METRICS` lists them): `auc - 0.5*eod`
for classification, `dice - 0.5*dice_gap` or `es_dice` for segmentation (`--config
segmentation`, `model.name=unet:<encoder>`; FairSeg's regions, rim and cup, as `dice_rim`,
`es_dice_rim`, `dice_rim_gap`, `dice_cup`, ...); a metric the task does not write is refused before
any trial. Every evaluated round is reported to Tune with the run directory as the checkpoint,
so trials resume. The study directory gets Tune's results (with TensorBoard event files),
`trials.parquet` / `trials.csv` and `best.yaml`, a complete config that `python -m raysim.run
--config best.yaml` reruns, and `report.html` (`python -m raysim.compare STUDY_DIR` rebuilds
it); the trials write no report of their own.

This module parses the arguments, checks them and prints; the study file and objective are
`raysim.engine.study` (plain Python), the trials, the Tuner and the outputs `raysim.engine.tune`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from pathlib import Path
from typing import Any

from raysim import cli
from raysim.config import ConfigError
from raysim.datasets import DataError
from raysim.engine import tune as study_tune
from raysim.engine.study import Study, load_study

EXIT_BAD_INPUT = cli.EXIT_BAD_INPUT
EXIT_INTERRUPTED = 130  # the shell convention for Ctrl-C


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m raysim.tune", description=__doc__.splitlines()[0].split("`: ", 1)[-1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", type=Path, help="study YAML (see tune_configs/)")
    parser.add_argument("--num-samples", type=int, help="trials to sample (default: the study's num_samples, else 4)")
    parser.add_argument("--out", help="study directory: a path every node reaches, or a pyarrow.fs URI (default studies/<time>-<study>)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted study in --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = args.out or str(Path("studies") / f"{dt.datetime.now():%Y%m%d-%H%M%S}-{args.study.stem}")
    started: list[Any] = []  # (study, experiment, tuner) once every input is checked
    code = cli.guard(lambda: _start(args, out, started), (ConfigError, DataError), outs=[] if args.resume else [out])
    if not started:
        return code
    study, experiment, ready = started
    return _finish(args, out, study, experiment, ready.fit())  # outside the guard: a failure now is no bad input, and the study directory stays


def _start(args: argparse.Namespace, out: str, started: list[Any]) -> int:
    """Check every input and build the Tuner (a ConfigError / DataError for bad input)."""
    study = load_study(args.study, num_samples=args.num_samples)
    if args.resume and not args.out:
        raise ConfigError("--resume needs --out STUDY_DIR (the study to continue)")
    cli.check_out_dir(out)
    if not args.resume and "://" not in out and Path(out).exists() and any(Path(out).iterdir()):
        raise ConfigError(f"--out {out} is not empty; choose a new directory or continue it with --resume")
    experiment = out if "://" in out else str(Path(out).resolve())
    if args.resume:
        study_tune.check_resumable(experiment, out)
    print(f"study {study.path.name}: {len(study.space)} searched key(s), objective {study.objective.text} ({study.mode}) on val, {study.num_samples} sample(s)")
    started.extend((study, experiment, study_tune.prepare(study, experiment, resume=args.resume)))
    return 0


def _finish(args: argparse.Namespace, out: str, study: Study, experiment: str, results: Any) -> int:
    """The study's outputs and summary, once Tune has run."""
    table = study_tune.trials_table(results, study, experiment)
    best = study_tune.write_outputs(out, study, table)
    report = study_tune.write_report(out, study)
    from raysim.reports.study import TEST_COLUMNS

    shown = [c for c in ("trial_id", "status", *study.space, "best_round", "objective", *TEST_COLUMNS.get(study.task, {})) if c in table]
    print(table[shown].to_string(index=False))
    if best is None:
        print("no trial reported a finite objective; see the errors above", file=sys.stderr)
    print(f"wrote trials.parquet, trials.csv, best.yaml (python -m raysim.run --config best.yaml){', report.html' if report else ''} and Tune's results (tensorboard --logdir) in:")
    print(out)
    if study_tune.unfinished(table):
        print(f"study interrupted: {study_tune.unfinished(table)} of {len(table)} trial(s) unfinished, best.yaml is the best so far; "
              f"continue with: python -m raysim.tune {args.study} --out {out} --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0 if best is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
