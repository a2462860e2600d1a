"""The driver as a Ray actor: the CLI (and a Tune trial) starts it and streams its progress.

Running the rounds in an actor gives server-side computation (foundation-model queries, a
server-trained generator, DP noise) its own resources in the cluster (`resources.driver_cpus`,
`resources.driver_gpus`). The actor is pinned to the node of the process that starts it, so
a local `--out` stays local, unless it asks for a GPU (then `--out` must be on storage every
GPU node shares). Its client actors are its children: when the caller goes away (Ctrl-C, a
killed job), the driver actor and with it every client actor goes too (those an `Engine`
started beside a new driver actor are the caller's own children: they go with the caller).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from ray.exceptions import ActorDiedError, ActorUnschedulableError, GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from raysim import console
from raysim.config import ConfigError, ExperimentConfig, ResourcesConfig
from raysim.engine import checkpoints, warm
from raysim.engine.driver import Driver, RunFailed
from raysim.outputs import storage

HEARTBEATS = 10  # heartbeats the driver actor sends per fault.driver_timeout_s without other events


@dataclass
class Progress:
    """What the driver actor streams after its start and after every round."""

    lines: list[str]  # console lines since the last event
    round: int | None = None  # the round just finished (None: start-up or the end)
    evaluated: pd.DataFrame | None = field(default=None, repr=False)  # that round's metric rows, when it was evaluated
    attribute: str | None = None  # the data source's target attribute (what the console table shows)
    progress: tuple[str, int, int] | None = None  # (phase, done, total) of a long step: the CLI's bar on a terminal
    snapshot: str | None = None  # with `snapshots`: the run directory as of this evaluated round (what a Tune trial reports)


class DriverHost:
    """Plain-Python body of the actor: a `Driver` whose console lines are buffered for streaming.
    It runs one run at a time, the one `bind` names last (an Engine's driver actor runs many)."""

    def __init__(self, cfg: ExperimentConfig | None = None, run_dir: str | None = None, placement_group: PlacementGroup | None = None, argv: list[str] | None = None) -> None:
        self.lines: list[str] = []
        self.args: tuple[Any, ...] | None = None
        if cfg is not None:
            self.bind(cfg, run_dir, placement_group, argv)

    def bind(self, cfg: ExperimentConfig, run_dir: str | None, placement_group: PlacementGroup | None = None, argv: list[str] | None = None) -> None:
        """The run the next `rounds` runs."""
        self.args = (cfg, run_dir, placement_group, argv)

    def capture_warnings(self) -> None:
        """raysim's warnings (e.g. undefined metric values) become console lines of the stream
        instead of the actor's stderr, which Ray would print with its own prefix."""
        handler = _Lines(self.lines)
        handler.setLevel(logging.WARNING)
        raysim_log = logging.getLogger("raysim")
        raysim_log.addHandler(handler)
        raysim_log.propagate = False

    def ready(self) -> bool:
        """Answers once the actor is placed and built (`wait_started`)."""
        return True

    def rounds(self, resume: bool = False, until: int | None = None, heartbeat_s: float | None = None, snapshots: str | None = None) -> Iterator[Progress]:
        """`_events`, with progress events (`console.report`, throttled) in between. The driver
        runs in a thread of its own so that a step in the middle of a round (its 1,000 client
        calls) can send events; each event goes out as soon as it is queued, in order. With
        `heartbeat_s`, an empty event goes out whenever none did for that long: the caller
        tells a driver that works from one that hangs (`stream`'s `silence_s`). With `snapshots`
        (a folder), each evaluated round's event names a `snapshot` of the run directory there."""
        events: queue.Queue[Progress | BaseException | None] = queue.Queue()
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, args=(events, stop, resume, until, snapshots), name="raysim-driver", daemon=True)
        worker.start()
        try:
            while (item := _next(events, heartbeat_s)) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()  # a consumer that left early: the driver stops at its next event and shuts down
            worker.join()

    def _produce(self, events: queue.Queue[Progress | BaseException | None], stop: threading.Event, resume: bool, until: int | None, snapshots: str | None) -> None:
        """The worker thread: every event of `_events` and every progress report onto `events`;
        an exception goes there too (re-raised by `rounds` as itself), None ends the stream."""

        def put(event: Progress) -> None:
            if stop.is_set():
                raise _Stopped
            events.put(event)

        def tick(phase: str, done: int, total: int) -> None:
            put(Progress(self._take_lines(), progress=(phase, done, total)))

        try:
            with console.reporting_to(console.Throttled(tick)), contextlib.closing(self._events(resume, until, snapshots)) as stream:
                for event in stream:
                    put(event)
        except _Stopped:
            pass
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            events.put(err)
        finally:
            events.put(None)

    def _events(self, resume: bool, until: int | None, snapshots: str | None = None) -> Iterator[Progress]:
        """The run, one event after start-up, after each part of a round and at the end."""
        if self.args is None:
            raise RuntimeError("no run: bind one before asking for its rounds")
        cfg, run_dir, placement_group, argv = self.args
        # Built here, not in __init__: a bad config or data set fails this call with its own error.
        self.driver = driver = Driver(cfg, run_dir, echo=self.lines.append, placement_group=placement_group, argv=argv)
        try:
            driver.start(resume=resume)
            yield self._event(None)
            rounds = driver.cfg.federation.rounds
            last = min(until or rounds, rounds)
            for round_, part in driver.advance(last):
                if part == "done":  # after the round's checkpoint: Tune saves the run directory with it
                    event = self._event(round_)
                    if snapshots is not None and event.evaluated is not None:  # made before the next round starts
                        driver.recorder.flush()
                        event.snapshot = str(snapshot(driver.run_dir, Path(snapshots) / f"round_{round_:06d}"))
                    yield event
                elif part != "checkpoint":
                    yield Progress(self._take_lines())
            driver.finish(last)
            yield self._event(None)
        finally:
            driver.shutdown()

    def _take_lines(self) -> list[str]:
        lines = self.lines[:]
        del self.lines[: len(lines)]  # a line added meanwhile stays for the next event
        return lines

    def _event(self, round_: int | None) -> Progress:
        lines = self._take_lines()
        evaluated = None
        if round_ is not None and self.driver.evaluated_round == round_:
            metrics = self.driver.recorder.metrics
            evaluated = metrics[metrics["round"] == round_].reset_index(drop=True)
        return Progress(lines, round_, evaluated, self.driver.source.attribute)


def snapshot(run_dir: Path, target: Path) -> Path:
    """`target`: `run_dir` as it is now (the driver between two rounds), for a Tune checkpoint that
    Tune copies later, while the next rounds write parts and prune checkpoints. It holds the
    newest complete checkpoint only, never the lock. Files written once and never changed
    (checkpoint files, Parquet parts) are hard links, so it costs no copy; the others (config,
    provenance, TensorBoard's appended event files) are copied."""
    newest = checkpoints.latest(run_dir)
    shutil.rmtree(target, ignore_errors=True)
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(run_dir)
        if rel.name == storage.LOCK or (rel.parts[0] == checkpoints.CHECKPOINTS and (newest is None or rel.parts[1] != newest.name)):
            continue
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if rel.parts[0] == checkpoints.CHECKPOINTS or rel.parts[0].endswith(".parquet"):
            with contextlib.suppress(OSError):  # another filesystem, or no hard links there: a copy
                os.link(path, dest)
                continue
        shutil.copy2(path, dest)
    return target


def _next(events: queue.Queue[Any], heartbeat_s: float | None) -> Any:
    """The next item of `events`; an empty Progress (a heartbeat) after `heartbeat_s` without one."""
    try:
        return events.get(timeout=heartbeat_s)
    except queue.Empty:
        return Progress([])


class DriverSilent(RuntimeError):
    """No event (not even a heartbeat) from the driver actor within `fault.driver_timeout_s`: it
    hangs (a stopped process, a node cut off). The CLI handles it like a lost driver actor."""


class _Stopped(BaseException):
    """The consumer of `DriverHost.rounds` left: ends the driver's thread (never caught as an Exception)."""


class _Lines(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__()
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname.lower()}: {record.getMessage()}")


@ray.remote(max_restarts=0)
class DriverActor(DriverHost):
    """DriverHost as a Ray actor (`ray::DriverActor`): `rounds` streams `Progress` events.

    Its client actors are its children, kept warm between the runs it drives (`warm`): a run's
    end hands them back, the next run with the same kind of actors takes them again."""

    def __init__(self, cfg: ExperimentConfig | None = None, run_dir: str | None = None, placement_group: PlacementGroup | None = None, argv: list[str] | None = None) -> None:
        super().__init__(cfg, run_dir, placement_group, argv)
        self.capture_warnings()  # its own process: nothing else logs here
        self.supply = warm.ActorSupply()
        warm.install(self.supply)

    def idle_actors(self) -> int:
        """Client actors kept warm for the next run."""
        return self.supply.count()

    def supply_counts(self) -> dict[str, int]:
        """Client actors its runs started, took warm, and keep idle now (tests, benchmarks)."""
        return {"started": self.supply.started, "reused": self.supply.reused, "idle": self.supply.count()}

    def add_actors(self, kind: warm.ActorKind, actors: list[Any]) -> None:
        """Empty client actors its Engine started beside it (`warm.ActorSupply.add_started`)."""
        self.supply.add_started(kind, actors)

    @ray.method(num_returns="streaming")
    def rounds(self, resume: bool = False, until: int | None = None, heartbeat_s: float | None = None, snapshots: str | None = None) -> Iterator[Progress]:  # type: ignore[override]
        yield from DriverHost.rounds(self, resume, until, heartbeat_s, snapshots)


def start(cfg: ExperimentConfig, run_dir: str | Path, placement_group: PlacementGroup | None = None, argv: list[str] | None = None) -> Any:
    """A new driver actor (`launch`) bound to the run (`DriverHost.bind`)."""
    actor = launch(cfg.resources, placement_group)
    actor.bind.remote(cfg, storage.resolve_out(run_dir), placement_group, argv)
    return actor


def launch(res: ResourcesConfig, placement_group: PlacementGroup | None = None) -> Any:
    """Start a driver actor with `res`'s driver resources, bound to no run yet: in bundle 0 of `placement_group` (a Tune trial), else on
    this node (with `resources.driver_gpus`: wherever a GPU is free, so give a URI run directory
    or one on a shared filesystem on a multi-node cluster).

    A run directory (a path or a `pyarrow.fs` URI) is resolved before `bind`: the actor's working
    directory is not the caller's.
    """
    if placement_group is not None:
        strategy: Any = PlacementGroupSchedulingStrategy(placement_group=placement_group, placement_group_bundle_index=0)
    elif res.driver_gpus > 0:
        strategy = "DEFAULT"  # wherever a GPU is free
    else:
        strategy = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return DriverActor.options(num_cpus=res.driver_cpus, num_gpus=res.driver_gpus, scheduling_strategy=strategy).remote()


def check_fits(cfg: ExperimentConfig) -> None:
    """A local Ray (no RAY_ADDRESS: nothing scales up) must have the driver's own resources."""
    if os.environ.get("RAY_ADDRESS"):
        return
    have = ray.cluster_resources()
    for key, need, name in (("CPU", cfg.resources.driver_cpus, "resources.driver_cpus"), ("GPU", cfg.resources.driver_gpus, "resources.driver_gpus")):
        if need > have.get(key, 0.0):
            raise ConfigError(f"{name}={need:g}, but this machine's Ray has {have.get(key, 0.0):g} {key}s")


def stop(actor: Any, run_dir: str, within_s: float = 60.0) -> None:
    """Kill the driver actor and wait (at most `within_s`) until Ray reports it dead and a local
    run directory's lock is free: one taken for lost (unreachable, silent) may still be running
    and hold the lock (its process may outlive Ray's word by seconds), so the next one starts
    only once it is gone."""
    ray.kill(actor, no_restart=True)
    until = time.monotonic() + within_s
    while time.monotonic() < until:
        try:
            ray.get(actor.ready.remote(), timeout=max(until - time.monotonic(), 0.1))
        except ActorDiedError:
            break
        except (RayActorError, GetTimeoutError):  # unavailable, or not yet marked dead: ask again
            pass
        time.sleep(0.5)
    while not storage.is_uri(run_dir) and time.monotonic() < until:
        try:
            storage.check_unlocked(Path(run_dir))
            return
        except ConfigError:
            time.sleep(0.5)


def wait_started(actor: Any, cfg: ExperimentConfig) -> None:
    """The driver actor placed and built within `fault.start_timeout_s`; a request Ray cannot
    place (more `driver_cpus` / `driver_gpus` than a node has) fails instead of waiting for ever."""
    res = cfg.resources
    asked = f"resources.driver_cpus={res.driver_cpus:g}, resources.driver_gpus={res.driver_gpus:g}"
    try:
        ray.get(actor.ready.remote(), timeout=cfg.fault.start_timeout_s)
    except ActorUnschedulableError as err:
        raise ConfigError(f"the driver actor cannot be placed ({asked}): {str(err).splitlines()[0]}") from None
    except GetTimeoutError:
        ray.kill(actor)
        raise RunFailed(f"the driver actor did not start within fault.start_timeout_s={cfg.fault.start_timeout_s:g} s: Ray may lack {asked} (it has {ray.cluster_resources()})") from None


def stream(actor: Any, *, resume: bool = False, until: int | None = None, silence_s: float | None = None, snapshots: str | None = None) -> Iterator[Progress]:
    """The actor's events as they come; an error raised in the actor is re-raised as itself
    (a ConfigError or DataError stays one, so the CLI can print its one line). With `silence_s`
    (`fault.driver_timeout_s`) the actor sends a heartbeat HEARTBEATS times as often, and
    `silence_s` without any event raises DriverSilent. `snapshots`: see `DriverHost.rounds`."""
    events = actor.rounds.remote(resume, until, None if silence_s is None else silence_s / HEARTBEATS, snapshots)
    try:
        while True:
            if silence_s is not None and not ray.wait([events], timeout=silence_s)[0]:
                raise DriverSilent(f"no event within fault.driver_timeout_s={silence_s:g} s")
            try:
                ref = next(events)
            except StopIteration:
                return
            yield ray.get(ref)
    except RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, RayActorError):  # a client actor's death the driver did not handle: not the driver actor's own loss
            raise RunFailed(str(err)) from None
        raise (cause if isinstance(cause, Exception) else err) from None
