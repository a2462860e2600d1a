"""Malformed input through the real entry point: exit code 2, one line, nothing damaged.

A catalogue of broken inputs across the config file, the key=value overrides, --out /
--resume and every data source, each given to `raysim.run.main(argv)` as a user would.
Each case asserts the CLI's contract for bad input: exit code 2, stderr exactly one line
`error: ...` that names the culprit (key, file, column or client) and what was expected, no
traceback, and nothing damaged: a fresh --out is gone again (the same command can simply run
once the input is fixed), an existing run directory and the data root are byte for byte as
before (a driver that started took the run's .lock, which holds its pid).

Most cases run in-process: config errors never reach Ray (the test fails if one does), the
rest share the session's Ray (`ray_session`). Four run end to end as `python -m raysim.run`
subprocesses, started at once, each with its own Ray temp dir.

(tests/datasets/test_data_hardening.py holds the source-level catalogue: DataError messages for each
source; tests/kernel/test_config.py the config layer's own messages.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raysim import config, run
from raysim.engine import driver_actor
from raysim.engine import engine as engine_module

from helpers import load_config, tiny_overrides, write_isic, write_medmnist

OPH_TRAIN, OPH_TEST = "meta_site1_race_train.csv", "meta_site1_race_test.csv"
ISIC_META = "ISIC_2019_Training_Metadata_FL.csv"


# --- small data sets ----------------------------------------------------------------------------


def edit_csv(path: Path, change: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    change(pd.read_csv(path, dtype=str, keep_default_na=False)).to_csv(path, index=False)


def set_cell(path: Path, row: int, column: str, value: str) -> None:
    def change(frame: pd.DataFrame) -> pd.DataFrame:
        frame.loc[row, column] = value
        return frame

    edit_csv(path, change)


def first_file(root: Path, csv: str = OPH_TEST) -> Path:
    return root / "all" / str(pd.read_csv(root / csv, dtype=str, keep_default_na=False)["filename"][0])


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def truncate_member(path: Path, member: str = "slo_fundus.npy") -> None:
    """An npz whose zip archive is intact but whose `member` array stops half way."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    members[member] = members[member][: len(members[member]) // 2]
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` -> sha256 of its bytes ("dir" for folders)."""
    return {str(p.relative_to(root)): ("dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Intact Fed-ISIC2019 and MedMNIST roots (read-only: cases break private copies)."""
    roots = {"isic": tmp_path_factory.mktemp("isic"), "medmnist": tmp_path_factory.mktemp("medmnist")}
    write_isic(roots["isic"])
    write_medmnist(roots["medmnist"])
    return roots


# --- the catalogue ------------------------------------------------------------------------------


class Ctx:
    """What a case builds its argv from. `out` is a fresh run directory (not created); every
    folder in `watched` (existing run directories, data roots) must be unchanged afterwards."""

    def __init__(self, tmp: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp, self.request, self.monkeypatch = tmp, request, monkeypatch
        self.out = tmp / "run"
        self.watched: list[Path] = []

    def oph(self) -> Path:
        """A private copy of the tiny FairFedMed-Oph set, to break."""
        return self.request.getfixturevalue("oph_copy")

    def copy(self, name: str) -> Path:
        """A private copy of a pristine Fed-ISIC2019 / MedMNIST root, to break."""
        return Path(shutil.copytree(self.request.getfixturevalue("pristine")[name], self.tmp / name))

    def tiny(self, root: Path, **extra: object) -> list[str]:
        """--out and the fast overrides for `root` (watched), one round."""
        self.watched.append(root)
        return ["--out", str(self.out), *tiny_overrides(root, **{"federation.rounds": 1, **extra})]

    def file(self, name: str, text: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        return path

    def run_dir(self, config_text: str | bytes | None = None, *, complete: bool = True) -> Path:
        """An existing run directory (watched): config.yaml and a round-1 checkpoint folder."""
        path = self.tmp / "previous"
        checkpoint = path / "checkpoints" / "round_0001"
        checkpoint.mkdir(parents=True)
        (checkpoint / "server.pt").write_bytes(b"not torch")
        if complete:
            (checkpoint / "COMPLETE").write_text("1\n")
        if config_text is not None:
            (path / "config.yaml").write_bytes(config_text.encode() if isinstance(config_text, str) else config_text)
        self.watched.append(path)
        return path

    def saved_config(self, root: Path, **extra: object) -> str:
        return config.dump(load_config(None, tiny_overrides(root, **{"federation.rounds": 1, **extra})))

    def fresh(self, *overrides: str) -> list[str]:
        return ["--out", str(self.out), *overrides]


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Ctx], list[str]]  # builds the input (breaking files in ctx.tmp) and the argv
    needles: tuple[str, ...]  # all in the one error line; {out}, {tmp} are ctx's paths
    ray: bool = False  # reaches the driver actor (the shared Ray); else reaching Ray fails the case
    no_gpu: bool = False  # expects a Ray without GPUs (skipped where the session's Ray has one)


# --- how each case breaks its input ----------------------------------------------------------


def oph_case(change: Callable[[Path], object], **extra: object) -> Callable[[Ctx], list[str]]:
    def build(ctx: Ctx) -> list[str]:
        root = ctx.oph()
        change(root)
        return ctx.tiny(root, **extra)

    return build


def dotdot(root: Path) -> None:
    shutil.copy(first_file(root), root / "outside.npz")
    set_cell(root / OPH_TRAIN, 0, "filename", "../outside.npz")


def latin1(root: Path) -> None:
    path = root / OPH_TRAIN
    path.write_bytes(path.read_bytes().replace(b"white", "whité".encode("latin-1"), 1))


def one_train_row(root: Path) -> None:
    edit_csv(root / OPH_TRAIN, lambda frame: frame.iloc[:1])


def header_only(root: Path) -> None:
    edit_csv(root / OPH_TEST, lambda frame: frame.iloc[:0])


def medmnist_flat(ctx: Ctx) -> list[str]:
    root = ctx.copy("medmnist")
    write_medmnist(root, train_images=np.zeros((24, 64), np.uint8))
    return ctx.tiny(root, **{"data.name": "medmnist"})


def isic_unknown_sex(ctx: Ctx) -> list[str]:
    root = ctx.copy("isic")
    set_cell(root / ISIC_META, 3, "sex", "robot")
    return ctx.tiny(root, **{"data.name": "fed_isic2019"})


def damaged_checkpoint(manifest: object) -> Callable[[Ctx], list[str]]:
    def build(ctx: Ctx) -> list[str]:
        root = ctx.request.getfixturevalue("oph_root")
        ctx.watched.append(root)
        path = ctx.run_dir(ctx.saved_config(root))
        (path / "checkpoints" / "round_0001" / "MANIFEST.json").write_text(json.dumps(manifest))
        return ["--resume", str(path)]

    return build


def resume_data_gone(ctx: Ctx) -> list[str]:
    """A run whose data.root is gone since (moved, unmounted)."""
    return ["--resume", str(ctx.run_dir(ctx.saved_config(ctx.tmp / "data")))]


def not_empty(ctx: Ctx) -> list[str]:
    ctx.out.mkdir()
    (ctx.out / "notes.txt").write_text("mine\n")
    ctx.watched.append(ctx.out)
    return ["--out", str(ctx.out), "federation.rounds=1"]


def out_is_a_file(ctx: Ctx) -> list[str]:
    ctx.out.write_text("a file, not a directory\n")
    ctx.watched.append(ctx.tmp)
    return ["--out", str(ctx.out)]


def key_in_run_dir(ctx: Ctx) -> list[str]:
    root = ctx.request.getfixturevalue("oph_root")
    return ctx.tiny(root, **{"eval.pseudonymize": "true", "eval.id_key_file": str(ctx.out / "id.key")})


def no_key(ctx: Ctx) -> list[str]:
    ctx.monkeypatch.delenv("RAYSIM_ID_KEY", raising=False)
    return ctx.tiny(ctx.request.getfixturevalue("oph_root"), **{"eval.pseudonymize": "true"})


def short_key(ctx: Ctx) -> list[str]:
    ctx.monkeypatch.setenv("RAYSIM_ID_KEY", "short")
    return ctx.tiny(ctx.request.getfixturevalue("oph_root"), **{"eval.pseudonymize": "true"})


def oph(**extra: object) -> Callable[[Ctx], list[str]]:
    """The intact (read-only, watched) tiny set with overrides."""
    return lambda ctx: ctx.tiny(ctx.request.getfixturevalue("oph_root"), **extra)


def cfg_file(text: str | bytes, *extra: str) -> Callable[[Ctx], list[str]]:
    return lambda ctx: ["--config", str(ctx.file("my.yaml", text)), *ctx.fresh(*extra)]


def overrides(*items: str) -> Callable[[Ctx], list[str]]:
    return lambda ctx: ctx.fresh(*items)


ONE_ACTOR = {"resources.actors": 1}  # cases that start client actors: one process to start, not three

CASES = [
    # the config file
    Case("config-is-a-yaml-list", cfg_file("- federation\n- rounds\n"), ("{tmp}/my.yaml", "expected a mapping of config sections, got list")),
    Case("config-is-a-yaml-scalar", cfg_file("federation.rounds=3\n"), ("{tmp}/my.yaml", "expected a mapping of config sections, got str")),
    Case("config-is-invalid-yaml", cfg_file("federation: {rounds: [3\n"), ("{tmp}/my.yaml", "not valid YAML", "line 2")),
    Case("config-is-not-utf8", cfg_file("seed: 1  # caf\xe9\n".encode("latin-1")), ("{tmp}/my.yaml", "UTF-8")),
    Case("config-is-a-directory", lambda ctx: ["--config", str(ctx.tmp), *ctx.fresh()], ("{tmp}", "directory")),
    Case("config-file-missing", lambda ctx: ["--config", str(ctx.tmp / "nothere.yml"), *ctx.fresh()], ("config file {tmp}/nothere.yml not found", "presets: availability, default,")),
    Case("config-section-not-a-mapping", cfg_file("federation: 5\n"), ("federation must be a mapping of keys, got 5",)),
    Case("config-unknown-top-level-key", cfg_file("seeds: 3\n"), ("unknown config key 'seeds' (did you mean seed?)", "valid keys: seed,")),
    Case("config-negative-rounds", cfg_file("federation:\n  rounds: -3\n"), ("federation.rounds must be a positive number, got -3",)),
    Case("config-file-then-bad-override", cfg_file("federation:\n  rounds: 2\n", "federation.local_epochs=0"), ("federation.local_epochs must be a positive number, got 0",)),
    # overrides: syntax, keys, types, ranges, names
    Case("override-without-equals", overrides("federation.rounds"), ("override 'federation.rounds' must look like section.key=value",)),
    Case("override-without-key", overrides("=3"), ("override '=3' must look like section.key=value",)),
    Case("img-size-huge", overrides("model.img_size=100000000"), ("model.img_size must be at most 4096, got 100000000",)),
    Case("override-invalid-yaml-value", overrides("data.ratios=[0.5, 0.5"), ("data.ratios=[0.5, 0.5", "not valid YAML")),
    Case("override-unknown-section-key", overrides("federation.batchsize=8"), ("unknown config key 'federation.batchsize' (did you mean federation.batch_size?)",)),
    Case("override-unknown-model-key", overrides("model.depth=50"), ("unknown config key 'model.depth'", "valid keys: model.name, model.img_size")),
    Case("override-algorithm-not-a-mapping", overrides("algorithm=fedavg"), ("algorithm must be a mapping with a name, got 'fedavg'",)),
    Case("override-leaf-as-section", overrides("seed.value=1"), ("seed must be an integer, got {'value': 1}",)),
    Case("string-for-int", overrides("model.img_size=large"), ("model.img_size must be an integer, got 'large'",)),
    Case("bool-for-number", overrides("federation.lr=true"), ("federation.lr must be a number, got True",)),
    Case("number-for-bool", overrides("data.cache=1"), ("data.cache must be true or false, got 1",)),
    Case("list-for-int", overrides("federation.batch_size=[16, 32]"), ("federation.batch_size must be an integer, got [16, 32]",)),
    Case("float-for-int-rounds", overrides("federation.rounds=2.5"), ("federation.rounds must be an integer, got 2.5",)),
    Case("ratio-not-a-number", overrides("data.ratios=[0.5, x]"), ("data.ratios[1] must be a number, got 'x'",)),
    Case("zero-eval-every", overrides("eval.every=0"), ("eval.every must be a positive number, got 0",)),
    Case("val-fraction-one", overrides("data.val_fraction=1"), ("data.val_fraction must be a fraction in (0, 1), got 1.0",)),
    Case("momentum-out-of-range", overrides("federation.momentum=1.5"), ("federation.momentum must be in [0, 1), got 1.5",)),
    Case("ratios-do-not-sum-to-1", overrides("data.partition=quantity", "data.ratios=[0.5, 0.4]"), ("data.ratios must sum to 1, got 0.9",)),
    Case("quantity-without-ratios", overrides("data.partition=quantity"), ("data.partition=quantity needs data.ratios",)),
    Case("unknown-algorithm", overrides("algorithm.name=fedavgg"), ("algorithm.name: unknown algorithm 'fedavgg'; choose one of: adapter, afl, cksp, deer,", "fedavg,")),
    Case("algorithm-param-negative", overrides("algorithm.name=fedprox", "algorithm.mu=-1"), ("algorithm fedprox: mu must be a finite number >= 0, got -1",)),
    Case("algorithm-param-of-another-method", overrides("algorithm.name=fedavg", "algorithm.mu=0.1"), ("unknown config key 'algorithm.mu'", "valid keys: algorithm.name")),
    Case("unknown-data-source", overrides("data.name=medmnist2d"), ("data.name: unknown dataset 'medmnist2d'; choose one of:", "medmnist,")),
    Case("eval-predictions-invalid", overrides("eval.predictions=some"), ("eval.predictions must be one of all, final, none; got 'some'",)),
    Case("eval-clients-zero", overrides("eval.clients=0"), ("eval.clients must be all, sampled or a positive integer, got 0",)),
    # the simulated system (system.*)
    Case("system-key-without-simulate", overrides("system.p_offline=0.2"), ("system.p_offline is set but system.simulate is false",)),
    Case("system-p-offline-one", overrides("system.simulate=true", "system.availability=bernoulli", "system.p_offline=1"), ("system.p_offline must be in [0, 1), got 1.0",)),
    Case("system-availability-unknown", overrides("system.simulate=true", "system.availability=sometimes"), ("system.availability must be one of always, bernoulli, markov, window, trace",)),
    Case("fedbuff-without-simulate", overrides("algorithm.name=fedbuff"), ("algorithm fedbuff trains asynchronously in simulated time: set system.simulate=true",)),
    Case("concurrency-on-a-synchronous-method", overrides("system.simulate=true", "system.concurrency=2"), ("system.concurrency=2 is for asynchronous methods (fedasync, fedbuff); algorithm fedavg runs synchronous rounds",)),
    Case("deadline-on-fedbuff", overrides("system.simulate=true", "algorithm.name=fedbuff", "system.round_deadline_s=60"), ("system.round_deadline_s applies to synchronous rounds; algorithm fedbuff is asynchronous",)),
    Case("availability-trace-missing", lambda ctx: ctx.fresh("system.simulate=true", "system.availability=trace", f"system.availability_trace={ctx.tmp}/none.csv"), ("system.availability_trace={tmp}/none.csv: no such file",)),
    Case("correlate-unknown-group", overrides("system.simulate=true", "system.correlate=race=Martian", "system.offline_ratio=2"), ("system.correlate=race=Martian: race has no group 'Martian'; its groups:",)),
    Case("fault-max-restarts-negative", overrides("fault.max_restarts=-1"), ("fault.max_restarts must be an integer >= 0, got -1",)),
    Case("fault-min-timeout-zero", overrides("fault.min_timeout_s=0"), ("fault.min_timeout_s must be a positive number, got 0.0",)),
    Case("fault-timeout-factor-negative", overrides("fault.timeout_factor=-2"), ("fault.timeout_factor must be a positive number, got -2.0",)),
    Case("clients-per-actor-zero", overrides("resources.clients_per_actor=0"), ("resources.clients_per_actor must be a positive number, got 0",)),
    Case("num-cpus-negative", overrides("resources.num_cpus=-1"), ("resources.num_cpus must be a positive number, got -1.0",)),
    Case("huge-rounds-in-e-notation", overrides("federation.rounds=1e9"), ("federation.rounds must be an integer, got 1000000000.0",)),
    # checked by Driver() in this process, after config.yaml is written
    Case("eval-attributes-unknown", oph(**{"eval.attributes": "[race, planet]"}), ("eval.attributes ['planet'] not in data source fairfedmed_oph; choose from race,",)),
    Case("attribute-unknown", oph(**{"data.attribute": "planet", "eval.attributes": "[race]"}), ("data.attribute 'planet' not in data source fairfedmed_oph; choose from race,",)),
    Case("pseudonymize-without-key", no_key, ("eval.pseudonymize=true needs a key: set $RAYSIM_ID_KEY or eval.id_key_file",)),
    Case("pseudonymize-short-key", short_key, ("$RAYSIM_ID_KEY: the pseudonymisation key has 5 bytes, fewer than 16",)),
    Case("id-key-file-in-run-dir", key_in_run_dir, ("eval.id_key_file {out}/id.key lies in the run directory {out}",)),
    # --out and --resume
    Case("out-not-empty", not_empty, ("--out {out} is not empty; choose a new directory or continue it with --resume {out}",)),
    Case("out-is-a-file", out_is_a_file, ("--out {out}", "not a directory")),
    Case(
        "resume-with-overrides", lambda ctx: ["--resume", str(ctx.run_dir("seed: 0\n")), "federation.rounds=3"], ("--resume continues a run with its saved config: drop --config, --out and overrides",)
    ),
    Case("resume-without-config-yaml", lambda ctx: ["--resume", str(ctx.run_dir())], ("--resume {tmp}/previous: no config.yaml there (not a raysim run directory)",)),
    Case("resume-without-complete-checkpoint", lambda ctx: ["--resume", str(ctx.run_dir("seed: 0\n", complete=False))], ("--resume {tmp}/previous: no complete checkpoint to resume from",)),
    Case(
        "resume-config-not-a-mapping",
        lambda ctx: ["--resume", str(ctx.run_dir("- 1\n- 2\n"))],
        ("{tmp}/previous/config.yaml", "mapping"),
    ),
    Case("resume-config-invalid-yaml", lambda ctx: ["--resume", str(ctx.run_dir("seed: [0\n"))], ("{tmp}/previous/config.yaml", "not valid YAML")),
    Case("resume-config-not-utf8", lambda ctx: ["--resume", str(ctx.run_dir(b"seed: 0  # \xff\n"))], ("{tmp}/previous/config.yaml", "UTF-8")),
    Case("resume-config-unknown-key", lambda ctx: ["--resume", str(ctx.run_dir("federation:\n  epochs: 3\n"))], ("unknown config key 'federation.epochs'",)),
    Case(
        "resume-checkpoint-size-mismatch",
        damaged_checkpoint({"format": 2, "files": {"round_0001/server.pt": {"bytes": 10, "sha256": "0" * 64}}}),
        ("{tmp}/previous/checkpoints: no usable checkpoint", "round_0001/server.pt has 9 bytes, the manifest says 10"),
        ray=True,
    ),
    Case("resume-manifest-without-files", damaged_checkpoint({"format": 2}), ("MANIFEST.json",), ray=True),
    Case("resume-data-root-gone", resume_data_gone, ("data.root {tmp}/data is not a directory",), ray=True),
    # found by the driver actor: model, resources, data metadata
    Case("unknown-model", oph(**{"model.name": "resnet9000"}), ("model.name 'resnet9000' is not a timm model",), ray=True),
    Case("unknown-clip-architecture", oph(**{"model.name": "clip:ViT-Q-99"}), ("model.name=clip:ViT-Q-99: 'ViT-Q-99' is not an open_clip architecture",)),
    Case("clip-pretrained-downloads", oph(**{"model.name": "clip:RN50", "model.pretrained": True}), ("model.pretrained=true with model.name=clip:RN50: open_clip would download",)),
    Case("clip-weights-missing", oph(**{"model.name": "clip:RN50", "model.weights": "/no/such/clip.pt"}), ("model.weights=/no/such/clip.pt is not a file",)),
    Case("data-root-missing", lambda ctx: ctx.fresh(*tiny_overrides(ctx.tmp / "nope")), ("data.root {tmp}/nope is not a directory (fairfedmed_oph expects",), ray=True),
    Case("gpu-asked-none-there", oph(**{"resources.num_gpus": 1}), ("not even one client actor fits in 2 CPUs and 0 GPUs", "resources.num_gpus=1"), ray=True, no_gpu=True),
    Case("num-cpus-beyond-machine", oph(**{"resources.num_cpus": 64}), ("not even one client actor fits in 2 CPUs", "resources.num_cpus=64"), ray=True),
    Case(
        "driver-cpus-beyond-machine",
        oph(**{"resources.driver_cpus": 64}),
        ("resources.driver_cpus=64",),
        ray=True,
    ),
    Case("oph-csv-missing-column", oph_case(lambda r: edit_csv(r / OPH_TEST, lambda f: f.drop(columns=["filename"]))), (f"{OPH_TEST}: missing required column(s) 'filename'",), ray=True),
    Case("oph-unknown-race-code", oph_case(lambda r: set_cell(r / OPH_TRAIN, 2, "race", "martian")), (f"{OPH_TRAIN}: row 2: race='martian' is neither a known value",), ray=True),
    Case(
        "oph-duplicate-filename",
        oph_case(lambda r: edit_csv(r / OPH_TRAIN, lambda f: pd.concat([f, f.iloc[[1]]]))),
        (f"{OPH_TRAIN}: 1 filenames listed more than once (first: data_",),
        ray=True,
    ),
    Case("oph-missing-npz", oph_case(lambda r: first_file(r).unlink()), (f"{OPH_TEST}: 1 listed files are missing from", "(first: data_"), ray=True),
    Case("oph-dotdot-filename", oph_case(dotdot), (f"{OPH_TRAIN}: 1 filename value(s) are not paths relative to data.root/all", "'../outside.npz' contains a '..' component"), ray=True),
    Case("oph-csv-not-utf8", oph_case(latin1), (f"{OPH_TRAIN}: not a readable CSV: not UTF-8 text", "save it as UTF-8"), ray=True),
    Case("oph-empty-test-split", oph_case(header_only), ("site1: no samples left in train or test after the drop rules",), ray=True),
    Case(
        "oph-site-with-one-train-row",
        oph_case(one_train_row, **ONE_ACTOR),
        ("site1", "val", "data.val_fraction"),
        ray=True,
    ),
    Case("oph-truncated-npz", oph_case(lambda r: truncate(first_file(r)), **ONE_ACTOR), ("not a readable npz file (File is not a zip file)", "/all/data_"), ray=True),
    Case("medmnist-images-wrong-rank", medmnist_flat, ("pneumoniamnist.npz: train_images must be uint8 images (N, H, W) or (N, H, W, 3), got uint8 (24, 64)",), ray=True),
    Case("isic-unknown-sex", isic_unknown_sex, (f"{ISIC_META}: row 3: sex='robot' is not one of female, male, blank or unknown",), ray=True),
    # values the config layer lets through
    Case("seed-negative", oph(seed=-1), ("seed", "-1"), ray=True),
    Case(
        "start-timeout-huge",
        oph(**{"fault.start_timeout_s": "1e300"}),
        ("fault.start_timeout_s",),
        ray=True,
    ),
    Case(
        "start-timeout-nan",
        oph(**{"fault.start_timeout_s": ".nan"}),
        ("fault.start_timeout_s must be a positive number, got nan",),
        ray=True,
    ),
    Case(
        "lr-infinite",
        oph(**{"federation.lr": "1e999", **ONE_ACTOR}),
        ("federation.lr must be a positive number, got inf",),
        ray=True,
    ),
]


def _no_ray(*args: object, **kwargs: object) -> None:
    raise AssertionError("a case not marked ray reached connect_ray: the input was not refused before Ray starts")


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.ray else []) for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_damaged(case: Case, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    if case.ray:
        ray = request.getfixturevalue("ray_session")
        if case.no_gpu and ray.cluster_resources().get("GPU"):
            pytest.skip("expects a Ray without GPUs")
    else:
        monkeypatch.setattr(engine_module, "connect_ray", _no_ray)
    ctx = Ctx(tmp_path, request, monkeypatch)
    argv = case.argv(ctx)
    before = {path: snapshot(path) for path in ctx.watched}
    out_before = ctx.out.read_bytes() if ctx.out.is_file() else None  # e.g. --out naming a file
    capsys.readouterr()
    try:
        code = run.main(argv)
    except SystemExit as err:
        pytest.fail(f"argparse exit {err.code}: {capsys.readouterr().err}")
    except Exception as err:  # what a user would see as a traceback
        pytest.fail(f"main raised {type(err).__name__}: {err}")
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == run.EXIT_BAD_INPUT, captured.err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in captured.err + captured.out
    for needle in case.needles:
        needle = needle.replace("{out}", str(ctx.out)).replace("{tmp}", str(tmp_path))
        assert needle in lines[0], (needle, lines[0])
    if out_before is not None:
        assert ctx.out.read_bytes() == out_before  # the user's file, untouched
    elif str(ctx.out) in argv and ctx.out not in ctx.watched:  # a fresh --out: a refused run leaves no trace
        assert not ctx.out.exists(), sorted(p.name for p in ctx.out.iterdir())
    for path, files in before.items():
        after = snapshot(path)
        changed = {name for name in files.keys() | after.keys() if files.get(name) != after.get(name)}
        assert changed <= {".lock"}, (path, sorted(changed))
        if changed:  # a driver started on a run directory: its lock names it, nothing else moved
            assert case.ray and re.fullmatch(r"pid \d+ on \S+\n", (path / ".lock").read_text())


def test_catalogue_is_broad() -> None:
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
    sources = {name for name in ("oph", "medmnist", "isic") if any(c.id.startswith(name) for c in CASES)}
    assert sources == {"oph", "medmnist", "isic"}


# --- argparse and a driver actor Ray cannot place ---------------------------------------------


@pytest.mark.parametrize(("argv", "needle"), [(["--rounds", "3"], "unrecognized arguments: --rounds"), (["--out"], "argument --out: expected one argument")])
def test_a_bad_flag_is_one_line_and_exit_2(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad flag keeps the contract too: one `error:` line naming the flag (argparse's usage
    block was a second line before 0.6.0); exit 2."""
    with pytest.raises(SystemExit) as err:
        run.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and lines == [f"error: python -m raysim.run: {needle} (see python -m raysim.run --help)"]


def test_a_driver_gpu_the_machine_lacks_is_refused(ray_session, oph_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """main runs in a thread; after wait_s seconds the pending driver actor is killed
    (fault.max_restarts=0: no new one), so the thread ends either way."""
    if ray_session.cluster_resources().get("GPU"):
        pytest.skip("expects a Ray without GPUs")
    wait_s = 5
    started: list[object] = []
    launch = driver_actor.launch
    monkeypatch.setattr(driver_actor, "launch", lambda *a, **kw: started.append(launch(*a, **kw)) or started[-1])
    result: dict[str, object] = {}
    argv = ["--out", str(tmp_path / "run"), *tiny_overrides(oph_root, **{"federation.rounds": 1, "resources.driver_gpus": 1, "fault.max_restarts": 0})]
    thread = threading.Thread(target=lambda: result.setdefault("code", run.main(argv)), daemon=True)
    thread.start()
    thread.join(wait_s)
    hung = thread.is_alive()
    if hung:
        for handle in started:
            ray_session.kill(handle, no_restart=True)
        thread.join(60)
    lines = capsys.readouterr().err.strip().splitlines()
    assert not hung, f"no answer within {wait_s} s"
    assert result.get("code") == run.EXIT_BAD_INPUT and len(lines) == 1 and "resources.driver_gpus" in lines[0], lines


# --- end to end: the contract as a user sees it -----------------------------------------------


@dataclass
class Cli:
    """One `python -m raysim.run` of the end-to-end batch and what it was given."""

    argv: list[str]
    out: Path
    data: Path | None = None
    victim: Path | None = None
    ray_tmp: str = ""
    before: dict[str, str] | None = None  # snapshot of `data` before the run
    proc: subprocess.CompletedProcess[str] | None = None


def cli_config_error(tmp: Path, oph_root: Path) -> Cli:
    """A config file that is a YAML list: refused before anything is written or started."""
    path = tmp / "list.yaml"
    path.write_text("- fedavg\n- rounds: 3\n")
    return Cli(["--config", str(path), "--out", str(tmp / "run"), "federation.rounds=1"], tmp / "run", victim=path)


def cli_driver_data_error(tmp: Path, oph_root: Path) -> Cli:
    """An unknown race value in a site CSV: the driver actor reads the metadata and refuses it."""
    data = Path(shutil.copytree(oph_root, tmp / "oph"))
    set_cell(data / OPH_TEST, 1, "race", "martian")
    return Cli(["--out", str(tmp / "run"), *tiny_overrides(data, **{"federation.rounds": 1})], tmp / "run", data, data / OPH_TEST)


def cli_client_data_error(tmp: Path, oph_root: Path) -> Cli:
    """An npz whose archive is intact but whose slo_fundus array stops half way: only a client actor reads pixels."""
    data = Path(shutil.copytree(oph_root, tmp / "oph"))
    victim = first_file(data)
    truncate_member(victim)
    return Cli(["--out", str(tmp / "run"), *tiny_overrides(data, **{"federation.rounds": 1, **ONE_ACTOR})], tmp / "run", data, victim)


def cli_client_unreadable_npz(tmp: Path, oph_root: Path) -> Cli:
    """An npz cut short (no zip archive left) that only a client actor reads: not even one actor
    traceback of Ray's reaches stderr, and no restart."""
    data = Path(shutil.copytree(oph_root, tmp / "oph"))
    victim = sorted((data / "all").glob("*.npz"))[4]
    victim.write_bytes(victim.read_bytes()[:300])
    return Cli(["--out", str(tmp / "run"), *tiny_overrides(data, **{"federation.rounds": 1, **ONE_ACTOR})], tmp / "run", data, victim)


@pytest.fixture(scope="module")
def end_to_end(oph_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Cli]:
    """The four CLI runs, started at once (each with a private Ray temp dir, short for Ray's
    socket paths; never the machine's, and RAY_ADDRESS removed): their start-ups overlap."""
    makers = (cli_config_error, cli_driver_data_error, cli_client_data_error, cli_client_unreadable_npz)
    runs = {make.__name__: make(tmp_path_factory.mktemp(make.__name__), oph_root) for make in makers}
    procs = {}
    try:
        for name, case in runs.items():
            case.ray_tmp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")
            case.before = snapshot(case.data) if case.data else None
            env = {**os.environ, "RAY_TMPDIR": case.ray_tmp}
            env.pop("RAY_ADDRESS", None)
            procs[name] = subprocess.Popen([sys.executable, "-m", "raysim.run", *case.argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 300
        for name, proc in procs.items():
            try:
                stdout, stderr = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                proc.terminate()  # SIGTERM: the run shuts its own Ray down
                stdout, stderr = proc.communicate(timeout=60)
            runs[name].proc = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        yield runs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)
        for case in runs.values():
            if case.ray_tmp:
                shutil.rmtree(case.ray_tmp, ignore_errors=True)


def test_cli_config_error_end_to_end(end_to_end: dict[str, Cli]) -> None:
    run_ = end_to_end["cli_config_error"]
    proc = run_.proc
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [f"error: {run_.victim}: expected a mapping of config sections, got list"] and proc.stdout == ""
    assert not run_.out.exists() and not any(Path(run_.ray_tmp).iterdir())  # nothing written, no Ray started


def test_cli_data_error_found_by_the_driver_end_to_end(end_to_end: dict[str, Cli]) -> None:
    run_ = end_to_end["cli_driver_data_error"]
    proc = run_.proc
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [f"error: {run_.victim}: row 1: race='martian' is neither a known value (asian, black, white, unknown) nor unknown"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout and "driver actor lost" not in proc.stdout
    assert not run_.out.exists() and snapshot(run_.data) == run_.before  # a refused fresh run leaves no trace


def test_cli_truncated_array_found_by_a_client_actor_end_to_end(end_to_end: dict[str, Cli]) -> None:
    run_ = end_to_end["cli_client_data_error"]
    proc = run_.proc
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {run_.victim}: array 'slo_fundus' is corrupt ("), proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout and "driver actor lost" not in proc.stdout
    assert not run_.out.exists() and snapshot(run_.data) == run_.before


def test_cli_unreadable_npz_found_by_a_client_actor_end_to_end(end_to_end: dict[str, Cli]) -> None:
    run_ = end_to_end["cli_client_unreadable_npz"]
    proc = run_.proc
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [f"error: {run_.victim}: not a readable npz file (File is not a zip file)"], proc.stderr[-3000:]
    assert "driver actor lost" not in proc.stdout
    assert not run_.out.exists() and snapshot(run_.data) == run_.before
