"""Warm client actors: kept alive between the runs of one process (an `Engine`, its driver actor,
a test session) so that a run's start-up is a `load` call, not a new process importing torch.

A `ClientActor` starts empty and serves one run at a time: `load(cfg, specs, context)` builds
its run (what `ClientHost.__init__` builds: the method, the model, the clients and their
shards), `reset()` drops all of it. Everything per run lives in that run's attributes, so
dropping them is the reset; what a process keeps is what is safe to keep (imported modules,
the on-disk shard cache), and what a run sets process-wide is set again by the next `load`
(torch threads and determinism flags, the global torch RNG back to a fresh process's seed).
`tests/engine/test_warm.py` checks that a run after another run in the same actors equals the
same run in fresh ones, bit for bit.

Actors are reused only by a run whose actors ask Ray for the same things (`ActorKind`: CPUs,
GPU share, torch threads); a run with another kind stops the idle ones first (their CPUs and
GPUs may be what it needs). A Tune trial's actors live in its placement group and are never
pooled here.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from raysim.config import ResourcesConfig

log = logging.getLogger(__name__)

# An actor handed back must answer `reset` within this many seconds to be kept: one still
# busy (a run that failed mid-round left it training) or hung is stopped instead, so the next
# run never waits behind it.
RESET_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ActorKind:
    """What a client actor asks Ray for and fixes for its process: runs that agree on it share actors."""

    num_cpus: float
    num_gpus: float
    threads: int

    @classmethod
    def of(cls, res: ResourcesConfig) -> ActorKind:
        return cls(res.actor_cpus, res.num_gpus, res.threads_per_client)


class ActorSupply:
    """Idle client actors of this process, by kind. `take` hands out actors (idle ones first),
    `give_back` resets and keeps them, `close` stops them all.

    `make_room`: called before new actors start when Ray lacks the CPUs or GPUs they ask for,
    to free what someone else of this process holds idle (an Engine's waiting driver actor).
    """

    def __init__(self, make_room: Callable[[], None] | None = None) -> None:
        self.idle: dict[ActorKind, list[Any]] = {}
        self.fresh: dict[ActorKind, list[Any]] = {}  # started for this supply by someone else, never loaded (`add_started`)
        self.make_room = make_room
        self.started = self.reused = 0  # actors this supply started, and handed out again (tests, benchmarks)

    def add_started(self, kind: ActorKind, actors: list[Any]) -> None:
        """Empty actors of `kind` started for this supply elsewhere: an `Engine` starts a new
        driver actor's client actors beside it, so that both processes import torch at once
        instead of one after the other. Taken after the idle ones, before any new one starts."""
        self.fresh.setdefault(kind, []).extend(actors)

    def take(self, kind: ActorKind, n: int, start: Callable[[], Any]) -> list[Any]:
        """`n` actors of `kind`: idle ones first, then those started for it (`add_started`),
        `start()` for the rest. Actors of other kinds, and those of this kind beyond `n`, are stopped."""
        for pool in (self.idle, self.fresh):
            for other in [k for k in pool if k != kind]:
                _kill_all(pool.pop(other))
        warm, fresh = self.idle.pop(kind, []), self.fresh.pop(kind, [])
        kept = (warm + fresh)[:n]
        _kill_all((warm + fresh)[n:])
        missing = n - len(kept)
        if missing and self.make_room is not None and not _fits(kind, missing):
            self.make_room()
        self.reused += min(len(warm), n)
        self.started += missing
        return kept + [start() for _ in range(missing)]

    def give_back(self, kind: ActorKind, actors: list[Any]) -> None:
        """Reset `actors` and keep those that answer within `RESET_TIMEOUT_S`; stop the others."""
        refs = [actor.reset.remote() for actor in actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=RESET_TIMEOUT_S) if refs else ([], [])
        answered = set(ready)
        keep = []
        for actor, ref in zip(actors, refs, strict=True):
            try:
                if ref not in answered:
                    raise GetTimeoutError("no answer")
                ray.get(ref)
                keep.append(actor)
            except (RayActorError, RayTaskError, GetTimeoutError) as err:
                log.debug("client actor not kept (%s: %s)", type(err).__name__, err)
                _kill_all([actor])
        self.idle.setdefault(kind, []).extend(keep)

    def count(self) -> int:
        return sum(len(actors) for actors in self.idle.values())

    def close(self) -> None:
        for pool in (self.idle, self.fresh):
            for actors in pool.values():
                _kill_all(actors)
            pool.clear()


def _kill_all(actors: list[Any]) -> None:
    for actor in actors:
        with contextlib.suppress(Exception):  # already gone: nothing to stop
            ray.kill(actor, no_restart=True)


def _fits(kind: ActorKind, n: int) -> bool:
    """Ray has the CPUs and GPUs for `n` more actors of `kind` free now."""
    free = ray.available_resources()
    return free.get("CPU", 0.0) + 1e-9 >= n * kind.num_cpus and free.get("GPU", 0.0) + 1e-9 >= n * kind.num_gpus


_current: ActorSupply | None = None


def current() -> ActorSupply | None:
    """This process's supply, or None: every run starts and stops its own actors."""
    return _current


@contextlib.contextmanager
def installed(supply: ActorSupply | None) -> Iterator[ActorSupply | None]:
    """`supply` is this process's for the block (None: no reuse inside it); the one before comes back after."""
    global _current
    before, _current = _current, supply
    try:
        yield supply
    finally:
        _current = before


def install(supply: ActorSupply | None) -> None:
    """`supply` is this process's from now on (a driver actor's, for its life)."""
    global _current
    _current = supply
