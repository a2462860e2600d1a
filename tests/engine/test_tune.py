"""Ray Tune studies (raysim.tune), the study files in tune_configs/, the cluster files, the GPU cap."""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from raysim import config
from raysim.config import ConfigError
from raysim.engine.client_actor import gpu_memory_fraction
from raysim.engine.study import OBJECTIVE_METRICS, load_study, parse_objective, report_row, round_metrics
from raysim.metrics import classification as metrics
from raysim.metrics import segmentation as segmetrics
from raysim.outputs import runs
from raysim.reports import study as study_report

from helpers import _study, load_config, tiny_overrides

ROOT = Path(__file__).resolve().parents[2]


SEGMENTATION_BASE = {"config": "segmentation", "overrides": ["model.name=unet:test_resnet"]}




# --- study files ----------------------------------------------------------------------------


def test_study_parses(tmp_path: Path) -> None:
    study = load_study(_study(tmp_path, search_space={"algorithm.q": {"uniform": [0, 2]}, "federation.lr": {"choice": [0.001, 0.01]}}, base={"config": "default", "overrides": ["algorithm.name=qffl"]}))
    assert study.objective.names == ("auc", "eod")
    assert study.scheduler == {"name": "asha"} and study.search == {"name": "random"}
    cfg = study.config({"algorithm.q": 0.5, "federation.lr": 0.01})
    assert cfg.algorithm == {"name": "qffl", "q": 0.5} and cfg.federation.lr == 0.01


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"search_space": {"federation.lrr": {"uniform": [0.1, 1]}}}, "did you mean federation.lr"),
        ({"search_space": {"algorithm.rank": {"choice": [4, 8]}}}, "unknown config key 'algorithm.rank'"),  # fedavg has no rank
        ({"search_space": {"federation.lr": {"normal": [0, 1]}}}, "must be one of"),
        ({"search_space": {"federation.lr": {"loguniform": [0, 1]}}}, "low > 0"),
        ({"search_space": {"federation.momentum": {"uniform": [0.5, 1.5]}}}, "federation.momentum must be in"),
        ({"objective": "auc - __import__('os')"}, "not allowed"),
        ({"objective": "auc ** 2"}, "not allowed"),
        ({"objective": "auroc"}, "unknown metric 'auroc'"),
        ({"objective": "auc +"}, "not an expression"),
        ({"scheduler": "hyperband"}, "scheduler must be one of asha, fifo"),
        ({"search": "bayes"}, "search must be one of"),
        ({"mode": "best"}, "mode must be max or min"),
        ({"searchspace": {}}, "unknown study key"),
        ({"base": "no_such_preset"}, "not found"),
        # an objective over the other task's metrics: refused before any trial, naming the model
        ({"base": SEGMENTATION_BASE}, "names auc, eod, which a segmentation run (model.name=unet:test_resnet) does not write; a segmentation objective uses dice, dice_disc,"),
        ({"base": SEGMENTATION_BASE, "objective": "es_dice - loss"}, "names loss, which a segmentation run"),
        ({"objective": "dice - 0.5*dice_gap"}, "names dice, dice_gap, which a classification run (model.name=resnet18) does not write; a classification objective uses auc, acc,"),
        (
            {"objective": "es_auc", "search_space": {"model.name": {"choice": ["resnet18", "unet:resnet18"]}}},
            "search_space.model.name = 'unet:resnet18': objective 'es_auc' names es_auc, which a segmentation run",
        ),
    ],
)
def test_study_errors(tmp_path: Path, fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_study(_study(tmp_path, **fields))


def test_tune_cli_bad_study_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from raysim.engine import driver
    from raysim.tune import main

    monkeypatch.setattr(driver, "connect_ray", lambda **_: pytest.fail("a bad study reached Ray"))
    assert main([str(_study(tmp_path, objective="auc ** 2"))]) == 2
    assert "not allowed" in capsys.readouterr().err
    assert main([str(_study(tmp_path, base=SEGMENTATION_BASE, objective="auc"))]) == 2  # a classification metric of a segmentation study
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "objective 'auc' names auc, which a segmentation run" in line


@pytest.mark.parametrize("objective", ["dice - 0.5*dice_gap", "es_dice", "(dice_disc + dice_cup) / 2 - hd95_cup - cdr_error", "iou_cup - es_dice_cup + dice_disc_gap"])
def test_a_segmentation_study_takes_segmentation_metrics(tmp_path: Path, objective: str) -> None:
    study = load_study(_study(tmp_path, base=SEGMENTATION_BASE, objective=objective))
    assert study.task == "segmentation" and set(study.objective.names) <= set(OBJECTIVE_METRICS["segmentation"].names)
    assert load_study(_study(tmp_path)).task == "classification"


def test_a_joint_study_takes_both_tasks_metrics(tmp_path: Path) -> None:
    """A joint run (segmentation + grade, `--config fundus_oct`) writes both tasks' rows."""
    study = load_study(_study(tmp_path, base="fundus_oct", objective="(auc + dice) / 2 - 0.5*dice_gap - 0.5*eod"))
    assert study.task == "joint" and set(study.objective.names) == {"auc", "dice", "dice_gap", "eod"}


# --- the objective --------------------------------------------------------------------------


def _frame() -> pd.DataFrame:
    rows = []
    for split, shift in (("val", 0.0), ("test", 0.1)):
        for client, auc in (("site1", 0.7), ("mean", 0.8)):
            rows += [(2, split, client, "", "", "", "auc", auc + shift), (2, split, client, "", "", "", "acc", 0.6)]
            rows += [(2, split, client, "", "race", "", "eod", 0.2 + shift), (2, split, client, "", "gender", "", "eod", 0.9)]
            rows += [(2, split, client, "", "race", "", "es_auc", 0.5), (2, split, client, "", "race", "Black", "auc", 0.1)]
        rows += [(1, split, "mean", "", "", "", "auc", 0.3)]
    return pd.DataFrame(rows, columns=["round", "split", "client", "role", "attribute", "group", "metric", "value"])


def test_objective_from_the_validation_mean_row() -> None:
    values = round_metrics(_frame(), 2, "val", "race", "classification")
    assert values["auc"] == 0.8 and values["eod"] == 0.2 and values["es_auc"] == 0.5  # mean row, race, group ""
    assert math.isnan(values["spd"]) and math.isnan(values["bacc"])
    assert list(values) == ["auc", "acc", "bacc", "loss", "es_auc", "es_acc", "es_bacc", "eod", "spd"]  # what classification trials always reported
    row = report_row(_frame(), 2, "race", parse_objective("auc - 0.5*eod"), "classification")
    assert row["objective"] == pytest.approx(0.7)
    assert row["test_auc"] == pytest.approx(0.9) and row["round"] == 2  # test recorded, never in the objective
    assert parse_objective("(auc + es_auc) / 2 - -eod")({"auc": 0.8, "es_auc": 0.4, "eod": 0.1}) == pytest.approx(0.7)
    assert math.isnan(parse_objective("auc / (eod - eod)")({"auc": 1.0, "eod": 0.2}))


def _long(rows: list[tuple[int, str, str, list[metrics.Row]]]) -> pd.DataFrame:
    """(round, split, client, rows) -> metrics.parquet's long frame with the mean-over-clients rows, as the driver writes it."""
    frame = pd.DataFrame([(r, split, client, "", a, g, m, v) for r, split, client, client_rows in rows for a, g, m, v in client_rows], columns=list(metrics.FRAME_COLUMNS))
    return pd.concat([frame, metrics.mean_over_clients(frame)], ignore_index=True)


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_each_task_objective_metric_is_a_mean_row_its_runs_write(task: str) -> None:
    """Attribute-free names are rows with attribute "", fairness names rows of the target
    attribute (group "" both), from the real metric functions of the task; `dice` is derived."""
    rng = np.random.default_rng(0)
    race = rng.integers(0, 2, 40)
    names = {"race": {0: "Black", 1: "White"}}
    if task == "classification":
        labels = rng.integers(0, 2, 40)
        written = metrics.client_metrics(labels, np.clip(labels * 0.3 + rng.random(40) * 0.7, 0, 1), {"race": race}, names, n_boot=5)
    else:
        true = rng.integers(0, 3, (40, 8, 8)).astype(np.uint8)
        written = segmetrics.client_segmentation_metrics(segmetrics.sample_metrics(np.where(rng.random((40, 8, 8)) < 0.7, true, 0).astype(np.uint8), true), {"race": race}, names, n_boot=5)
    known = OBJECTIVE_METRICS[task]
    stored = {(a, m) for a, g, m, _ in written if g == ""}
    assert {("", m) for m in known.attribute_free if m not in runs.DERIVED} <= stored
    assert {("race", m) for m in known.fairness} <= stored
    assert set(known.names) <= set(metrics.METRIC_NAMES) | set(runs.DERIVED)  # the output contract's names
    assert set(known.names) <= set(OBJECTIVE_METRICS["joint"].names)  # a joint run writes both tasks' rows
    values = round_metrics(_long([(1, "val", "site1", written)]), 1, "val", "race", task)
    assert list(values) == list(known.names) and all(math.isfinite(v) for k, v in values.items() if k not in ("eod", "spd"))


def _segmentation_frame() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = []
    for split in ("val", "test"):
        for client in ("site1", "site2"):
            true = rng.integers(0, 3, (30, 16, 16)).astype(np.uint8)
            pred = np.where(rng.random(true.shape) < 0.8, true, 0).astype(np.uint8)
            samples = segmetrics.sample_metrics(pred, true)
            rows.append((2, split, client, segmetrics.client_segmentation_metrics(samples, {"race": rng.integers(-1, 3, 30)}, {"race": {0: "Asian", 1: "Black", 2: "White"}}, n_boot=10)))
    return _long(rows)


def test_segmentation_objective_from_the_validation_mean_row() -> None:
    frame = _segmentation_frame()
    values = round_metrics(frame, 2, "val", "race", "segmentation")
    mean = lambda metric, attribute="": runs.value(frame, round_=2, split="val", metric=metric, attribute=attribute)  # noqa: E731
    assert values["dice"] == pytest.approx((mean("dice_disc") + mean("dice_cup")) / 2)
    assert values["dice"] == pytest.approx(runs.select_round(frame).value) and runs.select_round(frame).metric == "dice"  # as model selection derives it
    assert values["es_dice"] == mean("es_dice", "race") and values["dice_gap"] == mean("dice_gap", "race") and values["cdr_error"] == mean("cdr_error")
    assert {k for k, v in round_metrics(frame, 2, "val", None, "segmentation").items() if math.isnan(v)} == set(OBJECTIVE_METRICS["segmentation"].fairness)  # no attribute
    row = report_row(frame, 2, "race", parse_objective("dice - 0.5*dice_gap"), "segmentation")
    assert row["objective"] == pytest.approx(values["dice"] - 0.5 * values["dice_gap"])
    assert row["test_dice"] == pytest.approx(round_metrics(frame, 2, "test", "race", "segmentation")["dice"]) and row["test_dice"] != row["val_dice"]
    assert not any(k.endswith(("_auc", "_eod")) for k in row)  # a task's trials report its own metrics


def test_a_segmentation_study_report_shows_dice(tmp_path: Path) -> None:
    trials = pd.DataFrame(
        {
            "trial_id": ["a", "b"],
            "status": ["TERMINATED"] * 2,
            "federation.lr": [1e-3, 1e-2],
            "best_round": [2, 1],
            "objective": [0.7, 0.5],
            "val_dice": [0.8, 0.6],
            "test_dice": [0.75, 0.55],
            "test_es_dice": [0.7, 0.5],
        }
    )
    trials.to_parquet(tmp_path / "trials.parquet")
    (tmp_path / "best.yaml").write_text("# best trial a of s.yaml: objective dice - 0.5*dice_gap = 0.7000 (val, round 2)\nseed: 0\n")
    table = study_report.write(tmp_path).splitlines()
    assert table[0] == "| trial | status | federation.lr | objective (val) | best round | rounds reached | test Dice at best | test ES-Dice at best |"
    assert table[2] == "| a | TERMINATED | 0.001 | 0.7000 | 2 | - | 0.7500 | 0.7000 |"
    assert "test Dice at best" in (tmp_path / "report.html").read_text() and "dice - 0.5*dice_gap" in (tmp_path / "report.html").read_text()
    assert study_report.markdown(trials.iloc[0:0][["trial_id", "status"]], [], "segmentation").startswith("| trial | status | objective (val) | best round | rounds reached | test Dice at best |")
    tasks = [study_report.study_task(pd.DataFrame(columns=c)) for c in (["val_dice", "test_dice"], ["val_dice", "val_auc"], ["val_auc"], [])]
    assert tasks == ["segmentation", "joint", "classification", "classification"]  # what the trials reported (none: classification)


# --- the trial's placement group ------------------------------------------------------------


def test_trial_bundles_come_from_the_same_plan_as_the_driver(oph_root: Path, tmp_path: Path) -> None:
    from raysim.engine.placement import Capacity
    from raysim.engine.tune import DRIVER_CPU, bundles, trial_share

    laptop = {"CPU": 2.0}
    assert trial_share(load_study(_study(tmp_path)), laptop) == Capacity(2 - DRIVER_CPU, 0)
    assert trial_share(load_study(_study(tmp_path, max_concurrent_trials=2)), {"CPU": 8.0, "GPU": 2.0}) == Capacity(4 - DRIVER_CPU, 1)

    def pg(share: Capacity, **extra: object) -> list[dict[str, float]]:
        return bundles(load_config(None, tiny_overrides(oph_root, **extra)), share)

    share = Capacity(2 - DRIVER_CPU)
    assert pg(share) == [{"CPU": DRIVER_CPU}] + [{"CPU": 0.25}] * 3  # 3 clients, fractions leave room for a second trial
    assert pg(share, **{"resources.num_cpus": "null"}) == [{"CPU": DRIVER_CPU}, {"CPU": 1.0}]  # one whole core fits beside the driver
    assert pg(share, **{"resources.actors": 2}) == [{"CPU": DRIVER_CPU}] + [{"CPU": 0.25}] * 2
    assert pg(share, **{"resources.clients_per_actor": 2, "resources.driver_cpus": 0.5}) == [{"CPU": DRIVER_CPU + 0.5}] + [{"CPU": 0.25}] * 2
    assert pg(Capacity(16, 1), **{"resources.num_gpus": 0.5}) == [{"CPU": DRIVER_CPU}] + [{"CPU": 0.25, "GPU": 0.5}] * 2
    with pytest.raises(ConfigError, match="not even one client actor fits"):
        pg(Capacity(0.5 - DRIVER_CPU), **{"resources.num_cpus": "null"})


# --- GPU memory cap -------------------------------------------------------------------------


def test_gpu_memory_fraction() -> None:
    assert gpu_memory_fraction(0) is None
    assert gpu_memory_fraction(1) == 1.0
    assert gpu_memory_fraction(0.25) == pytest.approx(0.2375)
    assert gpu_memory_fraction(0.5, margin=0) == 0.5
    assert sum(gpu_memory_fraction(1 / 3) for _ in range(3)) < 1  # three actors fit on one GPU
    with pytest.raises(ValueError):
        gpu_memory_fraction(0.5, margin=1)


# --- shipped files --------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((ROOT / "tune_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_study_is_valid(path: Path) -> None:
    study = load_study(path)  # every searched key exists and every corner of the space validates
    assert study.space and study.objective.names


def test_required_studies_exist() -> None:
    names = {p.stem for p in (ROOT / "tune_configs").glob("*.yaml")}
    assert {"fairlora_rank_lr", "fairlora_fairness", "fairfed_beta", "qffl_q", "fedhelp"} <= names
    methods = {load_study(ROOT / "tune_configs" / f"{n}.yaml").config().algorithm["name"] for n in names}
    assert {"fairlora", "fairfed", "qffl", "fedhelp"} <= methods


def _raysim_commands(text: str) -> list[list[str]]:
    """Every `python -m raysim.X ...` command line in a file (YAML strings, shell, Markdown)."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        match = re.search(r"python -m (raysim\.\w+)(.*)", line)
        if match:
            commands.append([match.group(1), *shlex.split(match.group(2).split("#")[0].strip().strip("\"'],"), posix=True)])
    return commands


def test_cluster_files_parse_and_name_real_commands() -> None:
    import importlib.util

    files = sorted((ROOT / "cluster").iterdir())
    yamls = [p for p in files if p.suffix == ".yaml"]
    assert {"aws-gpu.yaml", "rayjob.yaml", "runtime_env.yaml"} <= {p.name for p in yamls}
    for path in yamls:
        assert list(yaml.safe_load_all(path.read_text())), path
    version = re.search(r"^version = (\S+)", (ROOT / "setup.cfg").read_text(), re.M).group(1)
    assert f"raysim-{version}-py3-none-any.whl" in (ROOT / "cluster" / "runtime_env.yaml").read_text()
    commands = [c for p in [*files, ROOT / "README.md"] if p.is_file() for c in _raysim_commands(p.read_text())]
    assert {"raysim.run", "raysim.tune"} <= {c[0] for c in commands}
    for module, *args in commands:
        assert importlib.util.find_spec(module) is not None, module
        overrides = [a for a in args if re.fullmatch(r"[a-z_]+(\.[a-z_]+)+=\S*", a)]
        if module == "raysim.run" and overrides:
            load_config(None, [o for o in overrides if "data.root" not in o])  # every key exists
        for arg in args:
            if arg.startswith("tune_configs/"):
                load_study(ROOT / arg)


# --- a real study through Ray Tune ----------------------------------------------------------


@pytest.mark.timeout(400)
def test_tiny_study_writes_trials_and_best(ray_session, oph_root: Path, tmp_path: Path) -> None:
    from raysim import run
    from raysim.tune import main

    base = tmp_path / "base.yaml"
    base.write_text(config.dump(load_config(None, tiny_overrides(oph_root, **{"eval.bootstrap": 0, "resources.num_cpus": 0.2, "resources.actors": 1}))))  # one client actor process per trial
    study = tmp_path / "tiny.yaml"
    study.write_text(yaml.safe_dump({"base": "base.yaml", "search_space": {"federation.lr": {"grid_search": [0.001, 0.01]}}, "objective": "auc - 0.5*eod", "num_samples": 1}))
    out = tmp_path / "study"
    assert main([str(study), "--out", str(out)]) == 0
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 2 and set(trials["federation.lr"]) == {0.001, 0.01}
    assert (trials["status"] == "TERMINATED").all()
    assert {"objective", "best_round", "val_auc", "val_eod", "test_auc", "final_objective"} <= set(trials.columns)
    assert trials["objective"].iloc[0] >= trials["objective"].iloc[1]  # best first
    assert pd.read_csv(out / "trials.csv")["trial_id"].tolist() == trials["trial_id"].tolist()
    assert list(out.glob("*/events.out.tfevents.*")), "TensorBoard logs of every trial"
    report = (out / "report.html").read_text()  # one report per study (raysim.reports.study), none per trial
    assert all(f"<td>{t}</td>" in report for t in trials["trial_id"]) and 'data-plot="asha"' in report and not list(out.glob("*/*/report.html"))
    best = load_config(out / "best.yaml")
    assert best.federation.lr == trials["federation.lr"].iloc[0] and best.data.root == str(oph_root)
    assert run.main(["--config", str(out / "best.yaml"), "--out", str(tmp_path / "rerun"), "federation.rounds=1"]) == 0
    assert (tmp_path / "rerun" / "metrics.parquet").exists()
