"""Run directories at a pyarrow.fs URI (a local `file://` filesystem stands in for S3): the
mirror's push order and pruning, pulling back, `--out` resolution. A run that checkpoints to a
URI and resumes from it: tests/engine/test_faults.py."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from raysim.config import ConfigError
from raysim.outputs import storage

from helpers import load_config


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_out_is_resolved_before_anything_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert storage.resolve_out("runs/x") == str(tmp_path / "runs" / "x")
    assert storage.resolve_out(f"file://{tmp_path}/runs/y/") == f"file://{tmp_path}/runs/y"
    with pytest.raises(ConfigError, match=r"--out nosuchscheme://bucket/x: not a run directory pyarrow can open"):
        storage.resolve_out("nosuchscheme://bucket/x")


def test_push_sends_markers_last_and_deletes_what_was_pruned_then_pull_gets_it_back(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/remote/run"
    local = tmp_path / "staging"
    for name, text in {"config.yaml": "seed: 0\n", "checkpoints/round_0001/server.pt": "s1", "checkpoints/round_0001/COMPLETE": "1\n"}.items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_text(text)
    mirror = storage.RunMirror(uri, local)
    order: list[str] = []
    upload = mirror._upload
    mirror._upload = lambda path, name: (order.append(name), upload(path, name))  # observe, then copy for real
    assert mirror.push() == order
    assert order[-1] == "checkpoints/round_0001/COMPLETE" and set(order) == set(files_under(local))
    assert files_under(tmp_path / "remote" / "run") == files_under(local)
    assert mirror.push() == []  # nothing changed: nothing copied

    # the next checkpoint: round 2 written, round 1 pruned locally, a half-written file ignored
    (local / "checkpoints/round_0002").mkdir()
    (local / "checkpoints/round_0002/server.pt").write_text("s2")
    (local / "checkpoints/round_0002/server.pt.tmp").write_text("half")
    (local / "checkpoints/round_0002/COMPLETE").write_text("2\n")
    for name in ("server.pt", "COMPLETE"):
        (local / "checkpoints/round_0001" / name).unlink()
    (local / "checkpoints/round_0001").rmdir()
    order.clear()
    mirror.push()
    assert order == ["checkpoints/round_0002/server.pt", "checkpoints/round_0002/COMPLETE"]
    remote = files_under(tmp_path / "remote" / "run")
    assert remote == {k: v for k, v in files_under(local).items() if not k.endswith(".tmp")}
    assert mirror.latest_checkpoint() == "checkpoints/round_0002"

    # an output part dropped by a replay (metrics.parquet is a folder of parts) goes at the URI too
    (local / "metrics.parquet").mkdir()
    (local / "metrics.parquet" / "part-r000002-k00.parquet").write_text("rows")
    mirror.push()
    (local / "metrics.parquet" / "part-r000002-k00.parquet").unlink()
    mirror.push()
    assert not (tmp_path / "remote" / "run" / "metrics.parquet" / "part-r000002-k00.parquet").exists()
    remote = files_under(tmp_path / "remote" / "run")

    again = storage.RunMirror(uri, tmp_path / "elsewhere")
    assert files_under(again.pull()) == remote
    assert again.push() == []  # what was pulled counts as pushed


def test_one_driver_per_run_directory_and_the_lock_dies_with_its_process(tmp_path: Path, oph_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import signal
    import subprocess
    import sys

    from raysim import config, run
    from raysim.engine.driver import Driver

    from helpers import load_config, tiny_overrides

    held = storage.RunLock(tmp_path).acquire()
    with pytest.raises(ConfigError, match=rf"^{tmp_path} is in use by another raysim driver \(pid {os.getpid()} on .+\); wait for it to end or choose another --out$"):
        storage.RunLock(tmp_path).acquire()
    cfg = load_config(None, tiny_overrides(oph_root))
    with pytest.raises(ConfigError, match="is in use by another raysim driver"):
        Driver(cfg, tmp_path, echo=lambda _: None).start()  # refused before anything starts
    (tmp_path / "config.yaml").write_text(config.dump(cfg))
    (tmp_path / "checkpoints" / "round_0001").mkdir(parents=True)
    (tmp_path / "checkpoints" / "round_0001" / "COMPLETE").write_text("1\n")
    assert run.main(["--resume", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {tmp_path} is in use by another raysim driver (pid {os.getpid()} on {socket.gethostname()}); wait for it to end or choose another --out"]
    held.release()
    storage.RunLock(tmp_path).acquire().release()

    # a driver killed with SIGKILL leaves the lock file, not the lock
    holder = subprocess.Popen([sys.executable, "-c", f"from raysim import storage; import time; held = storage.RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(300)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match=f"pid {holder.pid} on"):
        storage.RunLock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    storage.RunLock(tmp_path).acquire().release()


def test_default_run_names_started_in_the_same_second_differ(tmp_path: Path) -> None:
    from raysim import run

    cfg = load_config(None, [])
    made = [run.new_default_run_dir(cfg, tmp_path / "runs") for _ in range(3)]
    assert len(set(made)) == 3 and all(Path(p).is_dir() and Path(p).is_absolute() for p in made)
    assert {Path(p).name.rsplit("-s0", 1)[-1] for p in made} >= {"-2", "-3"} or len({Path(p).name for p in made}) == 3


def test_the_lock_stays_local(tmp_path: Path) -> None:
    local = tmp_path / "staging"
    lock = storage.RunLock(local).acquire()
    (local / "config.yaml").write_text("seed: 0\n")
    mirror = storage.RunMirror(f"file://{tmp_path}/remote", local)
    assert mirror.push() == ["config.yaml"]
    mirror.pull()  # a pull keeps the lock its driver holds
    assert (local / storage.LOCK).exists() and (local / "config.yaml").exists()
    lock.release()
