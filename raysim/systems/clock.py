"""The virtual clock: a client's simulated round time, synchronous rounds with deadlines and
over-selection (`SyncClock`), and buffered asynchronous arrivals (`AsyncClock`).

A client's time = its local steps × `system.step_seconds` ÷ its speed + the payload's bytes ÷
its download bandwidth + its update's bytes ÷ its upload bandwidth. Steps and bytes are known
before training (the steps from its training patients, `federation.batch_size` and
`local_epochs`; the bytes from what the method sends), so the clock knows who finishes when
before anyone trains: a client whose update would be dropped is never trained. Equal finish
times are broken by client id. The clock's state between rounds is a small dict the driver
keeps in the server state (`state["system"]`), checkpointed with it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from raysim.config import ConfigError, ExperimentConfig
from raysim.datasets import ClientSpec
from raysim.seeding import rng
from raysim.systems.availability import MODELS, Availability
from raysim.systems.profiles import Profile, build_profiles

LATE, OFFLINE, SURPLUS = "late", "offline", "over-selected"
MAX_IDLE_WAITS = 10_000  # an asynchronous step that finds nobody online this many times ends empty


def local_steps(num_train: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of one round, as `Client.batches` makes them: a last batch of one sample
    is skipped (BatchNorm), unless it is the whole split."""
    full, rest = divmod(num_train, batch_size)
    per_epoch = full + (1 if rest > 1 or (rest == 1 and num_train == 1) else 0)
    return per_epoch * epochs


@dataclass
class RoundPlan:
    """One synchronous round in simulated time (seconds from the run's start)."""

    start: float
    end: float
    available: list[str]  # online when the round started (the pool sampling drew from)
    trained: list[str]  # the clients that train and whose updates arrive in time
    dropped: dict[str, str] = field(default_factory=dict)  # client -> late / offline / over-selected
    finish: dict[str, float] = field(default_factory=dict)  # client -> simulated finish time


@dataclass
class Arrival:
    """An update reaching the server in an asynchronous run."""

    client_id: str
    base_version: int  # the model version it trained on (its training round is base_version + 1)
    start: float
    finish: float
    staleness: int  # server steps taken between its download and its arrival


class SimulatedClock:
    """Profiles and availability of the run's participants; durations in simulated seconds."""

    def __init__(self, cfg: ExperimentConfig, specs: Sequence[ClientSpec], group_names: Mapping[str, Mapping[int, str]]) -> None:
        self.system = cfg.system
        self.seed = cfg.seed
        self.profiles: dict[str, Profile] = build_profiles(cfg.system, specs, group_names, cfg.seed)
        self.availability: Availability = MODELS[cfg.system.availability](cfg.system, self.profiles, cfg.seed)
        fed = cfg.federation
        self.steps = {s.id: local_steps(s.num_train, fed.batch_size, fed.local_epochs) for s in specs}
        # attribute -> client -> group code -> training patients (participation rates, every round)
        self.group_counts: dict[str, dict[str, dict[int, int]]] = {}
        for s in specs:
            for attribute in s.splits["train"].attributes:
                self.group_counts.setdefault(attribute, {})[s.id] = s.splits["train"].group_counts(attribute)

    def duration(self, cid: str, down_bytes: int, up_bytes: int) -> float:
        """Simulated seconds from the payload's download to the update's upload."""
        p = self.profiles[cid]
        return self.steps[cid] * self.system.step_seconds / p.speed + down_bytes * 8 / (p.down_mbps * 1e6) + up_bytes * 8 / (p.up_mbps * 1e6)

    def available(self, round_: int, time_s: float, ids: Sequence[str]) -> list[str]:
        return [cid for cid in sorted(ids) if self.availability.online(round_, time_s, cid)]

    def target(self, k: int) -> int:
        """How many to sample for a cohort of `k` (over-selection: that many more, rounded up)."""
        return math.ceil(k * (1 + self.system.over_select) - 1e-9)


class SyncClock(SimulatedClock):
    def plan(self, start: float, available: list[str], sampled: Sequence[str], k: int, down_bytes: int, up_bytes: int) -> RoundPlan:
        """Who of `sampled` trains: those that finish by the deadline and before going offline,
        the first `k` of them by (finish, id). The round ends when the last kept update arrives,
        or at the deadline when one was late or lost; an empty round lasts the deadline or
        `system.empty_round_s`."""
        deadline = self.system.round_deadline_s
        finish = {cid: start + self.duration(cid, down_bytes, up_bytes) for cid in sampled}
        dropped: dict[str, str] = {}
        waited = []  # times the server waited until for dropped clients
        for cid in sorted(sampled):
            offline_at = self.availability.online_until(start, cid)
            if finish[cid] > offline_at:
                dropped[cid] = OFFLINE
                waited.append(offline_at if deadline is None else min(offline_at, start + deadline))
            elif deadline is not None and finish[cid] > start + deadline:
                dropped[cid] = LATE
                waited.append(start + deadline)
        in_time = sorted((finish[c], c) for c in sampled if c not in dropped)
        trained = sorted(c for _, c in in_time[:k])
        dropped.update({c: SURPLUS for _, c in in_time[k:]})
        if trained or waited:
            end = max([finish[c] for c in trained] + waited)
        else:
            end = start + (deadline if deadline is not None else self.system.empty_round_s)
        return RoundPlan(start, end, list(available), trained, dropped, finish)


class AsyncClock(SimulatedClock):
    """Buffered asynchronous rounds: `concurrency` clients train at once, each on the model
    version it downloaded; a round (one server step) ends when `buffer_size` updates have
    arrived. `refill`: `arrival` starts a new client in a slot as soon as its update arrives
    (FedBuff's loop; the new client gets the current, not yet stepped, model), `step` only when
    the server has stepped (with buffer_size = concurrency every update is fresh: FedAvg).
    New clients are drawn, without replacement, from those online and not training; the first
    draw of a round uses the synchronous methods' stream (seed, round), later ones (seed,
    round, draw)."""

    def __init__(self, cfg: ExperimentConfig, specs: Sequence[ClientSpec], group_names: Mapping[str, Mapping[int, str]], *, buffer_size: int, concurrency: int, refill: str) -> None:
        super().__init__(cfg, specs, group_names)
        self.buffer_size, self.concurrency, self.refill = buffer_size, concurrency, refill

    def step(self, round_: int, state: Mapping[str, Any], ids: Sequence[str], down_bytes: int, up_bytes: int, version: int | None = None) -> tuple[list[Arrival], list[Arrival], dict[str, Any]]:
        """(the round's arrivals in arrival order, updates lost to a client going offline, the
        clock's next state). `state`: {"time", "in_flight": [[finish, client, base_version, start]]};
        `version`: the server's model version now (default round_ − 1: a step every round; a round
        that folded nothing leaves it behind)."""
        time_s = float(state.get("time", 0.0))
        flying = [tuple(f) for f in state.get("in_flight", [])]
        version, draws = (round_ - 1 if version is None else version), 0
        arrived: list[Arrival] = []
        lost: list[Arrival] = []

        def fill(now: float) -> None:
            nonlocal draws
            free = self.concurrency - len(flying)
            busy = {f[1] for f in flying}
            pool = [c for c in self.available(round_, now, ids) if c not in busy]
            if free <= 0 or not pool:
                return
            picked = _draw(self.seed, round_, draws, pool, min(free, len(pool)))
            draws += 1
            flying.extend((now + self.duration(c, down_bytes, up_bytes), c, version, now) for c in picked)

        fill(time_s)
        idle = 0
        while len(arrived) < self.buffer_size:
            if not flying:
                if idle >= MAX_IDLE_WAITS:
                    break
                idle += 1
                time_s += self.system.empty_round_s
                fill(time_s)
                continue
            flying.sort()
            finish, cid, base, start = flying.pop(0)
            time_s = finish
            record = Arrival(cid, int(base), float(start), float(finish), version - int(base))
            (lost if finish > self.availability.online_until(start, cid) else arrived).append(record)
            if self.refill == "arrival" and len(arrived) < self.buffer_size:  # a full buffer steps first: the next round's fill sends the new model
                fill(time_s)
        return arrived, lost, {"time": time_s, "in_flight": [list(f) for f in sorted(flying)]}


def _draw(seed: int, round_: int, draw: int, pool: list[str], n: int) -> list[str]:
    generator = rng(seed, "sample", round_) if draw == 0 else rng(seed, "sample", round_, draw)
    return [pool[i] for i in sorted(generator.choice(len(pool), size=n, replace=False))]


def simulated_clock(cfg: ExperimentConfig, specs: Sequence[ClientSpec], group_names: Mapping[str, Mapping[int, str]], algorithm: Any) -> SimulatedClock | None:
    """The run's clock: None without `system.simulate`; an `AsyncClock` for a buffered method
    (its `buffer_size`, `refill`, and `system.concurrency`), else a `SyncClock`."""
    if not cfg.system.simulate:
        return None
    if not getattr(algorithm, "asynchronous", False):
        return SyncClock(cfg, specs, group_names)
    k = cfg.federation.clients_per_round or len(specs)
    concurrency = min(cfg.system.concurrency or k, len(specs))
    buffer_size, refill = algorithm.buffer_for(concurrency), algorithm.params.refill
    if refill == "step" and buffer_size > concurrency:
        raise ConfigError(
            f"algorithm.buffer_size={buffer_size} exceeds the {concurrency} clients training at once (system.concurrency, else federation.clients_per_round, at most the clients): "
            "with refill=step the buffer would never fill; lower buffer_size or use refill=arrival"
        )
    return AsyncClock(cfg, specs, group_names, buffer_size=buffer_size, concurrency=concurrency, refill=refill)
