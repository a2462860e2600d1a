"""The driver: starts client actors, runs the rounds, aggregates, evaluates, checkpoints.

The round loop exists here once. Every sampled client is waited for, updates are aggregated
in sorted client-id order, and every random choice is seeded from (seed, round, client), so a
run is a function of its config: the number of actors and their scheduling change nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import torch
from ray.exceptions import RayActorError, RayTaskError
from ray.util import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raysim import provenance, reporting
from raysim.algorithms import ALGORITHMS, ServerState
from raysim.algorithms.aggregation import non_finite
from raysim.config import ConfigError, ExperimentConfig
from raysim.datasets import DATASETS, ClientSpec
from raysim.determinism import deterministic_torch
from raysim.engine import placement
from raysim.engine.client_actor import ClientActor
from raysim.metrics import UndefinedMetricWarning
from raysim.pretrain import resolve_weights
from raysim.seeding import derive_seed, rng
from raysim.types import Predictions, Update, nbytes

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"


def connect_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (e.g. under `ray job submit`), else start a local one."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # connect; resources are the cluster's, never ours to declare
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, configure_logging=False)


@dataclass
class RoundOutcome:
    updates: list[Update]
    failed: dict[str, str] = field(default_factory=dict)  # client id -> reason


class Driver:
    def __init__(self, cfg: ExperimentConfig, run_dir: Path, echo: reporting.Echo = print) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.echo = echo
        self.source = DATASETS.get(cfg.data.name)(cfg.data, img_size=cfg.model.img_size, seed=cfg.seed)
        self.algorithm = ALGORITHMS.get(cfg.algorithm["name"])(cfg.algorithm_params(), cfg)
        self.attributes = self._eval_attributes()
        self.recorder = reporting.RunRecorder(self.run_dir)
        self.actors: dict[str, Any] = {}  # client id -> actor handle
        self.traffic_down = self.traffic_up = 0  # bytes sent in this process's rounds
        self.dead: dict[str, str] = {}  # client id -> why it is out of the run

    # --- the run ------------------------------------------------------------------------------

    def run(self, *, resume: bool = False, until: int | None = None) -> pd.DataFrame:
        """All rounds (or up to round `until`); returns the metrics frame."""
        try:
            self.start(resume=resume)
            last = min(until or self.cfg.federation.rounds, self.cfg.federation.rounds)
            for round_ in range(self.next_round, last + 1):
                self.step(round_)
            self.echo(f"communication: {_megabytes(self.traffic_down)} down, {_megabytes(self.traffic_up)} up over rounds {self.progress.first}-{last}")
        finally:
            self.shutdown()
        return self.recorder.metrics

    def shutdown(self) -> None:
        """Stop this run's actors (each holds a process and its shards) and close the outputs."""
        for actor in {id(a): a for a in self.actors.values()}.values():
            ray.kill(actor)
        self.actors.clear()
        self.recorder.close()

    def start(self, *, resume: bool = False) -> None:
        """Read the metadata, build the initial (or checkpointed) state and start the actors."""
        # The server step and the metrics compute here: fixed threads, deterministic kernels.
        deterministic_torch(self.cfg.resources.threads_per_client)
        self.cfg = resolve_weights(self.cfg, self.echo)  # adapter methods need a pretrained backbone
        self.algorithm = ALGORITHMS.get(self.cfg.algorithm["name"])(self.cfg.algorithm_params(), self.cfg)
        specs = self.algorithm.arrange_clients(self.source.client_specs())
        self.specs = {s.id: s for s in specs}
        if not resume:
            resources = {"per_actor": dataclasses.asdict(self.cfg.resources), "ray_cluster": ray.cluster_resources()}
            provenance.write(self.run_dir, data=self.source.fingerprint(), resources=resources, argv=sys.argv)
        self.echo(f"data: {self.cfg.data.name} with {len(specs)} clients: " + ", ".join(f"{s.id} ({s.num_train} train{', ' + s.role if s.role else ''})" for s in specs))
        self.context = self.algorithm.prepare_run(self.source, specs, self.run_dir, self.echo)
        model = self.algorithm.build_model(self.source)
        self.state = self.algorithm.init_state(model)
        self.next_round = 1
        checkpoint = latest_checkpoint(self.run_dir) if resume else None
        if checkpoint is not None:
            self.state, done = self._load_server(checkpoint)
            self.next_round = done + 1
            self.recorder.load_existing()
            self.recorder.truncate(done)
        self._start_actors(specs)
        if checkpoint is not None:
            self._restore_clients(checkpoint)
            self.echo(f"resumed from {checkpoint} (round {done} done)")
        else:  # what each client shares before round 1 (a resumed state holds it already)
            self.state = self.algorithm.setup_state(self.state, self._client_setup())
        self.progress = reporting.Progress(self.cfg.federation.rounds, self.next_round, self.echo)

    def step(self, round_: int) -> None:
        """One round: train and aggregate, then evaluate and checkpoint when due."""
        rounds = self.cfg.federation.rounds
        self.state = self.run_round(round_, self.state, self.progress)
        if round_ % self.cfg.eval.every == 0 or round_ == rounds:
            self.evaluate(round_, self.state, splits=["val", "test"], show="test" if round_ == rounds else "val")
        if round_ % self.cfg.checkpoint.every == 0 or round_ == rounds:
            self.checkpoint(round_, self.state)
        self.next_round = round_ + 1

    def run_round(self, round_: int, state: ServerState, progress: reporting.Progress) -> ServerState:
        sampled = self.sample_clients(round_)
        payload = self.algorithm.payload(state, round_)
        payload_ref = ray.put(payload)
        refs = {cid: self.actors[cid].fit.remote(cid, payload_ref, round_) for cid in sampled}
        outcome = self._collect(refs)
        self._record_traffic(round_, nbytes(payload), outcome)
        if outcome.updates:
            state = self.algorithm.aggregate(round_, outcome.updates, state)
        else:
            self.echo(f"round {round_}: no client update arrived; the global state is unchanged")
        losses = [u.metrics.get("loss", math.nan) for u in outcome.updates]
        weights = [u.num_examples for u in outcome.updates]
        train_loss = float(np.average(losses, weights=weights)) if losses else math.nan
        progress.round_done(round_, clients=len(outcome.updates), failed=sorted(outcome.failed), train_loss=train_loss)
        return state

    def _record_traffic(self, round_: int, down: int, outcome: RoundOutcome) -> None:
        """bytes_down / bytes_up per client that took part (split `train`), and their mean."""
        rows = [(u.client_id, "bytes_down", float(down)) for u in outcome.updates]
        rows += [(u.client_id, "bytes_up", float(u.nbytes)) for u in outcome.updates]
        if not rows:
            return
        frame = pd.DataFrame(rows, columns=["client", "metric", "value"])
        roles = {cid: spec.role for cid, spec in self.specs.items()}
        frame = frame.assign(round=round_, split="train", role=frame["client"].map(roles), attribute="", group="")
        self.recorder.add(reporting.with_means(frame[reporting.METRIC_COLUMNS]), [])
        self.traffic_down += down * len(outcome.updates)
        self.traffic_up += sum(u.nbytes for u in outcome.updates)

    def sample_clients(self, round_: int) -> list[str]:
        """Seeded by (seed, round) over all clients, so every method sees the same selections."""
        everyone = sorted(self.specs)
        k = self.cfg.federation.clients_per_round or len(everyone)
        chosen = rng(self.cfg.seed, "sample", round_).choice(len(everyone), size=min(k, len(everyone)), replace=False)
        return [everyone[i] for i in sorted(chosen) if everyone[i] not in self.dead]

    def evaluate(self, round_: int, state: ServerState, *, splits: list[str], show: str) -> None:
        payload_ref = ray.put(self.algorithm.payload(state, round_))
        alive = [cid for cid in sorted(self.specs) if cid not in self.dead]
        refs = {cid: self.actors[cid].evaluate.remote(cid, payload_ref, splits) for cid in alive}
        predictions: list[Predictions] = []
        for cid, ref in refs.items():
            try:
                predictions.extend(ray.get(ref))
            except (RayActorError, RayTaskError) as err:
                self._mark_failed(cid, err)
        if not predictions:
            raise RuntimeError(f"round {round_}: no client could be evaluated ({self.dead})")
        group_names = self.source.group_names
        with warnings.catch_warnings(record=True) as undefined:
            warnings.simplefilter("always", UndefinedMetricWarning)
            frames = [
                reporting.metric_rows(round_, p, group_names, self.attributes, n_boot=self.cfg.eval.bootstrap, seed=derive_seed(self.cfg.seed, "boot", round_, p.client_id, p.split))
                for p in predictions
            ]
        if undefined:
            # Small groups make undefined values routine: one line, not one warning each.
            log.warning("round %d: %d metric values undefined (NaN), e.g. %s", round_, len(undefined), undefined[0].message)
        metric_frame = reporting.with_means(pd.concat(frames, ignore_index=True))
        self.recorder.add(metric_frame, [reporting.prediction_rows(round_, p, self.attributes) for p in predictions])
        attribute = self.source.attribute if self.source.attribute in self.attributes else next(iter(self.attributes), "")
        self.echo(reporting.format_table(metric_frame, round_=round_, split=show, attribute=attribute, group_names=group_names.get(attribute, {})))

    # --- checkpoints --------------------------------------------------------------------------

    def checkpoint(self, round_: int, state: ServerState) -> None:
        """Server state by the driver, each client's own state by its actor; COMPLETE last."""
        folder = self.run_dir / CHECKPOINTS / f"round_{round_:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"round": round_, "state": state}, folder / "server.pt")
        refs = {cid: self.actors[cid].save.remote(cid, str(folder / "clients" / f"{cid}.pt")) for cid in sorted(self.specs) if cid not in self.dead}
        for cid, ref in refs.items():
            try:
                ray.get(ref)
            except (RayActorError, RayTaskError) as err:
                self._mark_failed(cid, err)
        (folder / COMPLETE).write_text(f"{round_}\n")
        for older in (self.run_dir / CHECKPOINTS).glob("round_*"):
            if older != folder:
                shutil.rmtree(older, ignore_errors=True)

    def _load_server(self, folder: Path) -> tuple[ServerState, int]:
        saved = torch.load(folder / "server.pt", map_location="cpu", weights_only=False)
        return saved["state"], int(saved["round"])

    def _restore_clients(self, folder: Path) -> None:
        refs = []
        for cid in sorted(self.specs):
            path = folder / "clients" / f"{cid}.pt"
            if path.exists():
                refs.append(self.actors[cid].restore.remote(cid, str(path)))
            else:  # its actor had died before this checkpoint: it stays out, as it was
                self.dead[cid] = "no state in the checkpoint (its actor had died)"
                self.echo(f"client {cid}: {self.dead[cid]}; continuing without it")
        ray.get(refs)

    # --- actors -------------------------------------------------------------------------------

    def _start_actors(self, specs: list[ClientSpec]) -> None:
        res = self.cfg.resources
        groups = placement.assign(specs, self._actor_count(len(specs)), res.clients_per_actor)
        pg = get_current_placement_group()  # set inside a Tune trial: bundle 0 is the driver's
        handles, machines = [], []
        for i, group in enumerate(groups):
            pinned = {} if pg is None else {"scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i + 1)}
            actor = ClientActor.options(num_cpus=res.actor_cpus, num_gpus=res.num_gpus, **pinned).remote(self.cfg, group, self.context)
            handles.append(actor)
            self.actors.update({spec.id: actor for spec in group})
        provenance.add(self.run_dir, "actor_plan", [[spec.id for spec in group] for group in groups])
        self.echo(f"starting {len(handles)} client actors ({res.actor_cpus:g} CPU, {res.num_gpus:g} GPU each; {placement.clients_per_actor_text(groups)} per actor)")
        for actor in handles:
            try:
                info = ray.get(actor.describe.remote())
            except RayTaskError as err:
                raise _unwrap(err) from None
            machines.append(info["_machine"])
            for cid, splits in ((k, v) for k, v in info.items() if not k.startswith("_")):
                dropped = sum((Counter(s["dropped"]) for s in splits.values()), Counter())
                note = f"; skipped {dict(dropped)}" if dropped else ""
                self.echo(f"  {cid}: " + ", ".join(f"{split} {s['n']}" for split, s in splits.items()) + note)
        # What the clients computed on (distinct machines only): what tells two runs' numbers apart.
        distinct = list({json.dumps(m, sort_keys=True, default=str): m for m in machines}.values())
        provenance.add(self.run_dir, "actor_machines" if self.next_round == 1 else f"actor_machines_from_round_{self.next_round}", distinct)

    def _client_setup(self) -> dict[str, Any]:
        """Every client's `Algorithm.client_setup`, by client id; a failure ends the run before training."""
        refs = {cid: self.actors[cid].setup.remote(cid) for cid in sorted(self.specs)}
        try:
            return {cid: ray.get(ref) for cid, ref in refs.items()}
        except RayTaskError as err:
            raise _unwrap(err) from None

    def _actor_count(self, n_clients: int) -> int:
        """The pool's size: from Ray's resources, or, in a Tune trial, the client bundles it reserved."""
        res = self.cfg.resources
        pg = get_current_placement_group()
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

    def _collect(self, refs: dict[str, Any]) -> RoundOutcome:
        outcome = RoundOutcome(updates=[])
        for cid in sorted(refs):
            try:
                update: Update = ray.get(refs[cid])
            except (RayActorError, RayTaskError) as err:
                outcome.failed[cid] = self._mark_failed(cid, err)
                continue
            bad = non_finite(update.tensors)
            if bad:
                outcome.failed[cid] = f"non-finite values in {', '.join(bad[:3])}"
                self.echo(f"client {cid}: update rejected ({outcome.failed[cid]})")
                continue
            outcome.updates.append(update)
        return outcome

    def _mark_failed(self, cid: str, err: Exception) -> str:
        if isinstance(err, RayActorError):
            # The actor is gone, and with it every client it hosted.
            gone = [c for c, a in self.actors.items() if a is self.actors[cid]]
            for c in gone:
                self.dead[c] = "actor died"
            self.echo(f"client actor of {', '.join(gone)} died; continuing with the other clients")
            return "actor died"
        reason = str(_unwrap(err)).splitlines()[0]
        self.echo(f"client {cid} failed this step: {reason}")
        return reason

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


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def latest_checkpoint(run_dir: Path) -> Path | None:
    complete = sorted(p.parent for p in (Path(run_dir) / CHECKPOINTS).glob(f"round_*/{COMPLETE}"))
    return complete[-1] if complete else None


def _unwrap(err: RayTaskError) -> Exception:
    """The user-facing exception a remote call raised (e.g. a DataError naming a file)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, Exception) else err
