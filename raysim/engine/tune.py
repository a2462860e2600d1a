"""Ray Tune's side of a study (`raysim.tune`): the trial function, its placement group, the
Tuner with its scheduler and searcher, and the study's outputs read back from Tune's results.

`run_trial` is what Ray Tune runs (and pickles by reference): one federated run in its own
driver actor, reporting every evaluated round with the run directory as the checkpoint, so
trials resume. `bundles` sizes a trial's placement group with the driver's own plan
(`placement.actor_count`). `trials_table` / `write_outputs` / `write_report` turn the results
into trials.parquet, trials.csv, best.yaml and report.html. Apart from `raysim.engine.study` (the
study file and objective, plain Python) because Ray lives in the engine layer only.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from raysim import cli
from raysim import config as config_mod
from raysim.config import ConfigError, ExperimentConfig
from raysim.engine.placement import Capacity, actor_count
from raysim.engine.study import Study, report_row, task_of

log = logging.getLogger("raysim.tune")  # the name a study's log lines have always carried
DRIVER_CPU = 0.1  # the trial function (it streams the driver actor's progress); bundle 0 adds resources.driver_cpus for that actor


# --- Tune wiring ----------------------------------------------------------------------------


def search_space(study: Study) -> dict[str, Any]:
    from ray import tune

    makers = {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint, "choice": tune.choice, "grid_search": tune.grid_search}
    out = {}
    for key, spec in study.space.items():
        kind, args = next(iter(spec.items()))
        out[key] = makers[kind](args) if kind in ("choice", "grid_search") else makers[kind](*args)
    return out


@lru_cache(maxsize=32)
def _client_count(data_yaml: str, algorithm_yaml: str, img_size: int, seed: int) -> int:
    from raysim.algorithms import build as build_algorithm
    from raysim.datasets import DATASETS

    cfg = config_mod.from_dict({"data": config_mod.load_yaml(data_yaml), "algorithm": config_mod.load_yaml(algorithm_yaml), "model": {"img_size": img_size}, "seed": seed})
    source = DATASETS.get(cfg.data.name)(cfg.data, img_size=img_size, seed=seed)
    return len(build_algorithm(cfg).arrange_clients(source.client_specs()))


def client_count(cfg: ExperimentConfig) -> int:
    """The run's clients (read once per data / method config, then cached)."""
    return _client_count(yaml.safe_dump(cfg.to_dict()["data"]), yaml.safe_dump(cfg.algorithm), cfg.model.img_size, cfg.seed)


def trial_share(study: Study, cluster: Mapping[str, float]) -> Capacity:
    """What one trial's driver and client actors may use: the cluster's resources (as they
    are when the study starts) divided by `max_concurrent_trials` (unset: the whole cluster),
    less the trial function's own bundle. Tune packs as many trials as fit."""
    total = Capacity.of(cluster)
    concurrent = study.max_concurrent_trials or 1
    return Capacity(total.cpus / concurrent - DRIVER_CPU, total.gpus / concurrent)


def bundles(cfg: ExperimentConfig, share: Capacity) -> list[dict[str, float]]:
    """The trial's placement group: the driver's bundle + one per client actor, as many as
    `placement.actor_count` gives for the trial's `share` (the driver fills exactly these)."""
    res = cfg.resources
    n = actor_count(client_count(cfg), res, share)
    actor = {"CPU": res.actor_cpus} | ({"GPU": float(res.num_gpus)} if res.num_gpus else {})
    driver = {"CPU": DRIVER_CPU + res.driver_cpus} | ({"GPU": float(res.driver_gpus)} if res.driver_gpus else {})
    return [driver] + [dict(actor) for _ in range(n)]


def run_trial(values: dict[str, Any], study: Study) -> None:
    """One federated run, round by round, reporting every evaluated round (runs inside Tune)."""
    import ray
    from ray import tune
    from ray.util import get_current_placement_group

    from raysim.engine import driver_actor
    from raysim.engine.driver import latest_checkpoint

    cfg = study.config({**values, "report.html": False})  # one report per study (STUDY_DIR/report.html), none per trial
    run_dir = Path(os.getcwd()).resolve() / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as saved:
            shutil.copytree(saved, run_dir)
    else:
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(config_mod.dump(cfg))
    resume = latest_checkpoint(run_dir) is not None
    task = task_of(cfg)
    # The rounds run in the trial's driver actor, in bundle 0 of its placement group (grown by
    # resources.driver_cpus); its client actors take bundles 1..n.
    actor = driver_actor.start(cfg, run_dir, placement_group=get_current_placement_group())
    # Tune copies a reported directory after the report, while the driver goes on: it reports the
    # driver's snapshot of the run directory as of that round (hard links), removed once copied.
    snapshots = run_dir.parent / "snapshots"
    shutil.rmtree(snapshots, ignore_errors=True)
    try:
        for event in driver_actor.stream(actor, resume=resume, silence_s=cfg.fault.driver_timeout_s, snapshots=str(snapshots)):
            for line in event.lines:
                log.info("%s", line)
            if event.evaluated is not None:  # every evaluated round (eval.every and the last)
                row = report_row(event.evaluated, event.round, event.attribute, study.objective, task)
                tune.report(row, checkpoint=tune.Checkpoint.from_directory(str(event.snapshot)))  # persisted before report returns
                shutil.rmtree(str(event.snapshot), ignore_errors=True)
    finally:
        ray.kill(actor)


def _scheduler(study: Study, rounds: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    options = {k: v for k, v in study.scheduler.items() if k != "name"}
    if study.scheduler["name"] == "fifo":
        return FIFOScheduler()
    options.setdefault("grace_period", 1)
    options.setdefault("max_t", rounds)
    try:
        return ASHAScheduler(time_attr="round", **options)
    except TypeError as err:
        raise ConfigError(f"{study.path}: scheduler options {options}: {err}") from err


def _searcher(study: Study) -> Any:
    try:
        return _make_searcher(study)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{study.path}: search options {study.search}: {cli.one_line(err)}") from None


def _make_searcher(study: Study) -> Any:
    options = {k: v for k, v in study.search.items() if k != "name"}
    if study.search["name"] == "random":
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(**options)
    try:
        import optuna  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"{study.path}: search optuna needs the optuna package (pip install optuna); or use search: random") from err
    if any("grid_search" in spec for spec in study.space.values()):
        raise ConfigError(f"{study.path}: search optuna cannot sample grid_search; use choice")
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(**options)


def tuner(study: Study, out: str, *, resume: bool) -> Any:
    import ray
    from ray import tune

    cfg = study.config()
    share = trial_share(study, ray.cluster_resources())
    bundles(cfg, share)  # a base config whose pool does not fit fails here, before Tune starts
    trainable = tune.with_parameters(run_trial, study=study)
    trainable = tune.with_resources(trainable, lambda values: tune.PlacementGroupFactory(bundles(study.config(values), share), strategy="PACK"))
    if resume:
        return tune.Tuner.restore(out, trainable=trainable, resume_unfinished=True, resume_errored=True)
    storage, name = _split_out(out)
    return tune.Tuner(
        trainable,
        param_space=search_space(study),
        tune_config=tune.TuneConfig(
            metric="objective",
            mode=study.mode,
            num_samples=study.num_samples,
            scheduler=_scheduler(study, cfg.federation.rounds),
            search_alg=_searcher(study),
            max_concurrent_trials=study.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            # A failed trial (its process or node lost) starts again from its last checkpoint.
            failure_config=tune.FailureConfig(max_failures=cfg.fault.max_restarts),
            verbose=1,
        ),
    )


def _split_out(out: str) -> tuple[str, str]:
    """(storage_path, experiment name) of a local path or a pyarrow.fs URI such as s3://bucket/studies/lr."""
    if "://" in out:
        parent, _, name = out.rstrip("/").rpartition("/")
        return parent, name
    path = Path(out).resolve()
    return str(path.parent), path.name


def check_resumable(experiment: str, out: str) -> None:
    """A ConfigError unless `experiment` holds a Tune experiment that `--resume` can continue."""
    from ray import tune

    if not tune.Tuner.can_restore(experiment):  # no cluster needed to look
        raise ConfigError(f"--resume {out}: no Tune experiment there to continue")


def prepare(study: Study, experiment: str, *, resume: bool) -> Any:
    """Everything a study needs before its trials, then its Tuner (a ConfigError / DataError for bad input)."""
    from raysim.algorithms import with_backbone
    from raysim.engine.driver import connect_ray

    base = study.config()
    _scheduler(study, base.federation.rounds), _searcher(study)  # their options, checked before Ray starts
    client_count(base)  # reads the clients once (and generates the synthetic set) before trials race for it
    with_backbone(base)  # builds a missing pretrained backbone once, before the trials
    connect_ray(object_store_gb=base.resources.object_store_gb)
    return tuner(study, experiment, resume=resume)


# --- outputs --------------------------------------------------------------------------------


def trials_table(results: Any, study: Study, experiment: str) -> pd.DataFrame:
    """One row per trial: searched values, best and final validation metrics, test at the best round."""
    rows = []
    rounds = study.config().federation.rounds
    sign = 1 if study.mode == "max" else -1
    for result, status in zip(results, trial_statuses(results, experiment)):
        history = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
        row: dict[str, Any] = {"trial_id": (result.metrics or {}).get("trial_id", ""), "status": status}
        row |= {key: (result.config or {}).get(key) for key in study.space}
        if len(history) and "objective" in history:
            scores = sign * history["objective"].astype(float)
            best = history.loc[scores.fillna(-math.inf).idxmax()]
            last = history.iloc[-1]
            row |= {"rounds_done": int(last["round"]), "stopped_early": int(last["round"]) < rounds, "best_round": int(best["round"]), "objective": float(best["objective"])}
            row |= {f"{k}": float(best[k]) for k in history if k.startswith(("val_", "test_"))}
            row |= {"final_objective": float(last["objective"])} | {f"final_{k}": float(last[k]) for k in history if k.startswith("val_")}
        rows.append(row)
    frame = pd.DataFrame(rows)
    if "objective" in frame:
        frame = frame.sort_values("objective", ascending=study.mode == "min", na_position="last", ignore_index=True)
    return frame


def trial_statuses(results: Any, experiment: str) -> list[str]:
    """Each trial's status as Tune saved it: TERMINATED, ERROR, or PENDING / RUNNING when an
    interruption (Ctrl-C) left it unfinished. The statuses `fit()` returns say TERMINATED
    for those too (Tune stops them after saving), so they are read back from the saved state.
    A trial with an error in `fit()`'s results is ERROR whatever was saved: when its process
    died once more than max_failures allows, Tune 2.60 saves its last RUNNING state, which
    reads back as PENDING (an unfinished trial) although it failed."""
    from ray.tune import ExperimentAnalysis

    saved = {Path(trial.path).name: str(trial.status) for trial in ExperimentAnalysis(experiment).trials}
    return ["ERROR" if result.error else saved.get(Path(result.path).name, "TERMINATED") for result in results]


def unfinished(table: pd.DataFrame) -> int:
    """Trials an interruption left neither terminated nor errored: `--resume` continues them."""
    return int((~table["status"].isin(["TERMINATED", "ERROR"])).sum()) if "status" in table else 0


def write_outputs(out: str, study: Study, table: pd.DataFrame) -> ExperimentConfig | None:
    """trials.parquet, trials.csv and best.yaml in the study directory (local or a pyarrow.fs URI)."""
    _write(out, "trials.parquet", table.to_parquet(index=False))
    _write(out, "trials.csv", table.to_csv(index=False).encode())
    scored = table.dropna(subset=["objective"]) if "objective" in table else table.iloc[0:0]
    if scored.empty:
        return None
    best = study.config({k: _plain(scored.iloc[0][k]) for k in study.space})
    header = f"# best trial {scored.iloc[0]['trial_id']} of {study.path.name}: objective {study.objective.text} = {scored.iloc[0]['objective']:.4f} (val, round {scored.iloc[0]['best_round']})\n"
    _write(out, "best.yaml", (header + config_mod.dump(best)).encode())
    return best


def write_report(out: str, study: Study) -> bool:
    """STUDY_DIR/report.html (raysim.reports.study: trials, objective per parameter, ASHA picture,
    best config), once per study; a local study directory only. A report that fails is logged:
    the study's results are already written."""
    if "://" in out:
        return False
    from raysim.reports import study as study_report

    try:
        study_report.write(Path(out), space=study.space, task=study.task)
    except (OSError, ValueError, KeyError) as err:
        log.warning("report.html not written: %s", err)
        return False
    return True


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _write(out: str, name: str, data: bytes) -> None:
    if "://" in out:
        import pyarrow.fs

        fs, root = pyarrow.fs.FileSystem.from_uri(out)
        with fs.open_output_stream(f"{root.rstrip('/')}/{name}") as stream:
            stream.write(data)
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / name).write_bytes(data)
