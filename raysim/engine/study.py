"""The study file and its objective, plain Python (no Ray): what `raysim.tune` checks before
any trial and what every trial reports.

A study file (`load_study` -> `Study`) names a base config (preset or YAML file + overrides), a
search space over config keys, an objective over validation metrics of the mean-over-clients
row, the scheduler and the search algorithm; every corner of the space is validated before Ray
starts. The objective (`parse_objective` -> `Objective`, parsed without eval) names metrics that
the base config's task writes (`OBJECTIVE_METRICS`); `report_row` is what a trial reports for an
evaluated round. Apart from `raysim.engine.tune` (Ray Tune's plumbing) because none of this
needs Ray: the entry point and the tests check a study without a cluster.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from raysim import config as config_mod
from raysim.config import ConfigError, ExperimentConfig
from raysim.metrics import segmentation as segmetrics
from raysim.outputs.runs import DERIVED

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid_search", "randint")
SCHEDULERS = ("asha", "fifo")
SEARCHERS = ("random", "optuna")
STUDY_KEYS = ("base", "search_space", "objective", "mode", "num_samples", "scheduler", "search", "max_concurrent_trials")


# --- the objective --------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskMetrics:
    """The validation metrics an objective may name for one task (`raysim.client.tasks`)."""

    attribute_free: tuple[str, ...]  # rows with attribute ""
    fairness: tuple[str, ...]  # rows of the target attribute (data.attribute)

    @property
    def names(self) -> tuple[str, ...]:
        return self.attribute_free + self.fairness


# A task's metrics as its runs write them (raysim.metrics.classification / .segmentation rows), plus the
# derived `dice`: the mean of the dice_disc and dice_cup means (raysim.outputs.runs.DERIVED, as model
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
    """The run's task, as the engine decides it (`raysim.client.tasks.task_of`: the model)."""
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
        """The base config's task (`raysim.client.tasks`), whose metrics the objective names."""
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
