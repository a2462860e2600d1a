"""The client actor pool's plan: how many actors a run starts and which clients each hosts.

Plain Python, no Ray: both functions see only the config, the client specs and a
`Capacity`, so the driver and `raysim.engine.tune` (which sizes a trial's placement group with the
same `actor_count`) agree, and every machine computes the same plan.

- `actor_count`: an integer `resources.actors` (at most one actor per client), else
  ceil(clients / `resources.clients_per_actor`) when that is set, else `auto` =
  min(clients, floor((CPUs - driver_cpus) / num_cpus), floor(GPUs / num_gpus) when
  num_gpus > 0). Auto never oversubscribes: `num_cpus` defaults to `threads_per_client`.
- `assign`: a greedy plan on training size (longest processing time first). Clients are
  taken in the order (-num_train, id), each onto the actor with the least training rows so
  far (ties: the lowest actor index); with `max_per_actor` (from `clients_per_actor`), full
  actors are skipped.

The plan decides only where clients run, never what they compute: each client trains with
its own fixed torch threads and the driver aggregates in sorted client order, so any plan
gives bit-identical metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from raysim.config import ConfigError, ResourcesConfig

EPSILON = 1e-9  # float slack: 3 x 0.3 CPUs fit in 0.9


class Sized(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def num_train(self) -> int: ...


S = TypeVar("S", bound=Sized)


@dataclass(frozen=True)
class Capacity:
    """The CPUs and GPUs a run's driver and client actors may use."""

    cpus: float
    gpus: float = 0.0

    @classmethod
    def of(cls, resources: Mapping[str, float]) -> Capacity:
        """From `ray.cluster_resources()`."""
        return cls(float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0)))


def is_auto(res: ResourcesConfig) -> bool:
    """Whether the pool is sized from the resources (neither `actors` nor `clients_per_actor` set)."""
    return res.actors == "auto" and res.clients_per_actor is None


def actor_count(n_clients: int, res: ResourcesConfig, capacity: Capacity | None) -> int:
    """How many client actors to start; `capacity` is needed only when `is_auto(res)`.

    Raises ConfigError, naming the keys, when auto cannot fit even one actor.
    """
    if n_clients < 1:
        raise ValueError(f"a run needs at least one client, got {n_clients}")
    if res.clients_per_actor is not None:
        return math.ceil(n_clients / res.clients_per_actor)
    if res.actors != "auto":
        return min(int(res.actors), n_clients)
    if capacity is None:
        raise ValueError("resources.actors=auto needs the capacity to size the pool from")
    fits = [n_clients, _how_many(capacity.cpus - res.driver_cpus, res.actor_cpus)]
    if res.num_gpus > 0:
        fits.append(_how_many(capacity.gpus - res.driver_gpus, res.num_gpus))
    if min(fits) < 1:
        raise ConfigError(f"resources.actors=auto: not even one client actor fits in {_describe(capacity)}: {_needs(res)}. {_REMEDY}")
    return min(fits)


def check_fits(n_actors: int, res: ResourcesConfig, capacity: Capacity) -> None:
    """ConfigError unless `n_actors` actors (and the driver's CPUs) fit in `capacity`."""
    cpus = n_actors * res.actor_cpus + res.driver_cpus
    gpus = n_actors * res.num_gpus + res.driver_gpus
    if cpus > capacity.cpus + EPSILON or gpus > capacity.gpus + EPSILON:
        raise ConfigError(
            f"{n_actors} client actors need {cpus:g} CPUs and {gpus:g} GPUs, but there are {_describe(capacity)}: {_needs(res)}. "
            "Set resources.actors=auto, lower resources.actors (or raise resources.clients_per_actor), "
            "or lower resources.num_cpus / resources.num_gpus (fractions are fine)."
        )


def assign(specs: Sequence[S], n_actors: int, max_per_actor: int | None = None) -> list[list[S]]:
    """The clients of each actor, by the greedy plan; actors left without a client are dropped.

    Deterministic: a function of the clients' ids and training sizes only (not their order).
    """
    if n_actors < 1:
        raise ValueError(f"n_actors must be >= 1, got {n_actors}")
    if max_per_actor is not None and max_per_actor * n_actors < len(specs):
        raise ValueError(f"{n_actors} actors x {max_per_actor} clients cannot host {len(specs)} clients")
    groups: list[list[S]] = [[] for _ in range(n_actors)]
    rows = [0] * n_actors
    for spec in sorted(specs, key=lambda s: (-s.num_train, s.id)):
        open_ = [i for i in range(n_actors) if max_per_actor is None or len(groups[i]) < max_per_actor]
        target = min(open_, key=lambda i: (rows[i], i))
        groups[target].append(spec)
        rows[target] += spec.num_train
    return [group for group in groups if group]


def clients_per_actor_text(groups: Sequence[Sequence[object]]) -> str:
    """`1 client`, `3 clients` or `2–3 clients` per actor, for the console."""
    sizes = sorted(len(g) for g in groups)
    low, high = sizes[0], sizes[-1]
    return f"{low} client{'s' if low != 1 else ''}" if low == high else f"{low}–{high} clients"


def _how_many(available: float, each: float) -> int:
    return max(0, math.floor(available / each + EPSILON))


def _describe(capacity: Capacity) -> str:
    return f"{capacity.cpus:g} CPUs and {capacity.gpus:g} GPUs"


def _needs(res: ResourcesConfig) -> str:
    cpus = f"resources.num_cpus={res.actor_cpus:g}" + (" (its default, resources.threads_per_client)" if res.num_cpus is None else "")
    return f"each actor asks for {cpus} and resources.num_gpus={res.num_gpus:g}, and resources.driver_cpus={res.driver_cpus:g} / driver_gpus={res.driver_gpus:g} go to the driver actor"


_REMEDY = "Lower resources.num_cpus / resources.num_gpus (fractions are fine) or resources.driver_cpus; on an autoscaling cluster set resources.actors to an integer."
