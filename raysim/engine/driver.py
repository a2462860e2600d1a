"""The driver: starts the client actor pool, runs the rounds, folds updates, evaluates, checkpoints.

The round loop exists here once. Every sampled client is waited for; updates are folded into
the method's accumulator one at a time in sorted client-id order as they stream from the pool
(`pool.ActorPool.ordered`), so the driver holds one accumulator and one update whatever the
cohort; every random choice is seeded from (seed, round, client), so a run is a function of
its config: the number of actors and their scheduling change nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import torch
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError
from ray.util import get_current_placement_group
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raysim import config, console, provenance
from raysim.algorithms import ServerState, with_backbone
from raysim.algorithms import build as build_algorithm
from raysim.algorithms import check as check_names
from raysim.algorithms.aggregation import non_finite
from raysim.algorithms.base import HOLDOUT
from raysim.config import ConfigError, ExperimentConfig
from raysim.datasets import DATASETS, ClientSpec
from raysim.determinism import deterministic_torch
from raysim.engine import checkpoints, local_ray, placement
from raysim.engine.client_actor import ClientActor, from_wire
from raysim.engine.pool import ActorPool
from raysim.metrics.classification import UndefinedMetricWarning
from raysim.outputs import recorder, resume_check, storage
from raysim.seeding import derive_seed, rng
from raysim.types import Predictions, nbytes

log = logging.getLogger(__name__)
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


class ActorLost(Exception):
    """A client actor died, became unreachable or missed its deadline: recovered by replay."""

    def __init__(self, actor_index: int, clients: list[str], reason: str, *, maybe_alive: bool = False) -> None:
        super().__init__(f"client actor of {console.first(clients)} lost ({reason})")
        self.actor_index, self.clients, self.reason = actor_index, clients, reason
        self.maybe_alive = maybe_alive  # unreachable for a moment: replaced only if it stays so


class RunFailed(RuntimeError):
    """The run cannot go on (e.g. more actor losses than fault.max_restarts); resumable from its last checkpoint."""


UNAVAILABLE_PAUSE_S = 1.0  # between two calls to an actor Ray reports unavailable
LOST = (RayActorError, GetTimeoutError)  # RayActorError covers ActorDiedError and ActorUnavailableError


@dataclass
class Arrived:
    """What the driver keeps of a folded update: a few numbers, never its tensors."""

    client_id: str
    num_examples: int
    nbytes: int
    loss: float


@dataclass
class RoundOutcome:
    arrived: list[Arrived] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # client id -> reason


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
        self.attributes = self._eval_attributes()
        if cfg.eval.holdout_site is not None:
            self._hold_out(self.source.client_specs())  # an unknown or only client fails here, before Ray starts (the CLI builds a Driver first)
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
        Classification and segmentation runs alike (`raysim.runs.Run.task` picks the sections)."""
        try:
            from raysim.reports import run_report as report  # matplotlib loads only when a report is written

            report.write_report(self.run_dir)
        except Exception as err:  # noqa: BLE001 - the run's results are complete without it
            self.echo(f"report.html not written ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); retry with python -m raysim.report {self.run_dir}")

    def echo_traffic(self, last: int) -> None:
        last = min(last, self.next_round - 1)  # a run the method stopped early (stop_before) ended sooner
        self.echo(f"communication: {_megabytes(self.traffic_down)} down, {_megabytes(self.traffic_up)} up over rounds {self.progress.first}-{last}")

    def shutdown(self) -> None:
        """Stop this run's actors (each holds a process and its shards) and close the outputs
        (a URI run directory gets everything the staging copy has)."""
        if self.pool is not None:
            self.pool.kill()
        self.recorder.close()
        if self.mirror is not None and self.run_dir.exists():
            self._push(f"everything is in {self.run_dir}")
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
        specs, self.holdout = self._hold_out(self.source.client_specs())
        self.specs = {s.id: s for s in specs}  # the participants: sampled, set up, averaged (never the held-out site)
        hosted = sorted([*specs, self.holdout], key=lambda s: s.id) if self.holdout else specs  # every client an actor loads, in the source's order
        if not resume:
            resources = {"per_actor": dataclasses.asdict(self.cfg.resources), "ray_cluster": ray.cluster_resources()}
            provenance.write(self.run_dir, data=self.source.fingerprint(), resources=resources, argv=self._command(), attribute=self.target_attribute)
        if not resume or saved is not None:  # what the next resume checks (its rounds as now: an extension counts)
            provenance.add(self.run_dir, resume_check.RECORD, kept)
        self.echo(f"data: {self.cfg.data.name} with {len(hosted)} clients: " + _client_list(hosted))
        if self.holdout:
            self.echo(f"eval.holdout_site={self.holdout.id}: never trains, never sampled, outside every mean; scored at each evaluation with {self.algorithm.newcomer}")
            if not resume:  # the rule in words, for the report (which imports no method)
                provenance.add(self.run_dir, "holdout", {"site": self.holdout.id, "scored_with": self.algorithm.newcomer})
        self.context = self.algorithm.prepare_run(self.source, specs, self.run_dir, self.echo)
        model = self.algorithm.build_model(self.source)
        self.state = self.algorithm.init_state(model)
        self.initial_state = copy.deepcopy(self.state)  # a recovery before the first checkpoint starts here
        self.next_round = 1
        checkpoint = None
        if resume:
            checkpoint, skipped = checkpoints.usable(self.run_dir)
            for line in skipped:
                self.echo(line)
        if checkpoint is not None:
            self.state, done = checkpoints.load_server(checkpoint)
            self.next_round = done + 1
            self.recorder.load_existing()
            self.recorder.truncate(done)
        context = ray.get_runtime_context()
        where = {"pid": os.getpid(), "node_id": context.get_node_id(), "ray_actor_id": context.get_actor_id()}
        provenance.add(self.run_dir, "driver" if self.next_round == 1 else f"driver_from_round_{self.next_round}", where)
        self._start_actors(hosted)
        if checkpoint is not None:
            self._restore_clients(checkpoint)
            self.echo(f"resumed from {checkpoint} (round {done} done)")
        else:  # what each client shares before round 1 (a resumed state holds it already)
            self.state = self.algorithm.setup_state(self.state, self._client_setup())
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
                self._recover(round_, lost)
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
            self.checkpoint(done, self.state)
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
            self.evaluate(round_, self.state, splits=["val", "test"], show="test" if last else "val")
            yield "evaluate"
        if round_ % self.cfg.checkpoint.every == 0 or last:
            self.checkpoint(round_, self.state)
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
        sampled = self.sample_clients(round_)
        self.last_sampled = sampled
        payload = self.algorithm.payload(state, round_)
        down = nbytes(payload)
        self.pool.broadcast(payload, sampled, self.algorithm.round_values(state, round_))
        del payload  # the object store holds it for the actors; the state holds the driver's
        outcome = RoundOutcome()
        statistics: dict[str, dict[str, Any]] = {}
        if self.algorithm.round_statistics:
            statistics = self._round_statistics(sampled, round_, outcome)
            sampled = [cid for cid in sampled if cid in statistics]  # no statistics, no place in the fold
        fold = self.algorithm.fold_start(round_, state, statistics)
        phase = f"round {round_}: clients trained"
        console.report(phase, 0, len(sampled))
        for done, (cid, result) in enumerate(self.pool.ordered("fit", sampled, None, round_, timeout=self.deadline()), start=1):
            console.report(phase, done, len(sampled))
            if isinstance(result, Exception):
                outcome.failed[cid] = self._mark_failed(cid, result)
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
            self.algorithm.accumulate(fold, result)
            outcome.arrived.append(Arrived(cid, result.num_examples, result.nbytes, result.metrics.get("loss", math.nan)))
        if outcome.arrived:
            state = self.algorithm.finalize(round_, fold, state)
        else:
            self.echo(f"round {round_}: no client update arrived; the global state is unchanged")
        del fold
        self._record_server_metrics(round_, state)
        self._record_traffic(round_, down, outcome)
        self._record_missing(round_)
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
            self.checkpoint(round_, self.state)
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
                outcome.failed[cid] = self._mark_failed(cid, result)
                continue
            out[cid] = result
        return out

    def _record_traffic(self, round_: int, down: int, outcome: RoundOutcome) -> None:
        """bytes_down / bytes_up / the training loss per client that took part (split `train`), and their means."""
        rows = [(a.client_id, "bytes_down", float(down)) for a in outcome.arrived]
        rows += [(a.client_id, "bytes_up", float(a.nbytes)) for a in outcome.arrived]
        rows += [(a.client_id, "loss", float(a.loss)) for a in outcome.arrived]  # the local training loss
        if not rows:
            return
        frame = pd.DataFrame(rows, columns=["client", "metric", "value"])
        roles = {cid: spec.role for cid, spec in self.specs.items()}
        frame = frame.assign(round=round_, split="train", role=frame["client"].map(roles), attribute="", group="")
        self.recorder.add(recorder.with_means(frame[recorder.METRIC_COLUMNS]), [])
        self.traffic_down += down * len(outcome.arrived)
        self.traffic_up += sum(a.nbytes for a in outcome.arrived)

    def _record_server_metrics(self, round_: int, state: ServerState) -> None:
        """The method's `server_metrics` as rows of client `server`, split `train`, outside the means."""
        values = self.algorithm.server_metrics(round_, state)
        if values:
            frame = pd.DataFrame({"round": round_, "split": "train", "client": recorder.SERVER, "role": "", "attribute": "", "group": "", "metric": list(values), "value": [float(v) for v in values.values()]})
            self.recorder.add(frame[recorder.METRIC_COLUMNS], [])

    def _record_missing(self, round_: int) -> None:
        """With clients dropped (fault.on_client_loss=drop): `missing` (1.0) per dropped client and
        `n_clients` (those left, over which every mean is taken), split `train`, every round."""
        dropped = self._dropped()
        if not dropped:
            return
        rows = [(cid, "missing", 1.0) for cid in dropped] + [("mean", "n_clients", float(len(self.specs) - len(dropped)))]
        frame = pd.DataFrame(rows, columns=["client", "metric", "value"])
        roles = {cid: spec.role for cid, spec in self.specs.items()}
        frame = frame.assign(round=round_, split="train", role=frame["client"].map(roles).fillna(""), attribute="", group="")
        self.recorder.add(frame[recorder.METRIC_COLUMNS], [])

    def sample_clients(self, round_: int) -> list[str]:
        """The method's `sample_clients` over all clients (the default: seeded by (seed, round)
        alone, so every method sees the same selections), less those out of the run."""
        everyone = sorted(self.specs)
        k = self.cfg.federation.clients_per_round or len(everyone)
        chosen = self.algorithm.sample_clients(round_, everyone, k, self.state)
        unknown = sorted(set(chosen) - set(everyone))
        if unknown:
            raise RuntimeError(f"{self.algorithm.name}.sample_clients chose clients that do not exist: {unknown[:5]}")
        self.absent = [cid for cid in sorted(set(chosen)) if cid in self.dead]  # chosen but lost (drop): a round they empty failed
        return [cid for cid in sorted(set(chosen)) if cid not in self.dead]

    def evaluate(self, round_: int, state: ServerState, *, splits: list[str], show: str) -> None:
        chosen = [cid for cid in self.eval_clients() if cid not in self.dead]
        if self.holdout and self.holdout.id not in self.dead:  # scored at every evaluation, whatever eval.clients says
            chosen.append(self.holdout.id)
        self.pool.broadcast(self.algorithm.payload(state, round_), chosen, self.algorithm.round_values(state, round_))
        predictions: list[Predictions] = []
        phase = f"round {round_}: clients evaluated"
        console.report(phase, 0, len(chosen))
        record = self.recorder.keeps(round_)  # sample ids and masks leave the actors only for predictions.parquet
        for done, (cid, result) in enumerate(self.pool.ordered("evaluate", chosen, None, splits, record, window=8, timeout=self.deadline("eval")), start=1):
            console.report(phase, done, len(chosen))
            if isinstance(result, Exception):
                self._mark_failed(cid, result)
            else:
                predictions.extend(result)
        self.notes.flush()
        if not predictions:
            raise RunFailed(f"round {round_}: no client could be evaluated ({self.dead})")  # e.g. every actor lost under drop: exit 1, not a traceback
        group_names = self.source.group_names
        with warnings.catch_warnings(record=True) as undefined:
            warnings.simplefilter("always", UndefinedMetricWarning)
            scored = [(p, derive_seed(self.cfg.seed, "boot", round_, p.client_id, p.split)) for p in predictions]
            frame = recorder.metric_frame(round_, scored, group_names, self.attributes, n_boot=self.cfg.eval.bootstrap)
        if undefined:
            # Small groups make undefined values routine: one line, not one warning each.
            log.warning("round %d: %d metric values undefined (NaN), e.g. %s", round_, len(undefined), undefined[0].message)
        metric_frame = self._with_means(frame)
        self.evaluated_round = round_
        self.recorder.add(metric_frame, self.recorder.prediction_frames(round_, predictions, self.attributes))  # eval.predictions, eval.pseudonymize
        attribute = self.target_attribute
        self.echo(recorder.format_table(metric_frame, round_=round_, split=show, attribute=attribute, group_names=group_names.get(attribute, {}), task=self.algorithm.task.name))
        if dropped := self._dropped():
            self.echo(f"means over {len(self.specs) - len(dropped)} of {len(self.specs)} clients; dropped: {console.first(dropped)}")

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

    def _with_means(self, frame: pd.DataFrame) -> pd.DataFrame:
        """`recorder.with_means` over the participants' rows; the held-out site's rows (role
        `holdout`) follow as they are, in no mean (so selection by mean validation metric is the
        participants' alone). Without a held-out site: exactly `with_means(frame)`."""
        held = frame["role"] == HOLDOUT
        if not held.any():
            return recorder.with_means(frame)
        return pd.concat([recorder.with_means(frame[~held]), frame[held]], ignore_index=True)

    def _dropped(self) -> list[str]:
        """Participants out of the run (`fault.on_client_loss=drop`); a lost held-out site is no missing client."""
        return sorted(cid for cid in self.dead if cid in self.specs)

    def eval_clients(self) -> list[str]:
        """`eval.clients`: all clients, the last round's cohort, or a seeded subset fixed for the run."""
        everyone = sorted(self.specs)
        chosen = self.cfg.eval.clients
        if chosen == "all":
            return everyone
        if chosen == "sampled":
            return getattr(self, "last_sampled", None) or everyone
        picked = rng(self.cfg.seed, "eval_clients").choice(len(everyone), size=min(int(chosen), len(everyone)), replace=False)
        return [everyone[i] for i in sorted(picked)]

    # --- checkpoints --------------------------------------------------------------------------

    def checkpoint(self, round_: int, state: ServerState) -> None:
        """The server state, then each actor's clients whose state changed since the last
        checkpoint, streamed from the actor and written here (actors never get a path: they may
        run on other nodes); the manifest names every client's latest file; COMPLETE last."""
        folder = checkpoints.folder(self.run_dir, round_)
        folder.mkdir(parents=True, exist_ok=True)
        checkpoints.write_server(folder, round_, state)
        manifest, written, complete = dict(self.manifest), {}, True
        streams = {i: actor.save_changed.remote() for i, actor in self.pool.live()}  # all actors serialize at once; retired ones never
        phase = f"round {round_}: checkpoint, client actors written"
        for n, (i, stream) in enumerate(streams.items()):
            console.report(phase, n, len(streams))
            group = self.pool.plan[i]
            try:
                saved, path = self._write_clients(stream, checkpoints.actor_file(folder, i), written)
            except (*LOST, RayTaskError, OSError) as err:
                if all(spec.id in self.dead for spec in group):
                    continue  # an actor already out of the run: its clients' last states stay as they were
                if isinstance(err, OSError):  # e.g. a full disk: this checkpoint would lose state
                    self.echo(f"round {round_}: could not write {checkpoints.relative(checkpoints.actor_file(folder, i))}: {err}")
                else:
                    self._mark_failed(group[0].id, err)  # a lost actor (recover) ends here: replayed
                complete = False
                continue
            if saved:
                manifest.update({cid: checkpoints.relative(path) for cid in saved})
                self.pool.actors[i].saved.remote(saved)  # ordered before the actor's next call
        console.report(phase, len(streams), len(streams))
        self.notes.flush()
        # Files written now stay named even when this checkpoint is incomplete: their clients are
        # not rewritten until they change again (an unwritten file leaves its clients marked changed).
        self.manifest = {cid: f for cid, f in manifest.items() if cid not in self.dead}
        self.known_files.update(written)
        if not complete:
            self.echo(f"round {round_}: checkpoint incomplete (a client's state could not be written); the previous one stays the latest")
            return
        self.known_files = checkpoints.complete(folder, round_, self.manifest, self.dead, self.known_files, self.cfg.checkpoint.keep)
        if self.mirror is not None:
            self._push("the next checkpoint tries again")

    def _push(self, otherwise: str) -> None:
        """The staging copy to the URI; a storage error costs a line, not the run."""
        try:
            self.mirror.push()
        except OSError as err:  # pyarrow's I/O errors are OSErrors
            self.echo(f"could not copy the run directory to {self.mirror.uri} ({str(err).splitlines()[0]}); {otherwise}")

    def _write_clients(self, stream: Any, path: Path, written: dict[str, dict[str, Any]]) -> tuple[list[str], Path]:
        """One actor's `save_changed` stream to `path`: (client ids, path); no file when none changed."""
        pieces = self._pieces(stream)
        saved = next(pieces)
        if saved:
            try:
                written[checkpoints.relative(path)] = checkpoints.write_chunks(pieces, path)
            except OSError:
                for _ in pieces:  # drain: the actor finishes its call and answers the next one
                    pass
                raise
        return saved, path

    def _pieces(self, stream: Any) -> Iterator[Any]:
        """The values of a streaming actor call, each awaited with the deadline."""
        while True:
            ready, _ = ray.wait([stream], timeout=self.deadline())
            if not ready:
                raise GetTimeoutError(f"no answer within {self.deadline():.0f} s")
            try:
                ref = next(stream)
            except StopIteration:
                return
            yield ray.get(ref, timeout=self.deadline())

    def _restore_clients(self, folder: Path) -> None:
        """The driver reads each client file the checkpoint names, once, and sends its bytes to
        the actors whose clients it holds; a client in no file starts from the initial state."""
        saved = checkpoints.load_manifest(folder)
        self.manifest = dict(saved.get("clients", {}))
        self.known_files = dict(saved["files"])
        for cid, reason in saved.get("dead", {}).items():
            if cid in self.specs:
                self.dead[cid] = reason
                self.notes.say("out of the run since before this checkpoint", f"client {cid}: out of the run since before this checkpoint ({reason}); continuing without it")
        self.notes.flush()
        root = folder.parent
        contents = {name: ray.put((root / name).read_bytes()) for name in sorted(set(self.manifest.values()))}
        refs = []
        for i, group in enumerate(self.pool.plan):
            files: dict[str, list[str]] = {}
            for spec in group:
                if spec.id in self.manifest:
                    files.setdefault(self.manifest[spec.id], []).append(spec.id)
            refs.append(self.pool.actors[i].restore.remote(list(files.items()), *(contents[name] for name in files)))
        ray.get(refs, timeout=self.deadline("start"))  # after a recovery, new actors start first

    # --- actors -------------------------------------------------------------------------------

    def _start_actors(self, specs: list[ClientSpec]) -> None:
        res = self.cfg.resources
        groups = placement.assign(specs, self._actor_count(len(specs)), res.clients_per_actor)
        handles = [self._new_actor(i, group) for i, group in enumerate(groups)]
        machines = []
        self.pool = ActorPool(handles, groups)
        provenance.add(self.run_dir, "actor_plan", [[spec.id for spec in group] for group in groups])
        self.echo(f"starting {len(handles)} client actors ({res.actor_cpus:g} CPU, {res.num_gpus:g} GPU each; {placement.clients_per_actor_text(groups)} per actor)")
        described: dict[str, Any] = {}
        loaded = np.cumsum([len(group) for group in groups])  # actors answer in order, each once all its clients are loaded
        console.report("loading client shards", 0, len(specs))
        answers = self.pool.each_actor("describe", timeout=self.deadline("start"), on_answer=lambda i: console.report("loading client shards", int(loaded[i]), len(specs)))
        for actor, info in zip(self.pool.actors, answers, strict=True):
            if isinstance(info, ActorUnavailableError):  # transient: ask again (describe changes nothing)
                info = self._answers(actor, "start") or info
            if isinstance(info, dict) and "_error" in info:
                raise info["_error"]  # bad input an actor found (a DataError naming the file): one line
            if isinstance(info, RayTaskError):
                raise _unwrap(info) from None
            if isinstance(info, RayActorError):  # died starting (out of memory, a bug): not the driver's loss
                raise RunFailed(f"a client actor died while starting: {info}") from None
            if isinstance(info, GetTimeoutError):
                raise RunFailed(
                    f"client actors not started within fault.start_timeout_s={self.deadline('start'):g} s: Ray may lack what each asks for "
                    f"({res.actor_cpus:g} CPU, {res.num_gpus:g} GPU; the cluster has {ray.cluster_resources()}), or loading the shards takes longer (raise fault.start_timeout_s)"
                )
            if isinstance(info, Exception):
                raise info
            machines.append(info["_machine"])
            described.update((k, v) for k, v in info.items() if not k.startswith("_"))
        self._echo_shards(described)
        # What the clients computed on (distinct machines only): what tells two runs' numbers apart.
        distinct = list({json.dumps(m, sort_keys=True, default=str): m for m in machines}.values())
        provenance.add(self.run_dir, "actor_machines" if self.next_round == 1 else f"actor_machines_from_round_{self.next_round}", distinct)

    def _new_actor(self, i: int, group: list[ClientSpec]) -> Any:
        """Client actor i of the plan (in a Tune trial: pinned to bundle i + 1; bundle 0 is the driver's)."""
        res, pg = self.cfg.resources, self._placement_group()
        pinned = {} if pg is None else {"scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i + 1)}
        return ClientActor.options(num_cpus=res.actor_cpus, num_gpus=res.num_gpus, **pinned).remote(self.cfg, group, self.context)

    def _echo_shards(self, described: dict[str, Any]) -> None:
        """Samples per split per client after the drop rules; beyond `console.MAX_LISTED`
        clients, per split min / median / max and what was skipped, summed over clients."""
        if len(described) <= console.MAX_LISTED:
            for cid in sorted(described):
                splits = described[cid]
                dropped = sum((Counter(s["dropped"]) for s in splits.values()), Counter())
                note = f"; skipped {dict(dropped)}" if dropped else ""
                self.echo(f"  {cid}: " + ", ".join(f"{split} {s['n']}" for split, s in splits.items()) + note)
            return
        splits = list(dict.fromkeys(split for info in described.values() for split in info))
        sizes = {split: [info[split]["n"] for info in described.values() if split in info] for split in splits}
        self.echo(f"  {len(described)} clients loaded; samples per client (min / median / max): " + ", ".join(f"{split} {console.spread(n)}" for split, n in sizes.items()))
        dropped = {cid: sum((Counter(s["dropped"]) for s in info.values()), Counter()) for cid, info in described.items()}
        total = sum(dropped.values(), Counter())
        if total:
            self.echo(f"  skipped {dict(total)} in {sum(1 for d in dropped.values() if d)} clients")

    def _client_setup(self) -> dict[str, Any]:
        """Every client's `Algorithm.client_setup`, by client id; a failure ends the run before training."""
        out: dict[str, Any] = {}
        console.report("client setup", 0, len(self.specs))
        for done, (cid, result) in enumerate(self.pool.ordered("setup", sorted(self.specs), window=8, timeout=self.deadline("start")), start=1):
            console.report("client setup", done, len(self.specs))
            if isinstance(result, RayTaskError):
                raise _unwrap(result) from None
            if isinstance(result, Exception):
                raise result
            out[cid] = result
        return out

    def _placement_group(self) -> PlacementGroup | None:
        return self.placement_group or get_current_placement_group()

    def _actor_count(self, n_clients: int) -> int:
        """The pool's size: from Ray's resources, or, in a Tune trial, the client bundles it reserved."""
        res = self.cfg.resources
        pg = self._placement_group()
        if pg is None:
            capacity = placement.Capacity.of(ray.cluster_resources())  # a cluster's: what it has now
            n = placement.actor_count(n_clients, res, capacity)
            if not os.environ.get("RAY_ADDRESS"):  # a cluster may autoscale: Ray queues what does not fit yet
                placement.check_fits(n, res, capacity)
            return n
        # A Tune trial: raysim.tune sized its group with placement.actor_count; bundle 0 is the driver's.
        reserved = len(pg.bundle_specs) - 1
        n = min(reserved, n_clients) if placement.is_auto(res) else placement.actor_count(n_clients, res, None)
        if n > reserved:
            raise ConfigError(f"the placement group has {len(pg.bundle_specs)} bundles; {n} client actors need {n + 1} (the driver's + one each)")
        return n

    def _mark_failed(self, cid: str, err: Exception) -> str:
        if isinstance(err, LOST):
            # The actor is gone (or hung), and with it every client it hosted.
            gone = self.pool.clients_of(cid)
            if isinstance(err, GetTimeoutError):
                reason = f"no answer within {self.deadline():.0f} s"
            elif isinstance(err, ActorUnavailableError):  # e.g. a network blip: the call may or may not have run
                reason = "unreachable; the call may not have run"
            else:
                reason = "actor died"
            if self.cfg.fault.on_client_loss == "recover":
                raise ActorLost(self.pool.index[cid], gone, reason, maybe_alive=isinstance(err, ActorUnavailableError))
            if cid in self.dead:  # the actor's other clients: it was retired when the first one failed
                return self.dead[cid]
            self.pool.retire(self.pool.index[cid])  # a hung one would hold its CPU / GPU and cost a deadline per later call
            self.lost_in_round = True
            for c in gone:
                self.dead[c] = reason
            self.echo(f"client actor of {console.first(gone)} lost ({reason}); fault.on_client_loss=drop: continuing without {'it' if len(gone) == 1 else 'them'}")
            return reason
        reason = str(_unwrap(err)).splitlines()[0]
        self.notes.say("failed this step", f"client {cid} failed this step: {reason}")
        return reason

    def deadline(self, kind: str = "round") -> float:
        """Seconds one wait on an actor may take. "start": actors starting (`fault.start_timeout_s`);
        "eval": `fault.eval_timeout_s`, if set; otherwise, before any round is timed,
        `fault.first_round_timeout_s`, then max(`fault.min_timeout_s`, `timeout_factor` x the
        slowest round so far, its evaluation and checkpoint included)."""
        fault = self.cfg.fault
        if kind == "start":
            return fault.start_timeout_s
        if kind == "eval" and fault.eval_timeout_s is not None:
            return fault.eval_timeout_s
        if self.slowest_round == 0:
            return fault.first_round_timeout_s
        return max(fault.min_timeout_s, fault.timeout_factor * self.slowest_round)

    def _recover(self, round_: int, lost: ActorLost) -> None:
        """Replace every lost actor (a lost node takes several), put every client and the server
        back to the last usable checkpoint (or the start) and go on from there. A loss during
        the recovery counts as one more and starts it again."""
        dead, replaced = (set() if lost.maybe_alive else {lost.actor_index}), set()  # an unreachable one: probed below
        while True:
            self.restarts += 1
            latest = checkpoints.latest(self.run_dir)
            if self.restarts > self.cfg.fault.max_restarts:
                where = f"--resume {self.run_dir} continues from {latest.name}" if latest else "no checkpoint was complete yet"
                raise RunFailed(f"round {round_}: {lost} - more actor losses than fault.max_restarts={self.cfg.fault.max_restarts}; {where}")
            replaced.update(self._replace_dead_actors(dead))  # every pass's, for the message
            try:
                checkpoint, done = self._rewind(latest)
                break
            except LOST:
                dead = set()  # the next pass finds which
        gone = sorted(spec.id for i in replaced for spec in self.pool.plan[i])
        self.echo(
            f"round {round_}: {lost}; "
            + (f"started new actors for {console.first(gone)} and replaying from " if gone else "every actor answers again (none replaced); replaying from ")
            + (f"checkpoint {checkpoint.name}" if checkpoint else "the start")
            + f" (recovery {self.restarts} of at most {self.cfg.fault.max_restarts})"
        )
        self.next_round = done + 1

    def _replace_dead_actors(self, known: set[int]) -> list[int]:
        """Kill and start again the actors in `known` and every other one that does not answer."""
        dead = set(known) | self._silent([i for i in range(len(self.pool.actors)) if i not in known])
        for i in sorted(dead):
            ray.kill(self.pool.actors[i], no_restart=True)  # a hung one too: its process goes
            self.pool.actors[i] = self._new_actor(i, self.pool.plan[i])
        return sorted(dead)

    def _silent(self, indices: list[int]) -> set[int]:
        """Of the actors `indices`, those that do not answer `describe` within one deadline. All are
        asked at once (n unreachable actors cost one deadline, not n); one Ray reports
        unavailable (transient) is asked again until the deadline."""
        until = time.monotonic() + self.deadline()
        asking = {self.pool.actors[i].describe.remote(): i for i in indices}
        silent: set[int] = set()
        while asking and (left := until - time.monotonic()) > 0:
            ready, _ = ray.wait(list(asking), num_returns=1, timeout=left)
            for ref in ready:
                i = asking.pop(ref)
                try:
                    ray.get(ref)
                except ActorUnavailableError:
                    time.sleep(UNAVAILABLE_PAUSE_S)
                    asking[self.pool.actors[i].describe.remote()] = i
                except LOST:
                    silent.add(i)
        return silent | set(asking.values())

    def _answers(self, actor: Any, kind: str = "round") -> Any:
        """The actor's `describe`, or None if it does not answer within the deadline. Asked again
        while Ray calls it unavailable (transient: a network blip, a node under pressure)."""
        until = time.monotonic() + self.deadline(kind)
        while True:
            try:
                return ray.get(actor.describe.remote(), timeout=max(until - time.monotonic(), 0.1))
            except ActorUnavailableError:
                if time.monotonic() >= until:
                    return None
                time.sleep(UNAVAILABLE_PAUSE_S)
            except LOST:
                return None

    def _rewind(self, latest: Path | None) -> tuple[Path | None, int]:
        """Server, clients and outputs back to the newest usable checkpoint (None: the start)."""
        checkpoint = None
        if latest is not None:
            checkpoint, skipped = checkpoints.usable(self.run_dir)
            for line in skipped:
                self.echo(line)
        done = 0
        if checkpoint is not None:
            self.state, done = checkpoints.load_server(checkpoint)
            self._restore_clients(checkpoint)
        else:
            self.manifest, self.known_files = {}, {}
            ray.get([actor.restore.remote([]) for actor in self.pool.actors], timeout=self.deadline("start"))
            self.state = self.algorithm.setup_state(copy.deepcopy(self.initial_state), self._client_setup())
        self.recorder.truncate(done)
        return checkpoint, done

    def _eval_attributes(self) -> list[str]:
        available = list(self.source.group_names)
        if not available:  # e.g. MedMNIST: no demographics, accuracy metrics only
            return []
        chosen = self.cfg.eval.attributes or available
        unknown = [a for a in chosen if a not in available]
        if unknown:
            raise ConfigError(f"eval.attributes {unknown} not in data source {self.cfg.data.name}; choose from {', '.join(available)}")
        if self.source.attribute not in available:
            raise ConfigError(f"data.attribute {self.source.attribute!r} not in data source {self.cfg.data.name}; choose from {', '.join(available)}")
        return list(chosen)


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
    """Where the server step computes: the driver actor's GPU when `resources.driver_gpus` gave it one."""
    return torch.device("cuda") if driver_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def _client_list(specs: list[ClientSpec]) -> str:
    """`site1 (475 train), ...`; beyond `console.MAX_LISTED` clients their sizes per split as
    min / median / max (and the roles counted), not a name each."""
    if len(specs) <= console.MAX_LISTED:
        return ", ".join(f"{s.id} ({s.num_train} train{', ' + s.role if s.role else ''})" for s in specs)
    splits = list(dict.fromkeys(split for s in specs for split in s.splits))
    sizes = ", ".join(f"{split} {console.spread([len(s.splits[split]) for s in specs if split in s.splits])}" for split in splits)
    roles = Counter(s.role for s in specs if s.role)
    role_note = f"; roles: {', '.join(f'{n} {role}' for role, n in sorted(roles.items()))}" if roles else ""
    return f"samples per client (min / median / max) {sizes}; {sum(s.num_train for s in specs)} train in all{role_note}"


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _unwrap(err: RayTaskError) -> Exception:
    """The user-facing exception a remote call raised (e.g. a DataError naming a file)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, Exception) else err
