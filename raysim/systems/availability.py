"""Availability models (`system.availability`): which clients are online when a round starts,
and until when. Every draw is seeded by (seed, round or client) alone, so availability never
depends on what trained, on the actors or on the other clients."""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence

from raysim.config import ConfigError, SystemConfig
from raysim.seeding import rng
from raysim.systems.profiles import Profile, _known_clients, _read_csv


class Availability:
    """Always online (`always`); the base of the others."""

    def __init__(self, system: SystemConfig, profiles: Mapping[str, Profile], seed: int) -> None:
        self.system, self.profiles, self.seed = system, profiles, seed

    def online(self, round_: int, time_s: float, cid: str) -> bool:
        """Whether `cid` can be sampled by the round `round_` starting at simulated `time_s`."""
        return True

    def online_until(self, time_s: float, cid: str) -> float:
        """When the online spell holding `time_s` ends (a client still training then loses its
        update); rounds-based models decide per round: never within one."""
        return math.inf


class Bernoulli(Availability):
    """Offline in each round with its p_offline, independently."""

    def online(self, round_: int, time_s: float, cid: str) -> bool:
        return bool(rng(self.seed, "availability", round_, cid).random() >= self.profiles[cid].p_offline)


class Markov(Availability):
    """A two-state chain per client, one step per round: offline a share p_offline of rounds in
    the long run, in spells of `mean_offline_rounds` on average (recovery 1 / that per round,
    failure r·π/(1 − π)); round 1 drawn from the stationary share. The state of round r is
    computed from rounds 1..r's seeded draws (cached), so a resumed run gets the same states."""

    def __init__(self, system: SystemConfig, profiles: Mapping[str, Profile], seed: int) -> None:
        super().__init__(system, profiles, seed)
        self.states: dict[str, list[bool]] = {}  # client -> offline in rounds 1..n

    def online(self, round_: int, time_s: float, cid: str) -> bool:
        states = self.states.setdefault(cid, [])
        pi = self.profiles[cid].p_offline
        recover = 1.0 / self.system.mean_offline_rounds
        fail = min(1.0, recover * pi / (1.0 - pi)) if pi < 1 else 1.0
        while len(states) < round_:
            u = rng(self.seed, "availability", len(states) + 1, cid).random()
            if not states:
                states.append(bool(u < pi))
            else:
                states.append(bool(u < fail) if not states[-1] else not bool(u < recover))
        return not states[round_ - 1]


class Window(Availability):
    """Offline for the share p_offline of every `period_s` of simulated time (a maintenance or
    night window), each client's phase seeded by (seed, client)."""

    def _position(self, time_s: float, cid: str) -> float:
        period = self.system.period_s
        phase = rng(self.seed, "availability", "phase", cid).random() * period
        return (time_s + phase) % period

    def online(self, round_: int, time_s: float, cid: str) -> bool:
        return self._position(time_s, cid) >= self.profiles[cid].p_offline * self.system.period_s

    def online_until(self, time_s: float, cid: str) -> float:
        return time_s + self.system.period_s - self._position(time_s, cid)


class Trace(Availability):
    """Online intervals from `system.availability_trace` (client, start, end in simulated
    seconds, end exclusive); every client must appear in it."""

    def __init__(self, system: SystemConfig, profiles: Mapping[str, Profile], seed: int) -> None:
        super().__init__(system, profiles, seed)
        self.spells = read_trace(str(system.availability_trace), sorted(profiles))

    def _spell(self, time_s: float, cid: str) -> tuple[float, float] | None:
        starts, ends = self.spells[cid]
        i = bisect.bisect_right(starts, time_s) - 1
        return (starts[i], ends[i]) if i >= 0 and time_s < ends[i] else None

    def online(self, round_: int, time_s: float, cid: str) -> bool:
        return self._spell(time_s, cid) is not None

    def online_until(self, time_s: float, cid: str) -> float:
        spell = self._spell(time_s, cid)
        return spell[1] if spell else time_s


def read_trace(path: str, ids: Sequence[str]) -> dict[str, tuple[list[float], list[float]]]:
    """client -> (starts, ends) of its online intervals, sorted and merged where they overlap."""
    frame = _read_csv("system.availability_trace", path, required=("client", "start", "end"))
    frame["client"] = frame["client"].astype(str)
    _known_clients("system.availability_trace", path, frame["client"], ids)
    missing = sorted(set(ids) - set(frame["client"]))
    if missing:
        raise ConfigError(f"system.availability_trace={path}: no interval for client(s) {', '.join(missing[:5])}; every client needs at least one (a client never online: one empty interval, e.g. 0,0)")
    spells: dict[str, tuple[list[float], list[float]]] = {}
    for cid, rows in frame.groupby("client", sort=True):
        merged: list[list[float]] = []
        for start, end in sorted(zip(_numbers(path, rows["start"]), _numbers(path, rows["end"]))):
            if end < start:
                raise ConfigError(f"system.availability_trace={path}: client {cid} has an interval ending ({end:g}) before it starts ({start:g})")
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        spells[str(cid)] = ([s for s, _ in merged], [e for _, e in merged])
    return spells


def _numbers(path: str, column: object) -> list[float]:
    import pandas as pd

    values = pd.to_numeric(column, errors="coerce")  # type: ignore[call-overload]
    if values.isna().any() or not values.map(math.isfinite).all() or (values < 0).any():
        raise ConfigError(f"system.availability_trace={path}: start and end must be finite numbers >= 0 (simulated seconds)")
    return [float(v) for v in values]


MODELS: dict[str, type[Availability]] = {"always": Availability, "bernoulli": Bernoulli, "markov": Markov, "window": Window, "trace": Trace}
