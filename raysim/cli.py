"""The bad-input contract every raysim command keeps, in one place.

A malformed input gets exactly one line on stderr, `error: ...`, naming the file, key or value
and what was expected; exit code 2; no traceback; and nothing written: a fresh --out (a path
that did not exist when the command started) is gone again, so the same command simply runs
once the input is fixed. Each entry point hands its body to `guard` with the error classes
its own layers raise for bad input (ConfigError, DataError, RunReadError, ...); `guard` adds
the last-resort classes every command shares: an input so large that reading it runs out of
memory, one nested so deep that Python's recursion limit stops it, and an OSError naming a
file (missing, unreadable, a directory where a file is expected). Any other exception is a
bug and keeps its traceback. Plain Python, no Ray.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import typing
from collections.abc import Callable, Iterable
from pathlib import Path

EXIT_BAD_INPUT = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the contract's one line: a bad flag or a flag value of the wrong type is
    `error: <prog>: <message> (see <prog> --help)` and exit 2, without argparse's usage block."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


class InputError(ValueError):
    """Bad input found by a command's own argument checks (the message names the flag / file)."""


def one_line(err: BaseException) -> str:
    """The message on one line (a multi-line message's lines joined by spaces)."""
    raw = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)  # KeyError's str() is its repr
    text = " ".join(line.strip() for line in raw.splitlines() if line.strip())
    return text or type(err).__name__


def _last_resort(err: BaseException) -> str | None:
    """The one line for a bad-input class every command shares; None for anything else (a bug)."""
    if isinstance(err, MemoryError):
        return "out of memory reading the input: a file or array declares far more data than expected"
    if isinstance(err, RecursionError):
        return "the input is nested too deeply to process (Python's recursion limit)"
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or one_line(err)}"
    return None


def check_out_dir(out: str | Path | None, flag: str = "--out") -> None:
    """An InputError when `out` (a local directory to create or fill) names something that is
    not a directory; a pyarrow.fs URI (`s3://...`) is the storage layer's to check."""
    if out is None or "://" in str(out):
        return
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {out} is not a directory (a file is there); give a directory to create")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{flag} {out}: {parent} is a file, not a directory")
            break


def fresh_root(out: str | Path | None) -> Path | None:
    """The outermost folder a command would create for `out` (None when `out` exists or is a URI)."""
    if out is None or "://" in str(out):
        return None
    path = Path(out).absolute()
    if path.exists() or path.is_symlink():
        return None
    while not path.parent.exists() and path.parent != path:
        path = path.parent
    return path if path.parent.is_dir() else None  # under a file: nothing can have been made


def guard(body: Callable[[], int], errors: tuple[type[BaseException], ...] = (), outs: Iterable[str | Path | None] = ()) -> int:
    """Run a command's `body`; bad input (`errors`, InputError, the last-resort classes) becomes
    one `error: ...` line on stderr and EXIT_BAD_INPUT, with every fresh path of `outs` removed."""
    fresh = [p for p in (fresh_root(out) for out in outs) if p is not None]
    try:
        return body()
    except (InputError, *errors, MemoryError, RecursionError, OSError) as err:
        message = one_line(err) if isinstance(err, (InputError, *errors)) else _last_resort(err)
        if message is None:
            raise
    for path in fresh:
        _remove(path)
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
