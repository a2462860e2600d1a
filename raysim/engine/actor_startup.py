"""Starting the client actors: how many (Ray's resources or a Tune trial's bundles), which
clients each hosts, loading their shards, what they loaded, and each client's setup.

Apart from the driver's round loop (`driver`) because it changes with placement and resources
(`cfg.resources`, `placement`), not with the rounds; recovery (`recovery`) starts a lost
actor again with `new_actor`, on the same plan.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import numpy as np
import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError
from ray.util import get_current_placement_group
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raysim import console, provenance
from raysim.config import ConfigError, ExperimentConfig, ResourcesConfig
from raysim.datasets import DATASETS, ClientSpec
from raysim.engine import placement, warm
from raysim.engine.client_actor import ClientActor
from raysim.engine.failures import RunFailed, answers, unwrap
from raysim.engine.pool import ActorPool
from raysim.engine.run_state import RunState


def start_actors(driver: RunState, specs: list[ClientSpec]) -> None:
    """`driver.pool`: one actor per group of the plan, started (or taken warm from this process's
    `warm.current()` supply) but not yet loaded: their processes start while the driver builds
    the model and the method's context; `load_clients` gives them their clients."""
    res = driver.cfg.resources
    pg = trial_group(driver.placement_group)
    groups = placement.assign(specs, actor_count(res, pg, len(specs)), res.clients_per_actor)
    supply = warm.current() if pg is None else None  # a Tune trial's actors live in its bundles: never pooled
    reused = 0
    if supply is None:
        handles = [empty_actor(driver, i) for i in range(len(groups))]
    else:
        before = supply.reused
        handles = supply.take(warm.ActorKind.of(res), len(groups), lambda: empty_actor(driver, 0))
        reused = supply.reused - before
    driver.pool = ActorPool(handles, groups)
    driver.echo(f"starting {len(handles)} client actors ({res.actor_cpus:g} CPU, {res.num_gpus:g} GPU each; {placement.clients_per_actor_text(groups)} per actor)")
    if reused:
        driver.echo(f"  {reused} of them warm from an earlier run (raysim.engine.warm)")


def load_clients(driver: RunState) -> None:
    """Each actor of `driver.pool` loads its clients (shards, model, method with `driver.context`)
    and says what it loaded; bad input an actor found ends the run here with its one line."""
    specs = [spec for group in driver.pool.plan for spec in group]
    provenance.add(driver.run_dir, "actor_plan", [[spec.id for spec in group] for group in driver.pool.plan])  # here: a resume refused before it changes nothing
    for actor, group in zip(driver.pool.actors, driver.pool.plan, strict=True):
        actor.load.remote(driver.cfg, group, driver.context)
    res = driver.cfg.resources
    machines = []
    described: dict[str, Any] = {}
    loaded = np.cumsum([len(group) for group in driver.pool.plan])  # actors answer in order, each once all its clients are loaded
    console.report("loading client shards", 0, len(specs))
    answered = driver.pool.each_actor("describe", timeout=driver.deadline("start"), on_answer=lambda i: console.report("loading client shards", int(loaded[i]), len(specs)))
    for actor, info in zip(driver.pool.actors, answered, strict=True):
        if isinstance(info, ActorUnavailableError):  # transient: ask again (describe changes nothing)
            info = answers(actor, driver.deadline("start")) or info
        if isinstance(info, dict) and "_error" in info:
            raise info["_error"]  # bad input an actor found (a DataError naming the file): one line
        if isinstance(info, RayTaskError):
            raise unwrap(info) from None
        if isinstance(info, RayActorError):  # died starting (out of memory, a bug): not the driver's loss
            raise RunFailed(f"a client actor died while starting: {info}") from None
        if isinstance(info, GetTimeoutError):
            raise RunFailed(
                f"client actors not started within fault.start_timeout_s={driver.deadline('start'):g} s: Ray may lack what each asks for "
                f"({res.actor_cpus:g} CPU, {res.num_gpus:g} GPU; the cluster has {ray.cluster_resources()}), or loading the shards takes longer (raise fault.start_timeout_s)"
            )
        if isinstance(info, Exception):
            raise info
        machines.append(info["_machine"])
        described.update((k, v) for k, v in info.items() if not k.startswith("_"))
    echo_shards(driver.echo, described)
    # What the clients computed on (distinct machines only): what tells two runs' numbers apart.
    distinct = list({json.dumps(m, sort_keys=True, default=str): m for m in machines}.values())
    provenance.add(driver.run_dir, "actor_machines" if driver.next_round == 1 else f"actor_machines_from_round_{driver.next_round}", distinct)


def empty_actor(driver: RunState, i: int) -> Any:
    """A new client actor for place i of the plan, empty until `load` (in a Tune trial: pinned to
    bundle i + 1; bundle 0 is the driver's)."""
    pg = trial_group(driver.placement_group)
    pinned = {} if pg is None else {"scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i + 1)}
    return launch(driver.cfg.resources, **pinned)


def launch(res: ResourcesConfig, **options: Any) -> Any:
    """A new, empty client actor asking Ray for `res`'s CPUs and GPU share."""
    return ClientActor.options(num_cpus=res.actor_cpus, num_gpus=res.num_gpus, **options).remote()


def planned_count(cfg: ExperimentConfig) -> int:
    """How many client actors `start_actors` will ask for, computed before the driver runs (an
    `Engine` starts them beside a new driver actor): the source's clients, sized as
    `actor_count` sizes them outside a Tune trial. A method that leaves a client out
    (FedHelp's public site) makes this one too many; `warm.ActorSupply.take` stops the surplus."""
    source = DATASETS.get(cfg.data.name)(cfg.data, img_size=cfg.model.img_size, seed=cfg.seed)
    return actor_count(cfg.resources, None, len(source.client_specs()))


def new_actor(driver: RunState, i: int, group: list[ClientSpec]) -> Any:
    """Client actor i of the plan started again (recovery), loaded with its clients."""
    actor = empty_actor(driver, i)
    actor.load.remote(driver.cfg, group, driver.context)
    return actor


def release_actors(driver: RunState) -> None:
    """The end of the run's actors: back to this process's supply (each answers `reset`, or is
    stopped), whether the run finished or failed; stopped when there is none or the run was a
    Tune trial's."""
    pool = driver.pool
    if pool is None:
        return
    supply = warm.current() if trial_group(driver.placement_group) is None else None
    if supply is None:
        pool.kill()
        return
    live = [actor for _, actor in pool.live()]
    pool.actors = []
    supply.give_back(warm.ActorKind.of(driver.cfg.resources), live)


def echo_shards(echo: console.Echo, described: dict[str, Any]) -> None:
    """Samples per split per client after the drop rules; beyond `console.MAX_LISTED`
    clients, per split min / median / max and what was skipped, summed over clients."""
    if len(described) <= console.MAX_LISTED:
        for cid in sorted(described):
            splits = described[cid]
            dropped = sum((Counter(s["dropped"]) for s in splits.values()), Counter())
            note = f"; skipped {dict(dropped)}" if dropped else ""
            echo(f"  {cid}: " + ", ".join(f"{split} {s['n']}" for split, s in splits.items()) + note)
        return
    splits = list(dict.fromkeys(split for info in described.values() for split in info))
    sizes = {split: [info[split]["n"] for info in described.values() if split in info] for split in splits}
    echo(f"  {len(described)} clients loaded; samples per client (min / median / max): " + ", ".join(f"{split} {console.spread(n)}" for split, n in sizes.items()))
    dropped = {cid: sum((Counter(s["dropped"]) for s in info.values()), Counter()) for cid, info in described.items()}
    total = sum(dropped.values(), Counter())
    if total:
        echo(f"  skipped {dict(total)} in {sum(1 for d in dropped.values() if d)} clients")


def client_setup(driver: RunState) -> dict[str, Any]:
    """Every client's `Algorithm.client_setup`, by client id; a failure ends the run before training.
    One call per actor for all its clients: a call per client cost 10,000 clients 10,000 Ray
    round trips before round 1, mostly to return FedAvg's nothing."""
    out: dict[str, Any] = {}
    groups = [(i, [spec.id for spec in group if spec.id in driver.specs]) for i, group in enumerate(driver.pool.plan)]
    asked = [(ids, driver.pool.actors[i].setup_clients.remote(ids)) for i, ids in groups if ids]
    done = 0
    console.report("client setup", 0, len(driver.specs))
    for ids, ref in asked:
        try:
            out.update(ray.get(ref, timeout=driver.deadline("start")))
        except RayTaskError as err:
            raise unwrap(err) from None
        done += len(ids)
        console.report("client setup", done, len(driver.specs))
    return {cid: out[cid] for cid in sorted(out)}


def trial_group(given: PlacementGroup | None) -> PlacementGroup | None:
    """The placement group the actors go in: the one given (a Tune trial's), else the one this process runs in."""
    return given or get_current_placement_group()


def actor_count(res: ResourcesConfig, pg: PlacementGroup | None, n_clients: int) -> int:
    """The pool's size: from Ray's resources, or, in a Tune trial, the client bundles it reserved."""
    if pg is None:
        capacity = placement.Capacity.of(ray.cluster_resources())  # a cluster's: what it has now
        n = placement.actor_count(n_clients, res, capacity)
        if not os.environ.get("RAY_ADDRESS"):  # a cluster may autoscale: Ray queues what does not fit yet
            placement.check_fits(n, res, capacity)
        return n
    # A Tune trial: raysim.engine.tune sized its group with placement.actor_count; bundle 0 is the driver's.
    reserved = len(pg.bundle_specs) - 1
    n = min(reserved, n_clients) if placement.is_auto(res) else placement.actor_count(n_clients, res, None)
    if n > reserved:
        raise ConfigError(f"the placement group has {len(pg.bundle_specs)} bundles; {n} client actors need {n + 1} (the driver's + one each)")
    return n


def client_list(specs: list[ClientSpec]) -> str:
    """`site1 (475 train), ...`; beyond `console.MAX_LISTED` clients their sizes per split as
    min / median / max (and the roles counted), not a name each."""
    if len(specs) <= console.MAX_LISTED:
        return ", ".join(f"{s.id} ({s.num_train} train{', ' + s.role if s.role else ''})" for s in specs)
    splits = list(dict.fromkeys(split for s in specs for split in s.splits))
    sizes = ", ".join(f"{split} {console.spread([len(s.splits[split]) for s in specs if split in s.splits])}" for split in splits)
    roles = Counter(s.role for s in specs if s.role)
    role_note = f"; roles: {', '.join(f'{n} {role}' for role, n in sorted(roles.items()))}" if roles else ""
    return f"samples per client (min / median / max) {sizes}; {sum(s.num_train for s in specs)} train in all{role_note}"
