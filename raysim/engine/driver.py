"""The driver: starts the client actor pool, runs the rounds, folds updates, evaluates, checkpoints.

The round loop exists here once. Every sampled client is waited for; updates are folded into
the method's accumulator one at a time in sorted client-id order as they stream from the pool
(`pool.ActorPool.ordered`), so the driver holds one accumulator and one update whatever the
cohort; every random choice is seeded from (seed, round, client), so a run is a function of
its config: the number of actors and their scheduling change nothing.

What changes apart from the loop lives beside it: `actor_startup` (the actor plan, loading
shards, each client's setup), `round_metrics` (a round's evaluation and recorded rows),
`checkpoint_stream` (checkpoints streamed from the actors and read back on resume), `failures`
(a failed call read, deadlines, `RunFailed`) and `recovery` (lost actors replaced, rounds replayed).
They take the driver as a `run_state.RunState`, the members of it they use, and import nothing
from here.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import torch
from ray.util.placement_group import PlacementGroup

from raysim import config, console, provenance
from raysim.algorithms import ServerState, with_backbone
from raysim.algorithms import build as build_algorithm
from raysim.algorithms import check as check_names
from raysim.algorithms.aggregation import non_finite
from raysim.algorithms.base import HOLDOUT
from raysim.config import ConfigError, ExperimentConfig
from raysim.datasets import DATASETS, ClientSpec
from raysim.determinism import deterministic_torch
from raysim.engine import actor_startup, checkpoint_stream, checkpoints, failures, local_ray, recovery, round_metrics, simulated
from raysim.engine.client_actor import from_wire
from raysim.engine.failures import LOST, ActorLost, RunFailed, mark_failed
from raysim.engine.pool import ActorPool
from raysim.engine.run_state import Arrived, RoundOutcome
from raysim.engine.simulated import SYSTEM
from raysim.outputs import recorder, resume_check, storage
from raysim.systems import simulated_clock
from raysim.types import nbytes

latest_checkpoint = checkpoints.latest


def connect_ray(num_cpus: int | None = None, object_store_gb: float | None = 2.0) -> None:
    """Join the cluster named by RAY_ADDRESS (e.g. under `ray job submit`), else start a private
    local one (`address="local"`): never a cluster found in Ray's temp dir, whose address file
    a killed `ray start --head` leaves behind (joining it failed with a traceback), and never a
    live local head someone started for its dashboard. Its ports listen on 127.0.0.1 only and
    need Ray's token (RAY_AUTH_MODE other than token is refused; the token file is made 0600):
    see `local_ray`.

    A local Ray gets an object store of `object_store_gb` (`resources.object_store_gb`; None:
    Ray's 30 % of RAM). The engine keeps at most 2 updates per actor and a payload or two in
    it, but the store keeps every page it ever touched: with Ray's default, 2,000 resnet18
    updates passed through it grew the machine's memory in use by ~7 GB (benchmarks/RESULTS.md).
    A store too small for a round's objects spills them to disk: slower, never wrong.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # connect; resources are the cluster's, never ours to declare
    else:
        store = None if object_store_gb is None else int(object_store_gb * 1024**3)
        # Ray's notice that token authentication is on (for a private cluster: as it should be)
        # would be the first line of every run's stderr, above the one line of a bad input.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        local_ray.start(num_cpus or os.cpu_count() or 1, store)  # loopback only, token auth required, token file 0600


class Driver:
    def __init__(self, cfg: ExperimentConfig, run_dir: Path | str, echo: console.Echo = print, placement_group: PlacementGroup | None = None, argv: list[str] | None = None) -> None:
        check_names(cfg)  # the registered names (the entry points checked; a config built in Python may not be)
        self.cfg = cfg
        self.argv = argv  # the command the user typed (the CLI's), for provenance; None: this process's own, outside an actor
        # A Tune trial's group (bundle 0: the driver's, then one per client actor); None: any node.
        self.placement_group = placement_group
        # A URI run directory: the run works in a local staging copy, pushed after each checkpoint.
        self.mirror = storage.RunMirror(str(run_dir)) if storage.is_uri(run_dir) else None
        self.run_dir = self.mirror.local if self.mirror else Path(run_dir)
        self.echo = echo
        self.notes = console.Capped(echo)  # per-client notes: a few per kind, then a count
        self.source = DATASETS.get(cfg.data.name)(cfg.data, img_size=cfg.model.img_size, seed=cfg.seed)
        self.algorithm = build_algorithm(cfg)
        self.algorithm.read_keys(self.run_dir)  # keyed DP noise without a key: a ConfigError here, before Ray starts
        self.attributes = round_metrics.eval_attributes(cfg, self.source)
        if cfg.eval.holdout_site is not None:
            self._hold_out(self.source.client_specs())  # an unknown or only client fails here, before Ray starts (the CLI builds a Driver first)
        # The simulated clock (system.simulate): a bad trace, profile or correlation fails here, before Ray starts.
        self.clock = simulated_clock(cfg, self._hold_out(self.source.client_specs())[0], self.source.group_names, self.algorithm) if cfg.system.simulate else None
        self.recorder = recorder.RunRecorder.for_config(self.run_dir, cfg)  # eval.pseudonymize without a key: a ConfigError here
        self.pool: ActorPool | None = None
        self.lock: storage.RunLock | None = None  # taken by `start`
        self.restarts = 0  # actor losses recovered so far (fault.max_restarts)
        self.slowest_round = 0.0  # seconds: sets the deadline of every wait on an actor
        self.lost_in_round = False  # an actor was lost (drop) in the round under way: its time is not timed
        self.evaluated_round = 0
        self.manifest: dict[str, str] = {}  # client id -> checkpoint file with its latest state
        self.known_files: dict[str, dict[str, Any]] = {}  # checkpoint file -> size and sha256, as written
        self.traffic_down = self.traffic_up = 0  # bytes sent in this process's rounds
        self.dead: dict[str, str] = {}  # client id -> why it is out of the run
        self.holdout: ClientSpec | None = None  # eval.holdout_site's client (role holdout), set by `start`
        self.stopped: str | None = None  # why the run ended before its last round (Algorithm.stop_before)
        self.absent: list[str] = []  # the round's sampled clients already out of the run (drop)
        self.empty_rounds, self.empty_reason = 0, ""  # consecutive rounds every sampled client failed (fault.max_empty_rounds)

    # --- the run ------------------------------------------------------------------------------

    def run(self, *, resume: bool = False, until: int | None = None) -> pd.DataFrame:
        """All rounds (or up to round `until`); returns the metrics frame."""
        try:
            self.start(resume=resume)
            last = min(until or self.cfg.federation.rounds, self.cfg.federation.rounds)
            for _ in self.advance(last):
                pass
            self.finish(last)
        finally:
            self.shutdown()
        return self.recorder.metrics

    def finish(self, last: int) -> None:
        """The end of the rounds asked for: the traffic line and, once the run is over (its last
        round done, or stopped by its method), `report.html` (`report.html: true`)."""
        self.echo_traffic(last)
        if self.cfg.report.html and (self.next_round > self.cfg.federation.rounds or self.stopped):
            self.write_report()

    def write_report(self) -> None:
        """RUN_DIR/report.html from the run's outputs; a report that fails costs a warning line,
        never the run (every number is in metrics.parquet, and `python -m raysim.report` retries).
        Classification and segmentation runs alike (`raysim.outputs.runs.Run.task` picks the sections)."""
        try:
            from raysim.reports import run_report as report  # matplotlib loads only when a report is written

            report.write_report(self.run_dir)
        except Exception as err:  # noqa: BLE001 - the run's results are complete without it
            self.echo(f"report.html not written ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); retry with python -m raysim.report {self.run_dir}")

    def echo_traffic(self, last: int) -> None:
        last = min(last, self.next_round - 1)  # a run the method stopped early (stop_before) ended sooner
        self.echo(f"communication: {_megabytes(self.traffic_down)} down, {_megabytes(self.traffic_up)} up over rounds {self.progress.first}-{last}")

    def shutdown(self) -> None:
        """Hand this run's actors back to this process's warm supply (`raysim.engine.warm`; none:
        stop them, each holds a process and its shards) and close the outputs (a URI run
        directory gets everything the staging copy has)."""
        actor_startup.release_actors(self)
        self.recorder.close()
        if self.mirror is not None and self.run_dir.exists():
            checkpoint_stream.push(self, f"everything is in {self.run_dir}")
        if self.lock is not None:
            self.lock.release()

    def _command(self) -> list[str] | None:
        """What the user typed: the CLI's argv when it passed it; else this process's, unless it
        is a Ray actor's (a worker's command line: node addresses, ports, session names), then None."""
        if self.argv is not None:
            return self.argv
        return None if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None else sys.argv

    def start(self, *, resume: bool = False) -> None:
        """Read the metadata, build the initial (or checkpointed) state and start the actors."""
        # The server step and the metrics compute here: fixed threads, deterministic kernels.
        deterministic_torch(self.cfg.resources.threads_per_client)
        self.lock = storage.RunLock(self.mirror.lock_dir if self.mirror else self.run_dir).acquire()  # one driver per run directory (a URI: per machine)
        if self.mirror is not None:  # a fresh staging copy: config.yaml, and on resume the checkpoints
            self.mirror.pull()
        kept = resume_check.record(self.cfg, self.run_dir)  # the config as given (before model.weights is filled in)
        saved = resume_check.saved_record(self.run_dir) if resume else None
        resume_check.check(saved, self.cfg, self.run_dir)  # the CLI checked before Ray; Tune did not
        self.cfg = with_backbone(self.cfg, self.echo)  # adapter methods need a pretrained backbone
        self.algorithm = build_algorithm(self.cfg)
        self.algorithm.read_keys(self.run_dir)
        self.algorithm.server_device = server_device(self.cfg.resources.driver_gpus)
        if self.cfg.resources.gpu_fold:
            self.algorithm.fold_device = self.algorithm.server_device
        specs, self.holdout = self._hold_out(self.source.client_specs())
        self.specs = {s.id: s for s in specs}  # the participants: sampled, set up, averaged (never the held-out site)
        self.clock = simulated_clock(self.cfg, specs, self.source.group_names, self.algorithm) if self.cfg.system.simulate else None
        hosted = sorted([*specs, self.holdout], key=lambda s: s.id) if self.holdout else specs  # every client an actor loads, in the source's order
        if not resume:
            resources = {"per_actor": dataclasses.asdict(self.cfg.resources), "ray_cluster": ray.cluster_resources()}
            provenance.write(self.run_dir, data=self.source.fingerprint(), resources=resources, argv=self._command(), attribute=self.target_attribute)
        if not resume or saved is not None:  # what the next resume checks (its rounds as now: an extension counts)
            provenance.add(self.run_dir, resume_check.RECORD, kept)
        self.echo(f"data: {self.cfg.data.name} with {len(hosted)} clients: " + actor_startup.client_list(hosted))
        if self.holdout:
            self.echo(f"eval.holdout_site={self.holdout.id}: never trains, never sampled, outside every mean; scored at each evaluation with {self.algorithm.newcomer}")
            if not resume:  # the rule in words, for the report (which imports no method)
                provenance.add(self.run_dir, "holdout", {"site": self.holdout.id, "scored_with": self.algorithm.newcomer})
        actor_startup.start_actors(self, hosted)  # their processes start while the method prepares and the model is built
        self.context = self.algorithm.prepare_run(self.source, specs, self.run_dir, self.echo)
        model = self.algorithm.build_model(self.source)
        self.state = self.algorithm.init_state(model)
        if self.clock is not None:  # the clock's state travels with the server's, checkpointed with it
            self.state = {**self.state, SYSTEM: simulated.initial_state(self)}
        self.initial_state = copy.deepcopy(self.state)  # a recovery before the first checkpoint starts here
        self.next_round = 1
        checkpoint, done = checkpoint_stream.resume_server(self) if resume else (None, 0)
        context = ray.get_runtime_context()
        where = {"pid": os.getpid(), "node_id": context.get_node_id(), "ray_actor_id": context.get_actor_id()}
        provenance.add(self.run_dir, "driver" if self.next_round == 1 else f"driver_from_round_{self.next_round}", where)
        actor_startup.load_clients(self)
        if checkpoint is not None:
            checkpoint_stream.restore_clients(self, checkpoint)
            self.echo(f"resumed from {checkpoint} (round {done} done)")
        else:  # what each client shares before round 1 (a resumed state holds it already)
            self.state = self.algorithm.setup_state(self.state, actor_startup.client_setup(self))
        self.progress = recorder.Progress(self.cfg.federation.rounds, self.next_round, self.echo)

    def advance(self, last: int) -> Iterator[tuple[int, str]]:
        """Rounds `next_round`..`last`, part by part as `step_parts` names them, then (round, "done").

        A lost client actor (`fault.on_client_loss: recover`) is replaced, every client goes back
        to the last complete checkpoint and the rounds since are replayed: rounds are
        deterministic, so the run ends with exactly the uninterrupted metrics.
        """
        while self.next_round <= last:
            round_ = self.next_round
            if self.stop_reason(round_):
                return
            started, self.lost_in_round = time.perf_counter(), False
            try:
                for part in self.step_parts(round_):
                    yield round_, part
            except ActorLost as lost:
                recovery.recover(self, round_, lost)
                continue
            if not self.lost_in_round:  # a wait on a lost actor is no round's time: it would feed the deadline
                self.slowest_round = max(self.slowest_round, time.perf_counter() - started)
            yield round_, "done"

    def stop_reason(self, round_: int) -> str | None:
        """The method's `stop_before` (e.g. a privacy budget that round `round_` would exceed):
        the round before is checkpointed (if it was not yet), the reason echoed, the run ends."""
        reason = self.algorithm.stop_before(round_, self.state)
        if reason is None:
            return None
        done = round_ - 1
        if done == 0:  # nothing would be trained: the config contradicts itself (one line, exit 2)
            raise ConfigError(f"the run would stop before round 1, {reason}; raise the budget or the noise")
        latest = checkpoints.latest(self.run_dir)
        if done > 0 and latest != checkpoints.folder(self.run_dir, done):
            checkpoint_stream.save(self, done, self.state)
        self.stopped = f"stopped before round {round_}: {reason}"
        self.echo(self.stopped)
        return self.stopped

    def step(self, round_: int) -> None:
        """One round: train and aggregate, then evaluate and checkpoint when due."""
        for _ in self.step_parts(round_):
            pass

    def step_parts(self, round_: int) -> Iterator[str]:
        """`step`, pausing after each part ("round", "evaluate", "checkpoint") so a caller can
        stream the console lines of each as it ends (the driver actor does)."""
        self.state = self.run_round(round_, self.state, self.progress)
        self._stop_if_empty(round_)
        yield "round"
        last = self._is_last(round_)
        if round_ % self.cfg.eval.every == 0 or last:
            round_metrics.evaluate(self, round_, self.state, splits=["val", "test"], show="test" if last else "val")
            yield "evaluate"
        if round_ % self.cfg.checkpoint.every == 0 or last:
            checkpoint_stream.save(self, round_, self.state)
            yield "checkpoint"
        self.next_round = round_ + 1

    def _is_last(self, round_: int) -> bool:
        """Round `round_` is the run's last: `federation.rounds`, or the method stops before the next
        one (a spent privacy budget). A last round is evaluated, checkpointed and, under
        `eval.predictions=final`, its predictions are the ones kept."""
        if round_ < self.cfg.federation.rounds and self.algorithm.stop_before(round_ + 1, self.state) is None:
            return False
        self.recorder.final_round = round_
        return True

    def run_round(self, round_: int, state: ServerState, progress: recorder.Progress) -> ServerState:
        if self.clock is not None and self.algorithm.asynchronous:
            return simulated.run_async_round(self, round_, state, progress)
        sampled = self.sample_clients(round_)
        payload = self.algorithm.payload(state, round_)
        down = nbytes(payload)
        plan = None
        if self.clock is not None:  # who finishes in (simulated) time; the others are not trained at all
            plan = simulated.plan_round(self, round_, state, sampled, payload, down)
            sampled = plan.trained
        self.last_sampled = sampled
        self.pool.broadcast(payload, sampled, self.algorithm.round_values(state, round_))
        del payload  # the object store holds it for the actors; the state holds the driver's
        outcome = RoundOutcome()
        statistics: dict[str, dict[str, Any]] = {}
        if self.algorithm.round_statistics:
            statistics = self._round_statistics(sampled, round_, outcome)
            sampled = [cid for cid in sampled if cid in statistics]  # no statistics, no place in the fold
        fold = self.algorithm.fold_start(round_, state, statistics)
        self.fit_and_fold(round_, sampled, round_, fold, outcome, f"round {round_}: clients trained")
        if outcome.arrived:
            state = self.algorithm.finalize(round_, fold, state)
        else:
            self.echo(f"round {round_}: no client update arrived; the global state is unchanged")
        del fold
        if plan is not None:
            state = simulated.after_round(self, round_, state, plan.start, plan.end, outcome, dropped=plan.dropped, available=plan.available)
        return self.end_round(round_, state, down, outcome, progress)

    def fit_and_fold(self, round_: int, sampled: list[str], fit_round: int, fold: Any, outcome: RoundOutcome, phase: str, extra: dict[str, dict[str, Any]] | None = None) -> None:
        """Train `sampled` (on the payload last broadcast to them, with the data order of
        `fit_round`) and fold each update as it streams in, in sorted client order; `extra`
        (client -> values) is added to an update's `extra` before the fold (an asynchronous
        update's staleness). A failed client or a rejected update is rolled back and recorded."""
        console.report(phase, 0, len(sampled))
        for done, (cid, result) in enumerate(self.pool.ordered("fit", sampled, None, fit_round, timeout=self.deadline()), start=1):
            console.report(phase, done, len(sampled))
            if isinstance(result, Exception):
                outcome.failed[cid] = mark_failed(self, cid, result)
                if not isinstance(result, LOST):  # a failed fit may have changed part of its state
                    self.pool.actor_of(cid).rollback.remote(cid)
                continue
            result.tensors = from_wire(result.tensors, copy=False)  # read-only views: a fold only reads them
            bad = non_finite(result.tensors)
            if bad:
                outcome.failed[cid] = f"non-finite values in {', '.join(bad[:3])}"
                self.notes.say("had their update rejected", f"client {cid}: update rejected ({outcome.failed[cid]}); its state is rolled back to before the round")
                self.pool.actor_of(cid).rollback.remote(cid)  # runs before anything the driver sends it later
                continue
            result.extra.update((extra or {}).get(cid, {}))
            self.algorithm.accumulate(fold, result)
            outcome.arrived.append(Arrived(cid, result.num_examples, result.nbytes, result.metrics.get("loss", math.nan)))

    def end_round(self, round_: int, state: ServerState, down: int, outcome: RoundOutcome, progress: recorder.Progress) -> ServerState:
        """A round's records once its state is folded: server metrics, traffic, drops, the console line."""
        round_metrics.record_server_metrics(self, round_, state)
        round_metrics.record_traffic(self, round_, down, outcome)
        round_metrics.record_missing(self, round_)
        self.notes.flush()
        self._count_empty(outcome)
        losses = [a.loss for a in outcome.arrived]
        train_loss = float(np.average(losses, weights=[a.num_examples for a in outcome.arrived])) if losses else math.nan
        progress.round_done(round_, clients=len(outcome.arrived), failed=sorted(outcome.failed), train_loss=train_loss)
        return state

    def _count_empty(self, outcome: RoundOutcome) -> None:
        """`empty_rounds`: consecutive rounds in which every sampled client failed (an error, a
        rejected update, a lost actor under drop). A round empty by design (no client sent
        anything, none failed) neither counts nor breaks the count."""
        failed = list(outcome.failed.values()) + [self.dead[cid] for cid in self.absent]
        if outcome.arrived:
            self.empty_rounds = 0
        elif failed:
            self.empty_rounds += 1
            self.empty_reason = failed[-1]

    def _stop_if_empty(self, round_: int) -> None:
        """`fault.max_empty_rounds` reached: the round is checkpointed (its state is the last good
        one, every client rolled back) and the run stops, resumable."""
        limit = self.cfg.fault.max_empty_rounds
        if self.empty_rounds < limit:
            return
        if checkpoints.latest(self.run_dir) != checkpoints.folder(self.run_dir, round_):
            checkpoint_stream.save(self, round_, self.state)
        self.next_round = round_ + 1
        latest = checkpoints.latest(self.run_dir)
        where = f"--resume {self.mirror.uri if self.mirror else self.run_dir} continues from {latest.name}" if latest else "no checkpoint was complete yet"
        raise RunFailed(f"round {round_}: every sampled client failed in {self.empty_rounds} consecutive rounds (fault.max_empty_rounds={limit}); last: {self.empty_reason}; {where}")

    def _round_statistics(self, sampled: list[str], round_: int, outcome: RoundOutcome) -> dict[str, dict[str, Any]]:
        """Every sampled client's `client_statistics` (small values), before the fold starts; a
        client whose call fails is out of this round (`outcome.failed`)."""
        out: dict[str, dict[str, Any]] = {}
        phase = f"round {round_}: client statistics"
        console.report(phase, 0, len(sampled))
        for done, (cid, result) in enumerate(self.pool.ordered("statistics", sampled, None, round_, window=8, timeout=self.deadline()), start=1):
            console.report(phase, done, len(sampled))
            if isinstance(result, Exception):
                outcome.failed[cid] = mark_failed(self, cid, result)
                continue
            out[cid] = result
        return out

    def sample_clients(self, round_: int) -> list[str]:
        """The method's `sample_clients` over all clients (the default: seeded by (seed, round)
        alone, so every method sees the same selections), less those out of the run."""
        everyone = sorted(self.specs)
        k = self.cfg.federation.clients_per_round or len(everyone)
        pool = everyone
        if self.clock is not None:  # only the clients online when the round starts; over-selection draws more
            pool = self.clock.available(round_, simulated.now(self.state), everyone)
            k = self.clock.target(k)
        chosen = self.algorithm.sample_clients(round_, pool, min(k, len(pool)), self.state) if pool else []
        unknown = sorted(set(chosen) - set(pool))
        if unknown:
            raise RuntimeError(f"{self.algorithm.name}.sample_clients chose clients that do not exist or are offline: {unknown[:5]}")
        self.absent = [cid for cid in sorted(set(chosen)) if cid in self.dead]  # chosen but lost (drop): a round they empty failed
        return [cid for cid in sorted(set(chosen)) if cid not in self.dead]

    @property
    def target_attribute(self) -> str:
        """The attribute the console table and the report show ("" for a source without any)."""
        return self.source.attribute if self.source.attribute in self.attributes else next(iter(self.attributes), "")

    def _hold_out(self, specs: list[ClientSpec]) -> tuple[list[ClientSpec], ClientSpec | None]:
        """(the participants, as the method arranges them; the `eval.holdout_site` client with role
        `holdout`, or None). The method never sees the held-out site: not in `arrange_clients`,
        `prepare_run`, `client_setup`, sampling or its weights; only the actors load its shards."""
        site = self.cfg.eval.holdout_site
        if site is None:
            return self.algorithm.arrange_clients(specs), None
        ids = [s.id for s in specs]
        if site not in ids:
            raise ConfigError(f"eval.holdout_site={site!r} is not a client of data source {self.cfg.data.name}; its clients: {console.first(ids, 20)}")
        if len(ids) == 1:
            raise ConfigError(
                f"eval.holdout_site={site} is the only client of data source {self.cfg.data.name}: no client would train; hold out one of several clients (data.partition with data.num_clients makes more)"
            )
        held = next(s for s in specs if s.id == site)
        return self.algorithm.arrange_clients([s for s in specs if s.id != site]), dataclasses.replace(held, role=HOLDOUT)

    def deadline(self, kind: str = "round") -> float:
        """Seconds one wait on an actor may take (`failures.deadline`: "start", "eval" or "round")."""
        return failures.deadline(self.cfg.fault, self.slowest_round, kind)


def finished_run(cfg: ExperimentConfig, run_dir: Path, *, echo: console.Echo = lambda _: None) -> Path:
    """`run_dir` holding the finished run of `cfg` (the benchmarks' resumable runs): a `DONE`
    file there means it finished (it holds the run's seconds) and nothing trains; otherwise
    whatever an interrupted attempt left is removed and the run starts again from round 1."""
    if (run_dir / "DONE").exists():
        return run_dir
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config.dump(cfg))
    start = time.perf_counter()
    Driver(cfg, run_dir, echo=echo).run()
    (run_dir / "DONE").write_text(f"{time.perf_counter() - start:.1f}\n")
    return run_dir


def server_device(driver_gpus: float) -> torch.device:
    """The driver actor's GPU when it has a share of one (`resources.driver_gpus`), else the CPU."""
    """Where the server step computes: the driver actor's GPU when `resources.driver_gpus` gave it one."""
    return torch.device("cuda") if driver_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB"
