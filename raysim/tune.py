"""`python -m raysim.tune`: a Ray Tune study over any config key; each trial is one federated run.

    python -m raysim.tune tune_configs/fairlora_rank_lr.yaml --num-samples 2
    python -m raysim.tune tune_configs/segmentation_lr.yaml --num-samples 2   # objective dice - 0.5*dice_gap
    python -m raysim.tune STUDY.yaml --out studies/lr --resume     # continue an interrupted study (Ctrl-C exits 130)

A study file names a base config (preset or YAML file + overrides), a search space over config
keys, an objective over validation metrics of the mean-over-clients row, the scheduler (ASHA on
rounds by default) and the search algorithm. The objective names metrics that the base config's
task writes (`raysim.tasks`: the model decides; `OBJECTIVE_METRICS` lists them): `auc - 0.5*eod`
for classification, `dice - 0.5*dice_gap` or `es_dice` for segmentation (`--config
segmentation`, `model.name=unet:<encoder>`; FairSeg's regions, rim and cup, as `dice_rim`,
`es_dice_rim`, `dice_rim_gap`, `dice_cup`, ...); a metric the task does not write is refused before
any trial. Every evaluated round is reported to Tune with the run directory as the checkpoint,
so trials resume. The study directory gets Tune's results (with TensorBoard event files),
`trials.parquet` / `trials.csv` and `best.yaml`, a complete config that `python -m raysim.run
--config best.yaml` reruns, and `report.html` (`python -m raysim.compare STUDY_DIR` rebuilds
it); the trials write no report of their own.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import logging
import math
import operator
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from raysim import cli
from raysim import config as config_mod
from raysim.config import ConfigError, ExperimentConfig
from raysim.datasets import DataError
from raysim.engine.placement import Capacity, actor_count
from raysim.metrics import segmentation as segmetrics
from raysim.outputs.runs import DERIVED

log = logging.getLogger(__name__)
EXIT_BAD_INPUT = cli.EXIT_BAD_INPUT
EXIT_INTERRUPTED = 130  # the shell convention for Ctrl-C
DRIVER_CPU = 0.1  # the trial function (it streams the driver actor's progress); bundle 0 adds resources.driver_cpus for that actor
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid_search", "randint")
SCHEDULERS = ("asha", "fifo")
SEARCHERS = ("random", "optuna")
STUDY_KEYS = ("base", "search_space", "objective", "mode", "num_samples", "scheduler", "search", "max_concurrent_trials")


# --- the objective --------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskMetrics:
    """The validation metrics an objective may name for one task (`raysim.tasks`)."""

    attribute_free: tuple[str, ...]  # rows with attribute ""
    fairness: tuple[str, ...]  # rows of the target attribute (data.attribute)

    @property
    def names(self) -> tuple[str, ...]:
        return self.attribute_free + self.fairness


# A task's metrics as its runs write them (raysim.metrics / raysim.segmetrics rows), plus the
# derived `dice`: the mean of the dice_disc and dice_cup means (raysim.runs.DERIVED, as model
# selection derives it). A joint run (segmentation + grade) writes both tasks' rows. A task
# missing here cannot be tuned: load_study says so.
_CLASSIFICATION = TaskMetrics(("auc", "acc", "bacc", "loss"), ("es_auc", "es_acc", "es_bacc", "eod", "spd"))
_SEGMENTATION = TaskMetrics(("dice", *segmetrics.SAMPLE_COLUMNS), segmetrics.EQUITY)
OBJECTIVE_METRICS: dict[str, TaskMetrics] = {
    "classification": _CLASSIFICATION,
    "segmentation": _SEGMENTATION,
    "joint": TaskMetrics(_CLASSIFICATION.attribute_free + _SEGMENTATION.attribute_free, _CLASSIFICATION.fairness + _SEGMENTATION.fairness),
}
METRICS = OBJECTIVE_METRICS["joint"].names  # every name an objective may hold (check_objective holds it to the run's task)
EXAMPLES = {"classification": "auc - 0.5*eod", "segmentation": "dice - 0.5*dice_gap", "joint": "(auc + dice) / 2 - 0.5*dice_gap"}

_OPS: dict[type, Callable[[float, float], float]] = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


@dataclass(frozen=True)
class Objective:
    """An arithmetic expression over metric names (`auc - 0.5*eod`), parsed without eval."""

    text: str
    tree: ast.Expression = field(repr=False)
    names: tuple[str, ...]

    def __call__(self, values: Mapping[str, float]) -> float:
        return float(_evaluate(self.tree.body, values))


def _choices() -> str:
    return "; ".join(f"{task}: {', '.join(OBJECTIVE_METRICS[task].names)}" for task in ("classification", "segmentation")) + "; joint: both"


def parse_objective(text: str) -> Objective:
    """Only metric names (of any task: `check_objective` holds them to the run's), numbers,
    + - * / and parentheses; anything else is a ConfigError."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"objective must be an expression over metric names ({_choices()}), e.g. {EXAMPLES['classification']!r} or {EXAMPLES['segmentation']!r}; got {text!r}")
    try:
        return _parse_objective(text)
    except (RecursionError, MemoryError):
        raise ConfigError(f"objective {_short(text)}: nested too deeply (keep it to a few operators and parentheses)") from None


def _short(text: str) -> str:
    return repr(text) if len(text) <= 80 else f"{text[:60]!r}... ({len(text)} characters)"


def _parse_objective(text: str) -> Objective:
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as err:
        raise ConfigError(f"objective {_short(text)} is not an expression: {err.msg}") from err
    names: list[str] = []
    for node in ast.walk(tree.body):
        if isinstance(node, ast.Name):
            if node.id not in METRICS:
                raise ConfigError(f"objective {_short(text)}: unknown metric {node.id!r}; use {_choices()}")
            names.append(node.id)
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise ConfigError(f"objective {_short(text)}: only numbers may appear besides metric names, got {node.value!r}")
        elif not isinstance(node, (ast.BinOp, ast.UnaryOp, ast.Load, *_OPS, ast.USub, ast.UAdd)):
            raise ConfigError(f"objective {_short(text)}: {type(node).__name__} is not allowed (only metric names, numbers, + - * / and parentheses)")
    if not names:
        raise ConfigError(f"objective {_short(text)} names no metric; use {_choices()}")
    objective = Objective(text.strip(), tree, tuple(dict.fromkeys(names)))
    objective(dict.fromkeys(names, 1.0))  # evaluated once here: one nested too deeply fails now, not in every trial
    return objective


def _evaluate(node: ast.AST, values: Mapping[str, float]) -> float:
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        return float(values.get(node.id, math.nan))
    if isinstance(node, ast.UnaryOp):
        inner = _evaluate(node.operand, values)
        return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.BinOp):
        left, right = _evaluate(node.left, values), _evaluate(node.right, values)
        if isinstance(node.op, ast.Div) and right == 0:
            return math.nan
        return _OPS[type(node.op)](left, right)
    raise ConfigError(f"unsupported objective node {type(node).__name__}")  # parse_objective rejects these first


def task_of(cfg: ExperimentConfig) -> str:
    """The run's task, as the engine decides it (`raysim.tasks.task_of`: the model)."""
    from raysim.client import tasks  # torch: only once a config is in hand

    return tasks.task_of(cfg.model).name


def check_objective(objective: Objective, cfg: ExperimentConfig) -> None:
    """A ConfigError when the objective names a metric that runs of `cfg`'s task never write
    (its value would be NaN in every trial)."""
    task = task_of(cfg)
    known = OBJECTIVE_METRICS.get(task)
    if known is None:
        raise ConfigError(f"model.name={cfg.model.name} makes a {task} run, which Tune objectives do not cover yet (tasks with objective metrics: {', '.join(OBJECTIVE_METRICS)})")
    foreign = [name for name in objective.names if name not in known.names]
    if foreign:
        raise ConfigError(
            f"objective {objective.text!r} names {', '.join(foreign)}, which a {task} run (model.name={cfg.model.name}) does not write; "
            f"a {task} objective uses {', '.join(known.names)}, e.g. {EXAMPLES.get(task, known.names[0])!r}"
        )


def round_metrics(frame: pd.DataFrame, round_: int, split: str, attribute: str | None, task: str) -> dict[str, float]:
    """The mean-over-clients values of `task`'s metrics at one round and split: attribute-free
    ones from the rows with attribute "", fairness ones from the rows of `attribute`, a derived
    one the mean of its parts; NaN when absent."""
    known = OBJECTIVE_METRICS[task]
    rows = frame[(frame["round"] == round_) & (frame["split"] == split) & (frame["client"] == "mean") & (frame["group"] == "")]

    def value(name: str) -> float:
        if name in DERIVED:
            parts = [value(part) for part in DERIVED[name]]
            return sum(parts) / len(parts)  # NaN when a part is
        if name not in known.attribute_free and not attribute:
            return math.nan  # a source without sensitive attributes has no fairness rows
        hit = rows[(rows["metric"] == name) & (rows["attribute"] == ("" if name in known.attribute_free else attribute))]["value"]
        return float(hit.iloc[0]) if len(hit) else math.nan

    return {name: value(name) for name in known.names}


def report_row(frame: pd.DataFrame, round_: int, attribute: str | None, objective: Objective, task: str) -> dict[str, float]:
    """What a trial reports for an evaluated round: the objective (validation) and val_/test_ metrics of `task`."""
    val, test = round_metrics(frame, round_, "val", attribute, task), round_metrics(frame, round_, "test", attribute, task)
    row: dict[str, float] = {"round": round_, "objective": objective(val)}
    row |= {f"val_{k}": v for k, v in val.items()}
    row |= {f"test_{k}": v for k, v in test.items()}  # recorded, never optimised
    return row


# --- the study file -------------------------------------------------------------------------


@dataclass
class Study:
    path: Path
    base: str  # preset name or config path
    overrides: list[str]
    space: dict[str, dict[str, Any]]  # config key -> {distribution: arguments}
    objective: Objective
    mode: str = "max"
    num_samples: int = 4
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "asha"})
    search: dict[str, Any] = field(default_factory=lambda: {"name": "random"})
    max_concurrent_trials: int | None = None

    def config(self, values: Mapping[str, Any] | None = None) -> ExperimentConfig:
        """The base config with `values` (config key -> value) applied, validated."""
        raw = config_mod.merge(config_mod.read_yaml(self.base), config_mod.parse_overrides(self.overrides))
        tree: dict[str, Any] = {}
        for key, value in (values or {}).items():
            node = tree
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        from raysim import algorithms  # torch and the methods: only once a config is built

        cfg = config_mod.from_dict(config_mod.merge(raw, tree))
        algorithms.check(cfg)
        return cfg

    @property
    def task(self) -> str:
        """The base config's task (`raysim.tasks`), whose metrics the objective names."""
        return task_of(self.config())

    def validate(self) -> None:
        """Every searched key exists, every corner of the space gives a valid config, and each
        such config's task writes every metric the objective names."""
        try:
            check_objective(self.objective, self.config())
        except ConfigError as err:
            raise ConfigError(f"{self.path}: {err}") from None
        for key, spec in self.space.items():
            for value in _corners(spec):
                try:
                    check_objective(self.objective, self.config({key: value}))
                except ConfigError as err:
                    raise ConfigError(f"{self.path}: search_space.{key} = {value!r}: {err}") from None


def load_study(path: str | Path, *, num_samples: int | None = None) -> Study:
    """Parse and validate a study file; every problem is a ConfigError naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} {'is a directory, not a YAML file' if path.is_dir() else 'not found'}")
    try:
        raw = config_mod.load_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with base, search_space, objective")
    unknown = sorted(set(raw) - set(STUDY_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown study key(s) {', '.join(unknown)}; valid: {', '.join(STUDY_KEYS)}")
    for key in ("base", "search_space", "objective"):
        if key not in raw:
            raise ConfigError(f"{path}: missing `{key}`")
    base, overrides = _base(path, raw["base"])
    space = raw["search_space"]
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{path}: search_space must map config keys to distributions, e.g. federation.lr: {{loguniform: [1.0e-4, 1.0e-2]}}")
    space = {str(k): _distribution(path, str(k), v) for k, v in space.items()}
    try:
        objective = parse_objective(raw["objective"])
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    mode = raw.get("mode", "max")
    if mode not in ("max", "min"):
        raise ConfigError(f"{path}: mode must be max or min, got {mode!r}")
    study = Study(
        path=path,
        base=base,
        overrides=overrides,
        space=space,
        objective=objective,
        mode=mode,
        num_samples=_count(path, "--num-samples" if num_samples is not None else "num_samples", num_samples if num_samples is not None else raw.get("num_samples", 4)),
        scheduler=_named(path, "scheduler", raw.get("scheduler", "asha"), SCHEDULERS),
        search=_named(path, "search", raw.get("search", "random"), SEARCHERS),
        max_concurrent_trials=None if raw.get("max_concurrent_trials") is None else _count(path, "max_concurrent_trials", raw["max_concurrent_trials"]),
    )
    study.validate()
    return study


def _base(path: Path, raw: Any) -> tuple[str, list[str]]:
    if isinstance(raw, str):
        raw = {"config": raw}
    if not isinstance(raw, dict) or "config" not in raw or set(raw) - {"config", "overrides"}:
        raise ConfigError(f"{path}: base must be a preset name / config path, or {{config: NAME_OR_PATH, overrides: [key=value, ...]}}; got {raw!r}")
    source = str(raw["config"])
    relative = path.parent / source
    if not Path(source).is_absolute() and relative.is_file():
        source = str(relative.resolve())  # a config file beside the study file
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"{path}: base.overrides must be a list of key=value strings, got {overrides!r}")
    return source, overrides


def _distribution(path: Path, key: str, spec: Any) -> dict[str, Any]:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"{path}: search_space.{key} must be one of {{{': ..., '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind in ("choice", "grid_search"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{path}: search_space.{key}: {kind} needs a non-empty list of values, got {args!r}")
        return {kind: args}
    if not isinstance(args, list) or len(args) != 2:
        raise ConfigError(f"{path}: search_space.{key}: {kind} needs [low, high], got {args!r}")
    try:
        low, high = (int(a) if kind == "randint" else float(a) for a in args)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: search_space.{key}: {kind} bounds must be numbers, got {args!r}") from err
    if not low < high or (kind == "loguniform" and low <= 0):
        raise ConfigError(f"{path}: search_space.{key}: {kind} needs low < high{' and low > 0' if kind == 'loguniform' else ''}, got {args!r}")
    return {kind: [low, high]}


def _corners(spec: dict[str, Any]) -> list[Any]:
    kind, args = next(iter(spec.items()))
    if kind in ("choice", "grid_search"):
        return list(args)
    if kind == "randint":
        return [args[0], args[1] - 1]  # upper bound exclusive, as in tune.randint
    return list(args)


def _count(path: Path, key: str, raw: Any) -> int:
    """A positive integer (YAML `4`, not `4.5`, `true` or `many`)."""
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise ConfigError(f"{path}: {key} must be an integer >= 1, got {raw!r}")
    return raw


def _named(path: Path, key: str, raw: Any, choices: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(raw, (str, dict)) and raw is not None:
        raise ConfigError(f"{path}: {key} must be one of {', '.join(choices)} (as a name or {{name: ..., options}}), got {raw!r}")
    spec = {"name": raw} if isinstance(raw, str) else dict(raw or {})
    if spec.get("name") not in choices:
        raise ConfigError(f"{path}: {key} must be one of {', '.join(choices)} (as a name or {{name: ..., options}}), got {raw!r}")
    return spec


# --- Tune wiring (Ray is imported here only) ------------------------------------------------


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
    """STUDY_DIR/report.html (raysim.study_report: trials, objective per parameter, ASHA picture,
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


# --- CLI ------------------------------------------------------------------------------------


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
        from ray import tune

        if not tune.Tuner.can_restore(experiment):  # no cluster needed to look
            raise ConfigError(f"--resume {out}: no Tune experiment there to continue")
    print(f"study {study.path.name}: {len(study.space)} searched key(s), objective {study.objective.text} ({study.mode}) on val, {study.num_samples} sample(s)")
    from raysim.algorithms import with_backbone
    from raysim.engine.driver import connect_ray

    base = study.config()
    _scheduler(study, base.federation.rounds), _searcher(study)  # their options, checked before Ray starts
    client_count(base)  # reads the clients once (and generates the synthetic set) before trials race for it
    with_backbone(base)  # builds a missing pretrained backbone once, before the trials
    connect_ray(object_store_gb=base.resources.object_store_gb)
    started.extend((study, experiment, tuner(study, experiment, resume=args.resume)))
    return 0


def _finish(args: argparse.Namespace, out: str, study: Study, experiment: str, results: Any) -> int:
    """The study's outputs and summary, once Tune has run."""
    table = trials_table(results, study, experiment)
    best = write_outputs(out, study, table)
    report = write_report(out, study)
    from raysim.reports.study import TEST_COLUMNS

    shown = [c for c in ("trial_id", "status", *study.space, "best_round", "objective", *TEST_COLUMNS.get(study.task, {})) if c in table]
    print(table[shown].to_string(index=False))
    if best is None:
        print("no trial reported a finite objective; see the errors above", file=sys.stderr)
    print(f"wrote trials.parquet, trials.csv, best.yaml (python -m raysim.run --config best.yaml){', report.html' if report else ''} and Tune's results (tensorboard --logdir) in:")
    print(out)
    if unfinished(table):
        print(f"study interrupted: {unfinished(table)} of {len(table)} trial(s) unfinished, best.yaml is the best so far; "
              f"continue with: python -m raysim.tune {args.study} --out {out} --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0 if best is not None else 1


if __name__ == "__main__":
    # Run the imported module, not __main__: Ray pickles the trial function and Study by module name.
    from raysim.tune import main as _main

    raise SystemExit(_main())
