"""The console at any scale: summaries beyond `MAX_LISTED` clients, capped per-client notes,
and progress bars on a terminal.

Progress is reported ambiently: long loops call `report(phase, done, total)`, which goes to
the sink the caller installed with `reporting_to` (a no-op otherwise), so plain-Python code
(pretraining, a foundation-model query) reports without a callback in its signature. The
driver actor streams what reaches its sink (throttled by `Throttled`) as events; the CLI
draws them with `Printer`, on a terminal only: Ray's log forwarding breaks `\\r`, so a bar is
drawn by the process that owns the terminal, never by an actor.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from typing import TextIO, TypeVar

import numpy as np

MAX_LISTED = 20  # beyond this many clients the console summarises instead of listing
NOTES_PER_KIND = 5  # per-client notes of one kind shown per round before "... and N more"
TICK_INTERVAL_S = 0.1  # at most ~10 progress events a second leave the driver

Tick = Callable[[str, int, int], None]  # (phase, done, total)
Echo = Callable[[str], None]

T = TypeVar("T")

_sink: ContextVar[Tick | None] = ContextVar("raysim_progress_sink", default=None)


# --- reporting progress ---------------------------------------------------------------------


def report(phase: str, done: int, total: int) -> None:
    """`done` of `total` steps of `phase` are finished (to the installed sink, if any)."""
    sink = _sink.get()
    if sink is not None:
        sink(phase, done, total)


def counted(items: Iterable[T], phase: str, total: int, start: int = 0) -> Iterator[T]:
    """`items`, reporting `start` + k of `total` once the consumer is done with the k-th."""
    for done, item in enumerate(items, start=start + 1):
        yield item
        report(phase, min(done, total), total)


@contextlib.contextmanager
def reporting_to(sink: Tick) -> Iterator[None]:
    """`report` calls in this thread (and context) go to `sink` while the block runs."""
    token = _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(token)


class Throttled:
    """Passes a phase's first and last step and, in between, at most one step per `interval`
    seconds: a per-client `report` costs a comparison, never a message."""

    def __init__(self, tick: Tick, interval: float = TICK_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.tick, self.interval, self.clock = tick, interval, clock
        self.phase: str | None = None
        self.last = -float("inf")

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = self.clock()
        if phase == self.phase and done < total and now - self.last < self.interval:
            return
        self.phase, self.last = phase, now
        self.tick(phase, done, total)


# --- summaries ------------------------------------------------------------------------------


def spread(values: Sequence[float]) -> str:
    """`min / median / max` of `values` (integers stay integers)."""
    array = np.asarray(values, dtype=float)
    parts = (array.min(), float(np.median(array)), array.max())
    return " / ".join(f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}" for v in parts)


def first(items: Sequence[str], shown: int = NOTES_PER_KIND) -> str:
    """`a, b, c` or, beyond `shown` items, `a, b, c, d, e and 12 more`."""
    head = ", ".join(items[:shown])
    return head if len(items) <= shown else f"{head} and {len(items) - shown} more"


class Capped:
    """Per-client notes (a failed client, a rejected update) capped per kind: the first
    `shown` of a kind are echoed, the rest counted and told in one line by `flush`."""

    def __init__(self, echo: Echo, shown: int = NOTES_PER_KIND) -> None:
        self.echo, self.shown = echo, shown
        self.counts: dict[str, int] = {}

    def say(self, kind: str, line: str) -> None:
        """`kind` names the note in the summary line: "... and 12 more clients {kind}"."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.counts[kind] <= self.shown:
            self.echo(line)

    def flush(self) -> None:
        for kind, n in self.counts.items():
            if n > self.shown:
                self.echo(f"... and {n - self.shown} more clients {kind}")
        self.counts = {}


# --- drawing progress (the CLI) -------------------------------------------------------------


def interactive(out: TextIO, err: TextIO) -> bool:
    """Bars only when both streams are a terminal: in a pipe or a file, lines only."""
    return _isatty(out) and _isatty(err) and os.environ.get("TERM") != "dumb"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or minimal stream
        return False


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def render_bar(phase: str, done: int, total: int, elapsed: float, eta: float | None, columns: int = 80, fill: str = "#") -> str:
    """`phase  12/20 [########------] 60% 0:00:04<0:00:03`, cut to `columns` - 1 characters."""
    fraction = min(max(done / total, 0.0), 1.0) if total > 0 else 0.0
    tail = f" {done}/{total} {100 * fraction:3.0f}% {clock(elapsed)}<{clock(eta) if eta is not None else '?'}"
    width = max(10, min(40, columns - len(phase) - len(tail) - 4))
    filled = int(round(fraction * width))
    return f"{phase} [{fill * filled}{'.' * (width - filled)}]{tail}"[: max(columns - 1, 1)]


class Bar:
    """One progress line on `stream`, redrawn in place; the ETA from the rate since the phase began."""

    def __init__(self, stream: TextIO, clock_: Callable[[], float] = time.monotonic) -> None:
        self.stream, self.clock = stream, clock_
        self.phase: str | None = None
        self.started, self.start_done = 0.0, 0
        self.visible = False
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        self.fill = "\u2588" if encoding == "utf8" else "#"

    def show(self, phase: str, done: int, total: int) -> None:
        now = self.clock()
        if phase != self.phase:
            self.phase, self.started, self.start_done = phase, now, done
        elapsed, progressed = now - self.started, done - self.start_done
        eta = elapsed / progressed * (total - done) if progressed > 0 else None
        columns = shutil.get_terminal_size((80, 24)).columns
        self.stream.write("\r\x1b[K" + render_bar(phase, done, total, elapsed, eta, columns, self.fill))
        self.stream.flush()
        self.visible = True

    def clear(self) -> None:
        if self.visible:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.visible = False


class Printer:
    """What the CLI prints of the driver's events: every line on `out`; on a terminal the
    latest progress as a bar on `err`, cleared before each line so lines never mix with it."""

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out = out
        self.bar = Bar(err) if interactive(out, err) else None

    def event(self, lines: Sequence[str], progress: tuple[str, int, int] | None) -> None:
        if self.bar is not None and (lines or progress is None):
            self.bar.clear()
        for line in lines:
            print(line, file=self.out, flush=True)
        if self.bar is not None and progress is not None:
            self.bar.show(*progress)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.clear()
