"""Malformed input through every command besides `raysim.run`: exit code 2, one line, nothing damaged.

The same contract tests/cli/test_malformed_cli.py holds `raysim.run` to, for `raysim.compare`,
`raysim.report`, `raysim.tune`, `raysim.pretrain` and `raysim.datasets.inspect` /
`prepare_chest` / `synthetic`: each case gives a broken input to the command's `main(argv)` as a
user would and asserts exit code 2, stderr exactly one line `error: ...` naming the culprit, no
traceback, and nothing written or changed: a fresh --out is gone again, and every input (run
and study directories, data roots, the study file, the cache) is byte for byte as before. All
of these are refused before Ray starts (the test fails if one reaches `connect_ray`), so they
run in-process without Ray. The console scripts `raysim-run` / `raysim-tune` run once each as
subprocesses (started at once).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_malformed_cli import OPH_TRAIN, snapshot

from raysim import compare, doctor, pretrain, report, tune
from raysim.datasets import inspect, prepare_chest, synthetic
from raysim.engine import driver

from helpers import _study, make_run, prep_args, write_raw

COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "compare": compare.main,
    "report": report.main,
    "tune": tune.main,
    "pretrain": pretrain.main,
    "inspect": inspect.main,
    "prepare_chest": prepare_chest.main,
    "synthetic": synthetic.main,
    "doctor": doctor.main,
}


class Ctx:
    """What a case builds its argv from: `out` is a fresh path (not created); every path in
    `watched` must be byte for byte the same afterwards."""

    def __init__(self, tmp: Path, request: pytest.FixtureRequest) -> None:
        self.tmp, self.request = tmp, request
        self.out = tmp / "out"
        self.watched: list[Path] = [tmp]  # everything the case made: inputs, run and study directories

    def run(self, name: str = "run", algorithm: str = "fedavg", seed: int = 0) -> Path:
        """A good run directory (tests/reports/test_compare.py's), to break."""
        return make_run(self.tmp / "runs" / name, {"name": algorithm}, seed, {1: 0.7, 2: 0.8}, {1: 0.6, 2: 0.75})

    def file(self, name: str, data: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def study_dir(self) -> Path:
        """A good Tune study directory (trials.parquet, best.yaml, one trial's result.json), to break."""
        path = self.tmp / "study"
        (path / "trial_a").mkdir(parents=True)
        pd.DataFrame({"trial_id": ["a"], "status": ["TERMINATED"], "federation.lr": [1e-3], "best_round": [2], "objective": [0.7]}).to_parquet(path / "trials.parquet")
        (path / "best.yaml").write_text("# best trial a of s.yaml: objective auc = 0.7000 (val, round 2)\nseed: 0\n")
        (path / "trial_a" / "result.json").write_text("".join(json.dumps({"trial_id": "a", "round": r, "objective": 0.6 + r / 20}) + "\n" for r in (1, 2)))
        return path

    def study(self, **fields: object) -> Path:
        return _study(self.tmp, **fields)


@dataclass(frozen=True)
class Case:
    command: str
    id: str
    argv: Callable[[Ctx], list[str]]
    needles: tuple[str, ...]  # each must appear in the error line ({out}, {tmp}: the case's paths)


def broken_run(change: Callable[[Path], object]) -> Callable[[Ctx], Path]:
    def build(ctx: Ctx) -> Path:
        path = ctx.run()
        change(path)
        return path

    return build


def metrics(change: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        change(pd.read_parquet(run / "metrics.parquet")).to_parquet(run / "metrics.parquet")

    return edit


def write(name: str, data: str | bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(data.encode() if isinstance(data, str) else data)


def as_text(column: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """The column stored as strings (Arrow keeps a column one type), one cell not even a number."""

    def change(frame: pd.DataFrame) -> pd.DataFrame:
        frame[column] = frame[column].astype(str)
        frame.loc[3, column] = "high"
        return frame

    return change


# The malformed run directories compare and report both read (raysim.outputs.runs.read_run).
BAD_RUNS: list[tuple[str, Callable[[Path], object], tuple[str, ...]]] = [
    ("config-not-a-mapping", write("config.yaml", "- 1\n- 2\n"), ("/config.yaml: expected a mapping of config sections, got list",)),
    ("config-section-not-a-mapping", write("config.yaml", "seed: 0\nalgorithm: 5\n"), ("/config.yaml: algorithm must be a mapping, got 5",)),
    ("config-seed-text", write("config.yaml", "seed: abc\n"), ("/config.yaml: seed must be an integer, got 'abc'",)),
    ("config-invalid-yaml", write("config.yaml", "seed: [0\n"), ("/config.yaml: unreadable",)),
    ("config-not-utf8", write("config.yaml", b"seed: 0  # \xff\n"), ("/config.yaml: unreadable", "utf-8")),
    ("provenance-not-a-mapping", write("provenance.json", "[1, 2]"), ("/provenance.json: expected a JSON object, got list",)),
    ("provenance-data-not-a-mapping", write("provenance.json", '{"data": 3}'), ("/provenance.json: data must be an object (the data fingerprint), got 3",)),
    ("provenance-invalid-json", write("provenance.json", "{nope"), ("/provenance.json: unreadable",)),
    ("metrics-missing-columns", metrics(lambda f: f.drop(columns=["value", "group"])), ("/metrics.parquet: missing column(s) group, value",)),
    ("metrics-text-values", metrics(as_text("value")), ("/metrics.parquet: column value: row 0 holds '0.7', expected a number",)),
    ("metrics-text-rounds", metrics(as_text("round")), ("/metrics.parquet: column round: row 0 holds '1', expected an integer",)),
    ("metrics-fractional-rounds", metrics(lambda f: f.assign(round=f["round"] + 0.5)), ("/metrics.parquet: column round: row 0 holds 1.5, expected an integer",)),
    ("metrics-numbers-as-clients", metrics(lambda f: f.assign(client=range(len(f)))), ("/metrics.parquet: column client: row 0 holds 0, expected text",)),
    ("metrics-empty", metrics(lambda f: f.iloc[0:0]), ("/metrics.parquet: no rows",)),
    ("metrics-not-parquet", write("metrics.parquet", b"PAR1 not really"), ("/metrics.parquet: unreadable",)),
]


def study_case(change: Callable[[Path], object]) -> Callable[[Ctx], list[str]]:
    def build(ctx: Ctx) -> list[str]:
        path = ctx.study_dir()
        change(path)
        return [str(path)]

    return build


def out_is_a_file(argv: Callable[[Ctx], list[str]]) -> Callable[[Ctx], list[str]]:
    def build(ctx: Ctx) -> list[str]:
        ctx.file("out", "mine\n")
        return [*argv(ctx), "--out", str(ctx.out)]

    return build


def trials(change: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path], None]:
    def edit(study: Path) -> None:
        change(pd.read_parquet(study / "trials.parquet")).to_parquet(study / "trials.parquet")

    return edit


COMPARE = [
    Case("compare", "missing-input", lambda ctx: [str(ctx.tmp / "nope")], ("{tmp}/nope: no such directory",)),
    Case("compare", "input-is-a-file", lambda ctx: [str(ctx.file("notes.txt", "x"))], ("{tmp}/notes.txt: not a directory",)),
    Case("compare", "folder-without-runs", lambda ctx: [str((ctx.tmp / "empty").mkdir() or ctx.tmp / "empty")], ("no run found under {tmp}/empty",)),
    *[Case("compare", f"run-{name}", lambda ctx, change=change: [str(broken_run(change)(ctx))], needles) for name, change, needles in BAD_RUNS],
    Case("compare", "out-is-a-file", out_is_a_file(lambda ctx: [str(ctx.run())]), ("--out {out} is not a directory",)),
    Case("compare", "out-under-a-file", lambda ctx: [str(ctx.run()), "--out", str(ctx.file("f", "x") / "cmp")], ("--out {tmp}/f/cmp: {tmp}/f is a file",)),
    Case("compare", "by-unknown-key", lambda ctx: [str(ctx.run()), "--by", "federation.nope"], ("--by federation.nope: no such config key",)),
    Case("compare", "baseline-unknown", lambda ctx: [str(ctx.run()), "--baseline", "fedmars", "--out", str(ctx.out)], ("--baseline fedmars: no such group",)),
    Case("compare", "study-corrupt-trials", study_case(write("trials.parquet", b"PAR1 garbage")), ("{tmp}/study/trials.parquet: unreadable",)),
    Case("compare", "study-trials-without-trial-id", study_case(trials(lambda f: f.drop(columns=["trial_id"]))), ("{tmp}/study/trials.parquet: no trial_id column",)),
    Case("compare", "study-text-objective", study_case(trials(lambda f: f.assign(objective=["high"]))), ("{tmp}/study/trials.parquet: column objective holds 'high'", "expected numbers")),
    Case("compare", "study-best-not-utf8", study_case(write("best.yaml", b"# best \xff\nseed: 0\n")), ("{tmp}/study/best.yaml: unreadable (not UTF-8 text)",)),
    Case("compare", "study-result-json-corrupt", study_case(lambda s: (s / "trial_a" / "result.json").write_text("{nope\n")), ("{tmp}/study/trial_a/result.json: unreadable",)),
    Case("compare", "study-result-json-not-objects", study_case(lambda s: (s / "trial_a" / "result.json").write_text("[1]\n")), ("result.json: expected one JSON object per line",)),
    Case("compare", "study-out-is-a-file", out_is_a_file(study_case(lambda s: None)), ("--out {out} is not a directory",)),
    Case("compare", "study-with-runs", lambda ctx: [str(ctx.study_dir()), str(ctx.run())], ("{tmp}/study is a Tune study: report one study on its own",)),
]

REPORT = [
    Case("report", "missing-run-dir", lambda ctx: [str(ctx.tmp / "nope")], ("{tmp}/nope: not a directory",)),
    Case("report", "run-dir-is-a-file", lambda ctx: [str(ctx.file("f", "x"))], ("{tmp}/f: not a directory",)),
    Case("report", "no-config", lambda ctx: [str(broken_run(lambda r: (r / "config.yaml").unlink())(ctx))], ("no config.yaml",)),
    Case("report", "config-is-a-directory", lambda ctx: [str(broken_run(lambda r: ((r / "config.yaml").unlink(), (r / "config.yaml").mkdir()))(ctx))], ("/config.yaml: unreadable",)),
    *[Case("report", f"run-{name}", lambda ctx, change=change: [str(broken_run(change)(ctx))], needles) for name, change, needles in BAD_RUNS],
    Case("report", "out-is-a-directory", lambda ctx: [str(ctx.run()), "--out", str(ctx.tmp)], ("--out {tmp} is a directory",)),
    Case("report", "out-under-a-file", lambda ctx: [str(ctx.run()), "--out", str(ctx.file("f", "x") / "r.html")], ("--out {tmp}/f/r.html: {tmp}/f is not a directory",)),
]


def study(**fields: object) -> Callable[[Ctx], list[str]]:
    return lambda ctx: [str(ctx.study(**fields)), "--out", str(ctx.out)]


def study_text(data: str | bytes, *extra: str) -> Callable[[Ctx], list[str]]:
    return lambda ctx: [str(ctx.file("study.yaml", data)), "--out", str(ctx.out), *extra]


TUNE = [
    Case("tune", "study-missing", lambda ctx: [str(ctx.tmp / "nope.yaml"), "--out", str(ctx.out)], ("study file {tmp}/nope.yaml not found",)),
    Case("tune", "study-is-a-directory", lambda ctx: [str(ctx.tmp), "--out", str(ctx.out)], ("study file {tmp} is a directory",)),
    Case("tune", "study-not-utf8", study_text(b"objective: auc # \xff\n"), ("{tmp}/study.yaml: not UTF-8 text (byte 17)",)),
    Case("tune", "study-invalid-yaml", study_text("objective: [auc\n"), ("{tmp}/study.yaml: not valid YAML",)),
    Case("tune", "study-not-a-mapping", study_text("- auc\n"), ("{tmp}/study.yaml: expected a mapping",)),
    Case("tune", "num-samples-many", study(num_samples="many"), ("{tmp}/study.yaml: num_samples must be an integer >= 1, got 'many'",)),
    Case("tune", "num-samples-fraction", study(num_samples=2.5), ("num_samples must be an integer >= 1, got 2.5",)),
    Case("tune", "num-samples-flag-zero", lambda ctx: [*study()(ctx), "--num-samples", "0"], ("--num-samples must be an integer >= 1, got 0",)),
    Case("tune", "max-concurrent-text", study(max_concurrent_trials="two"), ("max_concurrent_trials must be an integer >= 1, got 'two'",)),
    Case("tune", "max-concurrent-bool", study(max_concurrent_trials=True), ("max_concurrent_trials must be an integer >= 1, got True",)),
    Case("tune", "max-concurrent-list", study(max_concurrent_trials=[2]), ("max_concurrent_trials must be an integer >= 1, got [2]",)),
    Case("tune", "scheduler-number", study(scheduler=5), ("scheduler must be one of asha, fifo", "got 5")),
    Case("tune", "search-option-unknown", study(search={"name": "random", "bogus": 1}), ("search options", "bogus")),
    Case("tune", "scheduler-option-unknown", study(scheduler={"name": "asha", "bogus": 1}), ("scheduler options", "bogus")),
    Case(
        "tune",
        "objective-too-deep-unary",
        study(objective="-" * 50_000 + "auc"),
        (
            "objective '-----",
            "(50003 characters): nested too deeply",
        ),
    ),
    Case(
        "tune",
        "objective-too-long-sum",
        study(objective="+".join(["auc"] * 50_000)),
        (
            "objective 'auc+auc",
            "nested too deeply",
        ),
    ),
    Case("tune", "objective-too-many-parentheses", study(objective="(" * 500 + "auc" + ")" * 500), ("too many nested parentheses",)),
    Case("tune", "objective-a-number", study(objective=3), ("objective must be an expression over metric names", "got 3")),
    Case("tune", "search-space-a-list", study(search_space=["federation.lr"]), ("search_space must map config keys to distributions",)),
    Case("tune", "bounds-text", study(search_space={"federation.lr": {"uniform": ["a", "b"]}}), ("search_space.federation.lr: uniform bounds must be numbers",)),
    Case("tune", "base-missing-file", study(base={"config": "nope.yaml"}), ("nope.yaml",)),
    Case("tune", "out-is-a-file", lambda ctx: [str(ctx.study()), "--out", str(ctx.file("out", "mine\n"))], ("--out {out} is not a directory",)),
    Case("tune", "out-not-empty", lambda ctx: [str(ctx.study()), "--out", str(ctx.file("out/x", "x").parent)], ("--out {out} is not empty",)),
    Case("tune", "resume-a-corrupt-study", lambda ctx: [str(ctx.study()), "--out", str(ctx.study_dir()), "--resume"], ("--resume {tmp}/study: no Tune experiment there to continue",)),
    Case("tune", "resume-without-out", lambda ctx: [str(ctx.study()), "--resume"], ("--resume needs --out STUDY_DIR",)),
]

PRETRAIN = [
    Case("pretrain", "lr-infinite", lambda ctx: ["--lr", "inf", "--out", str(ctx.out)], ("pretrain lr must be a positive finite number, got inf",)),
    Case("pretrain", "lr-nan", lambda ctx: ["--lr", "nan", "--out", str(ctx.out)], ("pretrain lr must be a positive finite number, got nan",)),
    Case("pretrain", "img-size-zero", lambda ctx: ["--img-size", "0", "--out", str(ctx.out)], ("pretrain img_size must be a positive finite number, got 0",)),
    Case("pretrain", "batch-size-one", lambda ctx: ["--batch-size", "1", "--out", str(ctx.out)], ("pretrain batch_size must be >= 2",)),
    Case("pretrain", "unknown-model", lambda ctx: ["--model", "resnet9000", "--img-size", "16", "--out", str(ctx.out / "b.pth")], ("resnet9000",)),
    Case("pretrain", "out-is-a-directory", lambda ctx: ["--model", "test_resnet", "--img-size", "16", "--out", str(ctx.tmp)], ("--out {tmp} is a directory",)),
    Case("pretrain", "out-under-a-file", lambda ctx: ["--model", "test_resnet", "--img-size", "16", "--out", str(ctx.file("f", "x") / "b.pth")], ("{tmp}/f is not a directory",)),
]


def oph_csv(change: Callable[[Path], object]) -> Callable[[Ctx], list[str]]:
    def build(ctx: Ctx) -> list[str]:
        root = ctx.request.getfixturevalue("oph_copy")
        change(root)
        ctx.watched.append(root)
        return [str(root), "--dataset", "fairfedmed_oph"]

    return build


INSPECT = [
    Case("inspect", "root-missing", lambda ctx: [str(ctx.tmp / "nope"), "--dataset", "fairfedmed_oph"], ("{tmp}/nope",)),
    Case("inspect", "root-is-a-file", lambda ctx: [str(ctx.file("f", "x")), "--dataset", "fairfedmed_oph"], ("{tmp}/f",)),
    Case("inspect", "unknown-dataset", lambda ctx: [str(ctx.tmp), "--dataset", "nope"], ("--dataset", "unknown dataset 'nope'")),
    Case("inspect", "unknown-attribute", lambda ctx: [*oph_csv(lambda r: None)(ctx), "--attribute", "planet"], ("planet",)),
    Case("inspect", "csv-not-utf8", oph_csv(lambda r: (r / OPH_TRAIN).write_bytes((r / OPH_TRAIN).read_bytes() + "Zo\u00eb\n".encode("latin-1"))), (OPH_TRAIN, "UTF-8")),
    Case("inspect", "csv-is-a-directory", oph_csv(lambda r: ((r / OPH_TRAIN).unlink(), (r / OPH_TRAIN).mkdir())), (OPH_TRAIN,)),
]


def chest(change: Callable[[Ctx, list[str]], list[str]]) -> Callable[[Ctx], list[str]]:
    def build(ctx: Ctx) -> list[str]:
        raw = write_raw(ctx.tmp / "raw")
        return change(ctx, prep_args(raw, ctx.out))

    return build


def replace(flag: str, value: Callable[[Ctx], Path]) -> Callable[[Ctx, list[str]], list[str]]:
    def change(ctx: Ctx, argv: list[str]) -> list[str]:
        argv[argv.index(flag) + 1] = str(value(ctx))
        return argv

    return change


PREPARE_CHEST = [
    Case("prepare_chest", "chexpert-missing", chest(replace("--chexpert", lambda ctx: ctx.tmp / "nope")), ("{tmp}/nope/train.csv: file not found",)),
    Case("prepare_chest", "demo-not-xlsx", chest(replace("--chexpert-demo", lambda ctx: ctx.file("demo.csv", "a,b\n"))), ("{tmp}/demo.csv: expected the CheXpert demographics workbook (.xlsx)",)),
    Case("prepare_chest", "demo-not-a-workbook", chest(replace("--chexpert-demo", lambda ctx: ctx.file("demo.xlsx", "a,b\n"))), ("{tmp}/demo.xlsx: not a readable .xlsx workbook",)),
    Case("prepare_chest", "mimic-iv-a-file", chest(replace("--mimic-iv", lambda ctx: ctx.file("iv", "x"))), ("{tmp}/iv/hosp/patients.csv.gz: file not found",)),
    Case("prepare_chest", "train-csv-not-utf8", chest(lambda ctx, argv: (ctx.tmp / "raw/CheXpert-v1.0-small/train.csv").write_bytes(b"Path,\xff\n") and argv), ("train.csv: not a readable CSV",)),
    Case("prepare_chest", "out-is-a-file", chest(lambda ctx, argv: ctx.file("out", "mine\n") and argv), ("--out {out} is not a directory",)),
]

SYNTHETIC = [
    Case("synthetic", "out-is-a-file", lambda ctx: ["--out", str(ctx.file("out", "mine\n"))], ("--out {out} is not a directory",)),
    Case("synthetic", "out-under-a-file", lambda ctx: ["--out", str(ctx.file("f", "x") / "set")], ("--out {tmp}/f/set: {tmp}/f is a file",)),
    Case("synthetic", "out-not-empty", lambda ctx: ["--out", str(ctx.file("out/notes.txt", "mine").parent)], ("{out} is not empty; pass --force",)),
    Case("synthetic", "patients-zero", lambda ctx: ["--out", str(ctx.out), "--patients", "0"], ("patients",)),
    Case("synthetic", "fundus-size-tiny", lambda ctx: ["--out", str(ctx.out), "--fundus-size", "2", "--patients", "30"], ("fundus_size",)),
    Case("synthetic", "bad-value-with-force", lambda ctx: ["--out", str(ctx.file("out/notes.txt", "mine").parent), "--force", "--patients", "-3"], ("patients",)),
]

DOCTOR = [
    Case("doctor", "share-zero", lambda ctx: ["--share", "0"], ("--share must be in (0, 0.5]", "got 0")),
    Case("doctor", "share-whole-device", lambda ctx: ["--share", "1"], ("--share must be in (0, 0.5]",)),
    Case("doctor", "share-nan", lambda ctx: ["--share", "nan"], ("--share must be in (0, 0.5]", "got nan")),
    Case("doctor", "out-is-a-file", lambda ctx: ["--out", str(ctx.file("out", "mine\n"))], ("--out {out} is not a directory",)),
    Case("doctor", "out-not-empty", lambda ctx: ["--out", str(ctx.file("out/notes.txt", "mine").parent)], ("--out {out} is not empty",)),
    Case("doctor", "json-is-a-directory", lambda ctx: ["--json", str(ctx.tmp)], ("--json {tmp} is a directory",)),
    Case("doctor", "json-in-a-missing-folder", lambda ctx: ["--json", str(ctx.tmp / "no" / "d.json")], ("{tmp}/no is not an existing directory",)),
]

CASES = COMPARE + REPORT + TUNE + PRETRAIN + INSPECT + PREPARE_CHEST + SYNTHETIC + DOCTOR


def _no_ray(*args: object, **kwargs: object) -> None:
    raise AssertionError("a malformed input reached connect_ray: it was not refused before Ray starts")


@pytest.mark.parametrize("case", [pytest.param(c, id=f"{c.command}-{c.id}") for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_damaged(case: Case, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(driver, "connect_ray", _no_ray)
    cache = tmp_path.parent / f"{tmp_path.name}-cache"  # a private cache: nothing may land in it
    cache.mkdir()
    monkeypatch.setenv("RAYSIM_CACHE", str(cache))
    ctx = Ctx(tmp_path, request)
    argv = case.argv(ctx)
    before = {path: snapshot(path) for path in [*ctx.watched, cache]}
    out_existed = ctx.out.exists()
    capsys.readouterr()
    try:
        code = COMMANDS[case.command](argv)
    except SystemExit as err:
        pytest.fail(f"argparse exit {err.code}: {capsys.readouterr().err}")
    except Exception as err:  # what a user would see as a traceback
        pytest.fail(f"main raised {type(err).__name__}: {err}")
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in captured.err + captured.out
    for needle in case.needles:
        needle = needle.replace("{out}", str(ctx.out)).replace("{tmp}", str(tmp_path))
        assert needle in lines[0], (needle, lines[0])
    if not out_existed:  # a fresh --out: a refused command leaves no trace
        assert not ctx.out.exists(), sorted(p.name for p in ctx.out.rglob("*"))
    for path, files in before.items():
        after = snapshot(path)
        assert after == files, (path, sorted(name for name in files.keys() | after.keys() if files.get(name) != after.get(name)))


def test_catalogue_covers_every_command() -> None:
    counts = {name: sum(c.command == name for c in CASES) for name in COMMANDS}
    assert all(n >= 5 for n in counts.values()), counts
    assert len({(c.command, c.id) for c in CASES}) == len(CASES)


# --- labels are text, never mathtext ----------------------------------------------------------


def test_dollar_signs_in_labels_are_plain_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A method, client or group named with `$...$` (matplotlib would parse it as mathtext, and
    `$x^$` crashed the report and compare.html) is drawn as the text it is."""
    label = "fed$x^$"
    for seed in (0, 1):
        make_run(tmp_path / "runs" / f"{label}-{seed}", {"name": label}, seed, {1: 0.7, 2: 0.8}, {1: 0.6, 2: 0.75}, clients={"site$1$": 0.7, "site_{2}$": 0.6})
    assert compare.main([str(tmp_path / "runs"), "--out", str(tmp_path / "cmp")]) == 0
    assert report.main([str(tmp_path / "runs" / f"{label}-0")]) == 0
    assert "fed$x^$" in (tmp_path / "cmp" / "compare.html").read_text() and (tmp_path / "runs" / f"{label}-0" / "report.html").is_file()


# --- the console scripts, end to end ----------------------------------------------------------


@pytest.mark.slow  # a fresh interpreter in a subprocess
def test_console_scripts_refuse_bad_input_in_one_line(tmp_path: Path) -> None:
    """raysim-run and raysim-tune as installed: one `error:` line, exit 2, no --out left."""
    bin_dir = Path(sys.executable).parent
    study = _study(tmp_path, num_samples="many")
    commands = {
        "raysim-run": [str(bin_dir / "raysim-run"), "--out", str(tmp_path / "run"), "federation.rounds=many"],
        "raysim-tune": [str(bin_dir / "raysim-tune"), str(study), "--out", str(tmp_path / "study")],
    }
    env = {**os.environ, "RAYSIM_CACHE": str(tmp_path / "cache")}
    started = {name: subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for name, argv in commands.items()}
    errors = {}
    for name, process in started.items():
        out, err = process.communicate(timeout=180)
        lines = err.strip().splitlines()
        assert process.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, err[-2000:])
        assert "Traceback" not in out + err
        errors[name] = lines[0]
    assert "federation.rounds" in errors["raysim-run"] and "num_samples must be an integer >= 1, got 'many'" in errors["raysim-tune"]
    assert not (tmp_path / "run").exists() and not (tmp_path / "study").exists() and not (tmp_path / "cache").exists()
    assert yaml.safe_load(study.read_text())["num_samples"] == "many"  # the study file as it was


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_bad_flag_is_one_line_and_exit_2_in_every_command(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """argparse's own errors keep the contract too (raysim.cli.ArgumentParser): one line, exit 2."""
    with pytest.raises(SystemExit) as err:
        COMMANDS[command](["--no-such-flag"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: python -m raysim.") and ("--no-such-flag" in lines[0] or "arguments are required" in lines[0]), lines
