"""Checkpoints under any path, past round 9999, durable and checked; honest resumes (issue 26).

Unit tests without Ray, except one run under `.../checkpoints/x` with a killed client actor
(it shares tests/engine/test_faults.py's uninterrupted run).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from test_checkpoints import state, write
from test_faults import ROUNDS, run_with_fault, uninterrupted  # noqa: F401 - the fixture, computed once per session

from raysim import config, run
from raysim.config import ConfigError, DataConfig
from raysim.datasets.cache import load_cached
from raysim.datasets.fairfedmed_oph import FairFedMedOph
from raysim.engine import checkpoints
from raysim.engine import engine as engine_module
from raysim.engine.driver import Driver
from raysim.outputs import resume_check, storage
from raysim.outputs.recorder import METRIC_COLUMNS, RunRecorder

from helpers import load_config, make_driver, tiny_overrides

# --- 1. a run directory under a folder named `checkpoints` ---------------------------------------


def test_a_run_under_a_folder_named_checkpoints_verifies_and_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "checkpoints" / "exp1"
    one = write(run_dir, 1, {"a": state(1.0)})
    write(run_dir, 2, {"b": state(2.0)}, one)
    folder, skipped = checkpoints.usable(run_dir)
    assert folder.name == "round_0002" and skipped == []
    assert set(checkpoints.load_manifest(folder)["files"]) == {"round_0002/server.pt", "round_0002/clients/actor_000.pt", "round_0001/clients/actor_000.pt"}


def test_a_killed_client_actor_under_checkpoints_x_ends_with_the_uninterrupted_metrics(uninterrupted, oph_root: Path, tmp_path: Path) -> None:  # noqa: F811 - the imported fixture
    """The issue's "Done when": `--out <tmp>/checkpoints/x`, a client actor killed mid-round."""
    lines: list[str] = []
    run_dir = tmp_path / "checkpoints" / "x"
    driver = make_driver(oph_root, run_dir, lines, **ROUNDS)
    metrics = run_with_fault(driver, lambda pids: os.kill(pids["site2"], signal.SIGKILL))
    assert any("replaying from checkpoint round_0001" in line for line in lines), lines
    pd.testing.assert_frame_equal(metrics, uninterrupted, check_exact=True)
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "metrics.parquet"), uninterrupted, check_exact=True)
    saved = resume_check.saved_record(run_dir)  # what a resume of this run will check, kept at its start
    assert saved["rounds"] == 3 and list(saved["keys"])[0] == "seed" and saved["id_key_check"] is None


# --- 3. rounds past 9999 -------------------------------------------------------------------------


def test_rounds_past_9999_are_ordered_by_their_number_locally_and_at_a_uri(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    mirror = storage.RunMirror(f"file://{tmp_path}/bucket/run", local=run_dir)
    previous = None
    for round_ in (9998, 9999, 10000, 10001):
        previous = write(run_dir, round_, {"a": state(float(round_))}, previous, keep=2)
        mirror.push()
        assert checkpoints.latest(run_dir) == checkpoints.folder(run_dir, round_)
        assert mirror.latest_checkpoint() == f"checkpoints/{checkpoints.folder(run_dir, round_).name}"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round_10000", "round_10001"]
    assert sorted(os.listdir(tmp_path / "bucket" / "run" / "checkpoints")) == ["round_10000", "round_10001"]
    folder, skipped = checkpoints.usable(run_dir)
    assert folder.name == "round_10001" and skipped == [] and checkpoints.load_server(folder)[1] == 10001


# --- 5. durability -------------------------------------------------------------------------------


class Syscalls:
    """The order of fsync / rename / unlink calls, each still made (a spy, not a stand-in):
    (kind, path): an fsync's file or folder, a rename's target."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, str]] = []
        for name in ("fsync", "replace", "unlink", "rmdir"):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, self._spy(name, real))

    def _spy(self, name: str, real):  # noqa: ANN202 - the wrapped os function's own signature
        def call(target, *args, **kwargs):  # noqa: ANN001, ANN202
            if name == "fsync":
                self.calls.append(("fsync", os.readlink(f"/proc/self/fd/{target}")))
            else:
                self.calls.append((name, str(args[0] if name == "replace" else target)))
            return real(target, *args, **kwargs)

        return call

    def synced_after(self, index: int, path: Path) -> bool:
        return ("fsync", str(path)) in self.calls[index + 1 :]


def test_checkpoint_renames_are_synced_and_pruning_waits_until_the_new_round_is_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one = write(tmp_path, 1, {"a": state(1.0)}, keep=1)
    calls = Syscalls(monkeypatch)
    write(tmp_path, 2, {"a": state(2.0)}, one, keep=1)
    root = tmp_path / "checkpoints"
    renamed = [(i, Path(target)) for i, (kind, target) in enumerate(calls.calls) if kind == "replace"]
    assert len(renamed) == 4  # server.pt, actor_000.pt, MANIFEST.json, COMPLETE
    for i, target in renamed:
        assert calls.synced_after(i, target.parent), (target, calls.calls[i:])
    complete = next(i for i, target in renamed if target.name == checkpoints.COMPLETE)
    pruned = next(i for i, (kind, target) in enumerate(calls.calls) if kind == "unlink" and "round_0001" in target)
    for folder in (root / "round_0002", root, tmp_path):  # COMPLETE's entry, round_0002's, checkpoints/'
        assert ("fsync", str(folder)) in calls.calls[complete + 1 : pruned], folder
    assert sorted(p.name for p in root.iterdir()) == ["round_0002"]


def test_parquet_parts_are_synced_before_and_after_their_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = RunRecorder(tmp_path)
    calls = Syscalls(monkeypatch)
    row = {"round": 1, "split": "val", "client": "mean", "role": "", "attribute": "", "group": "", "metric": "auc", "value": 0.5}
    recorder.add(pd.DataFrame([row], columns=METRIC_COLUMNS), [])
    recorder.close()
    part = tmp_path / "metrics.parquet" / "part-r000001-k00.parquet"
    rename = calls.calls.index(("replace", str(part)))  # a rename is recorded by its target
    assert ("fsync", str(part.with_name(f".{part.name}.tmp"))) in calls.calls[:rename]
    assert calls.synced_after(rename, part.parent)
    pd.testing.assert_frame_equal(pd.read_parquet(part.parent), recorder.metrics, check_dtype=False)


def test_a_newest_checkpoint_without_a_usable_manifest_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    one = write(tmp_path, 1, {"a": state(1.0)})
    write(tmp_path, 2, {"a": state(2.0)}, one)
    manifest = tmp_path / "checkpoints" / "round_0002" / checkpoints.MANIFEST
    good = manifest.read_text()
    for broken, why in [(None, "no MANIFEST.json"), ("[]", "no format version"), ('{"format": 2, "files": 3}', "its file list"), ("{not json", "unreadable")]:
        manifest.unlink(missing_ok=True)
        if broken is not None:
            manifest.write_text(broken)
        folder, skipped = checkpoints.usable(tmp_path)
        assert folder.name == "round_0001" and len(skipped) == 1 and why in skipped[0], skipped
    manifest.write_text(good)
    assert checkpoints.usable(tmp_path)[0].name == "round_0002"


@pytest.mark.parametrize("name", ["../../etc/passwd", "/dev/zero", "round_0002/../../../x", "round_0002/clients/../server.pt", "round_0002/other.bin"])
def test_a_manifest_naming_a_file_outside_the_layout_is_refused(tmp_path: Path, name: str) -> None:
    one = write(tmp_path, 1, {"a": state(1.0)})
    write(tmp_path, 2, {"a": state(2.0)}, one)
    path = tmp_path / "checkpoints" / "round_0002" / checkpoints.MANIFEST
    manifest = json.loads(path.read_text())
    manifest["files"][name] = {"bytes": 0, "sha256": checkpoints.sha256(Path(os.devnull))}  # /dev/zero would never end
    manifest["clients"]["a"] = name
    path.write_text(json.dumps(manifest))
    folder, skipped = checkpoints.usable(tmp_path)
    assert folder.name == "round_0001" and f"file name {name!r} is not round_NNNN/server.pt" in skipped[0], skipped


@pytest.mark.parametrize("damage", ["empty images", "cut images", "no meta", "bad meta"])
def test_a_damaged_shard_cache_entry_is_rebuilt_and_entries_are_written_durably(damage: str, oph_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A zero-length images.npy (a crash before the data reached the disk) used to kill every
    later run's actor until the user deleted the cache: it is decoded again instead."""
    monkeypatch.setenv("RAYSIM_CACHE", str(tmp_path / "cache"))
    src = FairFedMedOph(DataConfig(name="fairfedmed_oph", root=str(oph_root)), img_size=16, seed=0)
    spec = src.client_specs()[0]
    calls = Syscalls(monkeypatch)
    first = load_cached(src, spec, "train")
    (source_folder,) = (tmp_path / "cache" / "shards").iterdir()
    (pack,) = source_folder.iterdir()
    synced = [Path(path).name for kind, path in calls.calls if kind == "fsync"]
    assert synced[:2] == ["images.npy", "index.json"] and synced[-1] == source_folder.name, synced  # the files, then the renamed pack's folder
    images, index = pack / "images.npy", pack / "index.json"
    {
        "empty images": lambda: images.write_bytes(b""),
        "cut images": lambda: images.write_bytes(images.read_bytes()[:-7]),
        "no meta": index.unlink,
        "bad meta": lambda: index.write_text("{"),
    }[damage]()
    again = load_cached(src, spec, "train")
    assert not isinstance(again.images, np.memmap)  # decoded, not read from the damaged pack
    assert np.array_equal(again.images, first.images) and list(again.table.sample_ids) == list(first.table.sample_ids)
    third = load_cached(src, spec, "train")
    assert isinstance(third.images, np.memmap) and np.array_equal(third.images, first.images)  # the rebuilt pack
    (rebuilt,) = source_folder.iterdir()  # the damaged pack set aside and removed
    assert rebuilt != pack


# --- 7. what --resume may change -----------------------------------------------------------------

KEY_A, KEY_B = "a" * 32, "b" * 32


class ReachedRay(Exception):
    """A resume every check let through: it went on to start Ray."""


def _reached_ray(*args: object, **kwargs: object) -> None:
    raise ReachedRay


def started_run(tmp_path: Path, oph_root: Path, **overrides: object) -> Path:
    """A run directory as a fresh start leaves it for a resume: config.yaml, provenance.json with
    the resume check (what `Driver.start` adds), a complete checkpoint."""
    cfg = load_config(None, tiny_overrides(oph_root, **overrides))
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "round_0001").mkdir(parents=True)
    (run_dir / "checkpoints" / "round_0001" / checkpoints.COMPLETE).write_text("1\n")
    (run_dir / "config.yaml").write_text(config.dump(cfg))
    (run_dir / "provenance.json").write_text(json.dumps({resume_check.RECORD: resume_check.record(cfg, run_dir)}))
    return run_dir


def edit(run_dir: Path, **changes: object) -> None:
    """config.yaml with dotted keys changed (as a user edits it before --resume)."""
    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    for dotted, value in changes.items():
        *sections, key = dotted.split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = value
    (run_dir / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def resume(run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    """`--resume run_dir` through the CLI, refused before Ray starts: its one stderr line."""
    monkeypatch.setattr(engine_module, "connect_ray", _reached_ray)
    capsys.readouterr()
    code = run.main(["--resume", str(run_dir)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == run.EXIT_BAD_INPUT and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


REFUSED = [
    ({}, {"seed": 1}, "seed differs from the run's start"),
    ({}, {"algorithm.name": "fedprox"}, "algorithm.name differs"),
    ({}, {"federation.lr": 0.5}, "federation.lr differs"),
    ({}, {"model.img_size": 32}, "model.img_size differs"),
    ({}, {"data.val_fraction": 0.3}, "data.val_fraction differs"),
    ({}, {"eval.bootstrap": 5}, "eval.bootstrap differs"),
    ({}, {"resources.threads_per_client": 2}, "resources.threads_per_client differs"),
    ({}, {"resources.num_gpus": 0.5}, "resources.num_gpus differs"),
    ({}, {"resources.driver_gpus": 1}, "resources.driver_gpus differs"),
    ({}, {"federation.rounds": 1}, "federation.rounds=1 is fewer than the run's 2"),
    ({"algorithm.name": "fedlora", "algorithm.ema": 0.5}, {"federation.rounds": 4}, "algorithm.ema > 0"),
    ({"algorithm.name": "dp_lora"}, {"federation.rounds": 4}, "reach algorithm.epsilon after federation.rounds"),
]


@pytest.mark.parametrize(("start", "changes", "needle"), REFUSED, ids=[next(iter(c)) + ("" if not s else f"-{s['algorithm.name']}") for s, c, _ in REFUSED])
def test_a_resume_that_changes_a_fixed_key_is_refused_before_ray(
    start: dict, changes: dict, needle: str, oph_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = started_run(tmp_path, oph_root, **start)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    edit(run_dir, **changes)
    line = resume(run_dir, monkeypatch, capsys)
    assert line.startswith(f"error: {run_dir}/config.yaml: ") and needle in line, line
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != "config.yaml"} == {p: b for p, b in before.items() if p.name != "config.yaml"}


def test_what_may_change_on_resume_passes_the_check(oph_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = started_run(tmp_path, oph_root, **{"algorithm.name": "dp_lora", "algorithm.noise_multiplier": 1.0})  # fixed noise: extendable
    (tmp_path / "moved").symlink_to(oph_root)
    changes = {
        "federation.rounds": 5,
        "data.root": str(tmp_path / "moved"),
        "resources.num_cpus": 0.5,
        "resources.actors": 1,
        "resources.object_store_gb": 1.0,
        "fault.min_timeout_s": 60.0,
        "fault.on_client_loss": "drop",
        "report.html": True,
        "checkpoint.keep": 5,
        "checkpoint.every": 2,
    }
    edit(run_dir, **changes)
    monkeypatch.setattr(engine_module, "connect_ray", _reached_ray)
    with pytest.raises(ReachedRay):
        run.main(["--resume", str(run_dir)])


@pytest.mark.parametrize("key", ["system.profiles", "system.availability_trace"])
def test_a_system_file_edited_under_the_same_name_is_refused_on_resume(key: str, oph_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The per-client profiles and the availability trace are part of the experiment: the same
    path with other rows would simulate other clients from the resumed round on."""
    csv = tmp_path / "system.csv"
    rows = {"system.profiles": ("client,speed\nsite1,2\n", "client,speed\nsite1,3\n"), "system.availability_trace": ("client,start,end\nsite1,0,100\nsite2,0,100\nsite3,0,100\n", "client,start,end\nsite1,0,50\nsite2,0,100\nsite3,0,100\n")}[key]
    csv.write_text(rows[0])
    trace = {"system.availability": "trace"} if key == "system.availability_trace" else {}
    run_dir = started_run(tmp_path, oph_root, **{"system.simulate": True, key: str(csv), **trace})
    csv.write_text(rows[1])
    line = resume(run_dir, monkeypatch, capsys)
    assert line.startswith(f"error: {run_dir}/config.yaml: {key}={csv}: the file's content differs from the run's start"), line
    csv.write_text(rows[0])  # restored: the resume goes on
    monkeypatch.setattr(engine_module, "connect_ray", _reached_ray)
    with pytest.raises(ReachedRay):
        run.main(["--resume", str(run_dir)])
    provenance = json.loads((run_dir / "provenance.json").read_text())
    del provenance[resume_check.RECORD]["files"]  # a run started before the content check: unchecked
    (run_dir / "provenance.json").write_text(json.dumps(provenance))
    csv.write_text(rows[1])
    with pytest.raises(ReachedRay):
        run.main(["--resume", str(run_dir)])


def test_the_pseudonymisation_key_may_move_but_not_change(oph_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    for name, key in (("a", KEY_A), ("a-moved", KEY_A), ("b", KEY_B)):
        (keys / name).write_text(key)
    run_dir = started_run(tmp_path, oph_root, **{"eval.pseudonymize": True, "eval.id_key_file": str(keys / "a")})
    saved = json.loads((run_dir / "provenance.json").read_text())[resume_check.RECORD]
    assert KEY_A not in json.dumps(saved) and len(saved["id_key_check"]) == 16  # a check value, never the key
    edit(run_dir, **{"eval.id_key_file": str(keys / "b")})
    assert "eval.id_key_file: the pseudonymisation key is not the one the run started with" in resume(run_dir, monkeypatch, capsys)
    edit(run_dir, **{"eval.id_key_file": str(keys / "a-moved")})
    with pytest.raises(ReachedRay):
        run.main(["--resume", str(run_dir)])
    edit(run_dir, **{"eval.id_key_file": None})  # $RAYSIM_ID_KEY instead: the same key is fine, another is not
    monkeypatch.setenv("RAYSIM_ID_KEY", KEY_B)
    assert "the pseudonymisation key is not the one" in resume(run_dir, monkeypatch, capsys)


def test_the_driver_checks_too_before_anything_starts(oph_root: Path, tmp_path: Path) -> None:
    """A resume that does not come through the CLI (a Tune trial) meets the same check in
    `Driver.start`, before Ray is asked for anything."""
    run_dir = started_run(tmp_path, oph_root)
    edit(run_dir, seed=7)
    driver = Driver(load_config(run_dir / "config.yaml"), run_dir, echo=lambda _: None)
    try:
        with pytest.raises(ConfigError, match="seed differs from the run's start"):
            driver.start(resume=True)
    finally:
        driver.shutdown()
