"""`Engine`: the Python API of raysim, and what keeps its actors alive between runs.

    from raysim import Engine, config

    with Engine() as engine:
        for name in ["fedavg", "fedbn", "fairlora"]:
            run_dir = engine.run(config.load(None, [f"algorithm.name={name}"]), out=f"runs/{name}")

A run's start-up (a driver actor, a client actor per group of clients, each importing torch and
the model code) costs seconds that its rounds may not; an Engine pays it once. It holds:

- a **driver actor** (`driver_actor.DriverActor`), reused by every `run` whose driver resources
  (`resources.driver_cpus`, `driver_gpus`) match; its client actors are kept warm inside it
  between runs (`warm`), reused by runs whose actors ask for the same CPUs, GPU share and
  torch threads, the rest started or stopped as the next run needs;
- a **local supply** of client actors for Drivers built in this process (`driver.Driver`, as the
  benchmarks and the tests build them), installed as this process's for the Engine's life.

A run in a warm Engine gives the same metrics, bit for bit, as the same run in a fresh one
(`tests/engine/test_warm.py`): each actor's run is built anew by `load` and dropped by `reset`.
The Engine starts a private local Ray on first use (loopback only, token auth: `local_ray`)
unless Ray is running already or RAY_ADDRESS names a cluster; a run asking for another
`resources.object_store_gb` restarts the Ray it started. `python -m raysim.run` is one Engine
running one run.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError

from raysim import console
from raysim.algorithms import check as check_names
from raysim.config import ExperimentConfig
from raysim.engine import actor_startup, driver_actor, warm
from raysim.engine.checkpoints import latest
from raysim.engine.driver import Driver, RunFailed, connect_ray
from raysim.outputs import resume_check, storage


class Engine:
    """Ray, a driver actor and client actors kept alive across runs; see the module docstring.

    `num_cpus`: the CPUs of the private local Ray it starts (default: this machine's);
    `object_store_gb`: that Ray's object store before any run asks (a run's
    `resources.object_store_gb` decides from then on).
    """

    def __init__(self, *, num_cpus: int | None = None, object_store_gb: float | None = 2.0) -> None:
        self.num_cpus = num_cpus
        self.object_store_gb = object_store_gb
        self.owns_ray = False  # this Engine started Ray (and stops it on close)
        self.driver: Any = None  # the warm driver actor
        self.driver_kind: tuple[float, float] | None = None
        self.local = warm.ActorSupply(make_room=self._stop_driver)
        self.lent: list[Any] = []  # client actors this Engine started for its driver actor (`_start_client_actors`)
        self._installed: contextlib.ExitStack | None = None
        self.runs = 0

    # --- life ----------------------------------------------------------------------------------

    def __enter__(self) -> Engine:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> Engine:
        """Ray up (`driver.connect_ray`: a cluster under RAY_ADDRESS, one already running, else a
        private local one) and the local supply installed as this process's: Drivers built here
        (`driver.finished_run`, as the benchmarks run) reuse its actors."""
        if self._installed is None:
            self._installed = contextlib.ExitStack()
            self._installed.enter_context(warm.installed(self.local))
            _open.append(self)
        if not ray.is_initialized():
            connect_ray(self.num_cpus, self.object_store_gb)
            self.owns_ray = True
        return self

    def close(self) -> None:
        """Stop every actor this Engine keeps, and the Ray it started."""
        self._stop_driver()
        if ray.is_initialized():
            self.local.close()
        if self._installed is not None:
            self._installed.close()
            self._installed = None
            _open.remove(self)
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()
        self.owns_ray = False

    def _ray_for(self, cfg: ExperimentConfig) -> None:
        """Ray up, with the object store `cfg` asks for when this Engine starts it (again)."""
        want = cfg.resources.object_store_gb
        if self.owns_ray and ray.is_initialized() and want != self.object_store_gb:
            self._stop_driver()
            self.local.close()
            ray.shutdown()
        started = not ray.is_initialized()
        connect_ray(self.num_cpus, want)  # Ray up already (a cluster, a test session): joined as it is
        if started:
            self.owns_ray, self.object_store_gb = True, want

    def release_idle(self) -> None:
        """Stop every actor this Engine keeps waiting (its driver actor, the client actors lent to
        it, the idle ones of its supply): their CPUs and GPUs go back to Ray, and the next run
        starts fresh ones. For code that starts actors of its own beside the Engine (tests with a
        supply of their own)."""
        self._stop_driver()
        self.local.close()

    def _stop_driver(self) -> None:
        """Stop the driver actor and the client actors started for it (its own children go with it)."""
        for actor in [self.driver, *self.lent] if self.driver is not None else self.lent:
            with contextlib.suppress(Exception):  # gone already
                ray.kill(actor, no_restart=True)
        self.driver, self.driver_kind, self.lent = None, None, []

    def _driver_for(self, cfg: ExperimentConfig) -> Any:
        """The warm driver actor if its resources are the run's, else a new one with the run's
        client actors starting beside it."""
        kind = (cfg.resources.driver_cpus, cfg.resources.driver_gpus)
        if self.driver is not None and kind != self.driver_kind:
            self._stop_driver()
        if self.driver is None:
            self.driver, self.driver_kind = driver_actor.launch(cfg.resources), kind
            self._start_client_actors(cfg)
        return self.driver

    def _start_client_actors(self, cfg: ExperimentConfig) -> None:
        """Start a new driver actor's client actors now, beside it, instead of after its process
        has imported torch and read the clients: the two start-ups overlap (about one actor
        start saved, ~5 s on 2 cores). They are this process's actors lent to the driver actor
        (`warm.ActorSupply.add_started`), not its children, so this Engine stops them with it."""
        actors = [actor_startup.launch(cfg.resources) for _ in range(actor_startup.planned_count(cfg))]
        self.lent.extend(actors)
        self.driver.add_actors.remote(warm.ActorKind.of(cfg.resources), actors)

    # --- runs ----------------------------------------------------------------------------------

    def run(self, cfg: ExperimentConfig, out: str | Path | None = None, *, resume: bool = False, echo: Callable[[str], None] | None = None) -> str:
        """Run `cfg` (all its rounds) in the warm driver actor; returns the run directory.

        `out`: a new (or empty) directory or URI, default `runs/<time>-<algorithm>-s<seed>`;
        with `resume`, an existing run directory to continue from its last checkpoint (its
        config.yaml must match `cfg`). Console lines go to `echo` (default: stdout, with a
        progress bar on a terminal). Bad input raises ConfigError / DataError before any
        actor starts; a failed run raises RunFailed naming how to resume.
        """
        self.open()
        check_names(cfg)
        if resume:
            if out is None:
                raise ValueError("resume=True needs out: the run directory to continue")
            run_dir = storage.resolve_out(out)
        else:
            run_dir = storage.create_run_dir(cfg, out)
        Driver(cfg, run_dir)  # reads the data source's metadata: bad input fails here, before Ray
        if resume:
            resume_check.check(resume_check.saved_record(run_dir), cfg, run_dir)
        printer = console.Printer(sys.stdout, sys.stderr) if echo is None else _EchoPrinter(echo)
        self.drive(cfg, run_dir, resume, printer=printer)
        return run_dir

    def drive(self, cfg: ExperimentConfig, run_dir: str, resume: bool, argv: list[str] | None = None, printer: Any = None) -> None:
        """The rounds of a prepared run (`run_dir` holds its config.yaml) in the driver actor,
        its lines to `printer` (`console.Printer`'s `event` / `close`). A lost driver actor (its
        process killed, its node gone) is started again from the last complete checkpoint, up
        to `fault.max_restarts` times."""
        self._ray_for(cfg)
        driver_actor.check_fits(cfg)
        self.local.close()  # idle local actors would hold CPUs the driver actor's clients need
        printer = printer or console.Printer(sys.stdout, sys.stderr)
        losses = 0
        while True:
            actor = self._driver_for(cfg)
            try:
                actor.bind.remote(cfg, run_dir, None, argv)  # provenance records what the user typed (argv), not the actor's command line
                driver_actor.wait_started(actor, cfg)
                for event in driver_actor.stream(actor, resume=resume, silence_s=cfg.fault.driver_timeout_s):
                    printer.event(event.lines, event.progress)
                self.runs += 1
                return
            except (RayActorError, driver_actor.DriverSilent) as err:
                printer.close()
                driver_actor.stop(actor, run_dir)  # one unreachable or silent may still run, holding the run lock
                self._stop_driver()  # the client actors it was lent: its children went with it
                losses += 1
                newest = latest_name(run_dir)
                if losses > cfg.fault.max_restarts:
                    where = f"--resume {run_dir} continues from {newest}" if newest else "no checkpoint was complete yet"
                    raise RunFailed(f"the driver actor was lost {losses} times (fault.max_restarts={cfg.fault.max_restarts}); {where}") from err
                resume = newest is not None
                print(f"driver actor lost ({str(err).splitlines()[0][:120]}); " + (f"resuming from {newest}" if resume else "starting the run again"), flush=True)
            finally:
                printer.close()

    def warm_actors(self) -> int:
        """Client actors idle in the driver actor now (tests, benchmarks)."""
        if self.driver is None:
            return 0
        return int(ray.get(self.driver.idle_actors.remote()))


_open: list[Engine] = []  # the Engines open in this process, the newest last


def active() -> Engine | None:
    """The Engine opened last in this process and not closed, if any: `raysim.run.main` called
    from Python inside one (a notebook, the test session) runs there instead of in an Engine of its own."""
    return _open[-1] if _open else None


class _EchoPrinter:
    """`console.Printer`'s interface over a plain line callback (no progress bar)."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo

    def event(self, lines: list[str], progress: Any) -> None:
        for line in lines:
            self.echo(line)

    def close(self) -> None:
        pass


def latest_name(run_dir: str) -> str | None:
    """The newest complete checkpoint's name in a run directory (a path or a URI), if any."""
    if storage.is_uri(run_dir):
        found = storage.RunMirror(run_dir).latest_checkpoint()
        return found.rsplit("/", 1)[-1] if found else None
    found_path = latest(Path(run_dir))
    return found_path.name if found_path else None
