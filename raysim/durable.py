"""Durable file replacement: a renamed file's name survives a crash only once its folder is
fsynced. Used by every layer that writes files others may read mid-run (the shard cache,
checkpoints, the run's outputs)."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make the entries of `folder` (files created, renamed or deleted in it) durable: a file's
    own fsync does not cover its name. Filesystems without directory fsync are left as they are."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # e.g. some network filesystems
            raise
    finally:
        os.close(fd)


def replace_durably(tmp: Path, path: Path) -> None:
    """Rename `tmp` (written and fsynced by the caller) to `path` and fsync the folder, so that
    after a crash `path` is either the old file or the whole new one, under its name."""
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)
