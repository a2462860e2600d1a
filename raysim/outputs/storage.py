"""Where a run directory lives: a local path (resolved before anything starts) or a
`pyarrow.fs` URI (`s3://bucket/runs/x`, `gs://...`, `hdfs://...`, `file:///...`).

A run at a URI works in a local staging directory on the driver's node and mirrors it to the
URI with `RunMirror.push` after every complete checkpoint and at the end: new and changed
files first, each checkpoint's `COMPLETE` marker after the files it vouches for, and only then
the deletions of what the local directory no longer has (files it pushed or pulled itself). A push cut short therefore leaves at the URI
either the previous complete checkpoint or the new one, never a half one that looks complete;
`--resume URI` pulls the run back (`RunMirror.pull`) and `checkpoints.usable` verifies every
file against its manifest. Plain Python and pyarrow, no Ray.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any

import yaml

from raysim.config import ConfigError, ExperimentConfig

COMPLETE = "COMPLETE"  # checkpoints.COMPLETE (not imported: that module needs torch)
MIRRORED = "checkpoints"  # a folder of it pruned locally goes whole at the URI too
ROUND_MARKER = re.compile(rf"{MIRRORED}/round_\d{{4,}}/{COMPLETE}")  # checkpoints.ROUND_NAME's marker


def is_uri(out: str | Path) -> bool:
    return "://" in str(out)


def resolve_out(out: str | Path) -> str:
    """An absolute local path (`~` expanded; actors and a driver actor may run in another
    working directory) or a URI that pyarrow can open; a clear error otherwise."""
    text = str(out)
    if not is_uri(text):
        return str(Path(text).expanduser().resolve())
    _filesystem(text)
    return text.rstrip("/")


def _filesystem(uri: str) -> tuple[Any, str]:
    import pyarrow.fs

    try:
        fs, base = pyarrow.fs.FileSystem.from_uri(uri)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several kinds for a bad URI
        raise ConfigError(f"--out {uri}: not a run directory pyarrow can open ({str(err).splitlines()[0]}); use a local path or e.g. s3://bucket/runs/name") from err
    return fs, base.rstrip("/")


class RunMirror:
    """A run directory at `uri`, mirrored from the local staging directory `local`."""

    def __init__(self, uri: str, local: Path | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.fs, self.base = _filesystem(self.uri)
        self._local = Path(local) if local is not None else None
        self.pushed: dict[str, tuple[int, int]] = {}  # relative name -> (size, mtime_ns) as last pushed

    @property
    def local(self) -> Path:
        """The staging copy, made on first use (a mirror that only reads the URI makes none)."""
        if self._local is None:
            self._local = staging_dir(self.uri)
        return self._local

    @property
    def lock_dir(self) -> Path:
        """Where the driver of this URI locks it (`RunLock`): one per URI in the private staging
        root, so two drivers on one machine exclude each other although each stages apart."""
        folder = staging_root() / f"lock-{hashlib.sha256(self.uri.encode()).hexdigest()[:16]}"
        folder.mkdir(mode=0o700, exist_ok=True)
        return folder

    # --- the URI side -------------------------------------------------------------------------

    def remote_files(self) -> dict[str, int]:
        """Relative name -> size of every file under the URI (none: {})."""
        import pyarrow.fs

        selector = pyarrow.fs.FileSelector(self.base, recursive=True, allow_not_found=True)
        prefix = self.base + "/"
        return {info.path[len(prefix) :]: info.size for info in self.fs.get_file_info(selector) if info.type == pyarrow.fs.FileType.File}

    def read_text(self, name: str) -> str | None:
        import pyarrow.fs

        path = f"{self.base}/{name}"
        if self.fs.get_file_info(path).type != pyarrow.fs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as stream:
            return stream.read().decode()

    def write_text(self, name: str, text: str) -> None:
        self.fs.create_dir(self.base, recursive=True)
        with self.fs.open_output_stream(f"{self.base}/{name}") as stream:
            stream.write(text.encode())

    def latest_checkpoint(self) -> str | None:
        """The newest `checkpoints/round_NNNN` with a COMPLETE marker at the URI (not verified)."""
        done = [name.rsplit("/", 1)[0] for name in self.remote_files() if ROUND_MARKER.fullmatch(name)]
        return max(done, key=lambda folder: int(folder.rsplit("_", 1)[1]), default=None)  # by number: round_10000 after round_9999

    # --- both sides ---------------------------------------------------------------------------

    def pull(self) -> Path:
        """A fresh staging directory holding everything at the URI; returns it."""
        self.local.mkdir(parents=True, exist_ok=True)
        for item in self.local.iterdir():  # all but the lock the driver holds on it
            if item.name != LOCK:
                shutil.rmtree(item) if item.is_dir() else item.unlink()
        self.pushed.clear()
        for name in sorted(self.remote_files()):
            target = self.local / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open_input_stream(f"{self.base}/{name}") as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
            self.pushed[name] = _stamp(target)
        return self.local

    def push(self) -> list[str]:
        """Copy new and changed local files to the URI (COMPLETE markers last), then delete the
        checkpoint files the local directory no longer has; the names copied."""
        local = {p.relative_to(self.local).as_posix(): p for p in sorted(self.local.rglob("*")) if p.is_file() and not p.name.endswith(".tmp") and p.name != LOCK}
        changed = [name for name, path in local.items() if self.pushed.get(name) != _stamp(path)]
        changed.sort(key=lambda name: name.endswith(f"/{COMPLETE}"))  # stable: markers after every file
        for name in changed:
            self._upload(local[name], name)
        gone = [name for name in self.pushed if name not in local]  # pruned checkpoints, output parts dropped on a replay
        for name in gone:
            self.fs.delete_file(f"{self.base}/{name}")
            del self.pushed[name]
        # a checkpoint folder pruned whole goes whole (a filesystem keeps empty folders; S3 has none)
        kept = {name.split("/", 2)[1] for name in local if name.startswith(f"{MIRRORED}/")}
        for folder in sorted({name.split("/", 2)[1] for name in gone} - kept):
            with contextlib.suppress(OSError):  # already gone, or no folders on this filesystem
                self.fs.delete_dir(f"{self.base}/{MIRRORED}/{folder}")
        return changed

    def _upload(self, path: Path, name: str) -> None:
        stamp = _stamp(path)
        target = f"{self.base}/{name}"
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with open(path, "rb") as source, self.fs.open_output_stream(target) as sink:
            for block in iter(lambda: source.read(1 << 20), b""):
                sink.write(block)
        self.pushed[name] = stamp


def staging_root() -> Path:
    """`raysim-<uid>` under `$RAYSIM_STAGING` or the temp dir: made 0700, and refused unless this
    user owns it and nobody else may enter it (staging copies hold patient-level files)."""
    root = Path(os.environ.get("RAYSIM_STAGING") or tempfile.gettempdir()) / f"raysim-{os.getuid()}"
    root.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o700)
    info = root.lstat()
    mode = stat.S_IMODE(info.st_mode)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or mode & 0o077:
        raise ConfigError(
            f"{root}: the staging root of URI runs must be a directory of this user (uid {os.getuid()}) with mode 0700, "
            f"found uid {info.st_uid}, mode {mode:04o}; remove it or set RAYSIM_STAGING to a directory of your own"
        )
    return root


def staging_dir(uri: str) -> Path:
    """A fresh staging copy for a URI run: `tempfile.mkdtemp` in the private root (mode 0700, a
    name nobody can guess or create first); the URI is only in its prefix's hash, for people."""
    return Path(tempfile.mkdtemp(prefix=f"run-{hashlib.sha256(uri.encode()).hexdigest()[:8]}-", dir=staging_root()))


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


LOCK = ".lock"


class RunLock:
    """An exclusive `fcntl` lock on `RUN_DIR/.lock` for the driver that writes a run directory:
    two drivers on one directory would prune each other's checkpoints. The kernel releases it
    when the process ends, however it ends, so a resume after a crash or a retried Tune trial
    is never blocked. (A URI run locks `RunMirror.lock_dir`: one machine's drivers only.)"""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.file: Any = None

    def acquire(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(f"{self.path.parent} is in use by another raysim driver ({holder}); wait for it to end or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self.file = handle
        return self

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing drops the flock
            self.file = None


def check_unlocked(run_dir: Path) -> None:
    """Fail now, before anything starts, if a driver holds `run_dir` (the driver locks it itself)."""
    if (Path(run_dir) / LOCK).exists():
        RunLock(run_dir).acquire().release()


def create_run_dir(cfg: ExperimentConfig, out: str | Path | None) -> str:
    """A new run directory holding `cfg` as config.yaml: `out` (a path, made if missing, or a
    URI), which must be empty, else `runs/<time>-<algorithm>-s<seed>`. Returns it resolved
    (an absolute path or the URI). Nothing is trained yet."""
    run_dir = resolve_out(out) if out else new_default_run_dir(cfg)
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    if is_uri(run_dir):
        mirror = RunMirror(run_dir)
        if mirror.remote_files():
            raise ConfigError(f"--out {run_dir} is not empty; choose a new directory or continue it with --resume {run_dir}")
        mirror.write_text("config.yaml", text)
        return run_dir
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {run_dir} is not a directory (a file is there); give a directory to create")
    if path.exists() and any(path.iterdir()):
        raise ConfigError(f"--out {run_dir} is not empty; choose a new directory or continue it with --resume {run_dir}")
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(text)
    return run_dir


def new_default_run_dir(cfg: ExperimentConfig, parent: Path = Path("runs")) -> str:
    """`runs/<time>-<algorithm>-s<seed>`, created here (absolute); a name taken already, e.g.
    by a run started in the same second, gets `-2`, `-3`, ... (mkdir is atomic)."""
    stem = f"{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{cfg.algorithm['name']}-s{cfg.seed}"
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = parent / (stem if n == 1 else f"{stem}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return resolve_out(path)
    raise ConfigError(f"{parent}: no free run name for {stem}; pass --out")
