"""Per-client speed, bandwidth and offline share: seeded distributions, a CSV of per-site values,
and the correlation with a client attribute (`system.correlate`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from raysim.config import ConfigError, SystemConfig
from raysim.datasets import ClientSpec
from raysim.seeding import rng

PROFILE_COLUMNS = ("speed", "up_mbps", "down_mbps")


@dataclass(frozen=True)
class Profile:
    """One client's simulated system: compute speed (1: `system.step_seconds` per step), bandwidth
    in megabits per second, and its offline share (the availability model's p_offline for it)."""

    speed: float
    down_mbps: float
    up_mbps: float
    p_offline: float


def build_profiles(system: SystemConfig, specs: Sequence[ClientSpec], group_names: Mapping[str, Mapping[int, str]], seed: int) -> dict[str, Profile]:
    """Every client's `Profile`, by id: the seeded log-normal draws, then the CSV's values for the
    clients it lists, then the correlation's scaling (`system.correlate`)."""
    ids = sorted(s.id for s in specs)
    values = {cid: _drawn(system, seed, cid) for cid in ids}
    if system.profiles is not None:
        for cid, row in read_profiles(system.profiles, ids).items():
            values[cid].update(row)
    z = correlation_scores(system.correlate, specs, group_names) if system.correlate else {cid: 0.0 for cid in ids}
    offline = _normalised(system.offline_ratio, z, mean=True)
    slower = _normalised(system.slowdown_ratio, z, mean=False)
    return {
        cid: Profile(
            speed=values[cid]["speed"] / slower[cid],
            down_mbps=values[cid]["down_mbps"],
            up_mbps=values[cid]["up_mbps"],
            p_offline=min(1.0, system.p_offline * offline[cid]),
        )
        for cid in ids
    }


def _drawn(system: SystemConfig, seed: int, cid: str) -> dict[str, float]:
    """A client's speed and bandwidths from seeded log-normals around the medians (seeded by
    (seed, client) alone: another client's presence changes nothing)."""
    z = rng(seed, "system", "profile", cid).standard_normal(3)
    return {
        "speed": system.speed * math.exp(system.speed_spread * z[0]),
        "down_mbps": system.down_mbps * math.exp(system.bandwidth_spread * z[1]),
        "up_mbps": system.up_mbps * math.exp(system.bandwidth_spread * z[2]),
    }


def read_profiles(path: str, ids: Sequence[str]) -> dict[str, dict[str, float]]:
    """system.profiles: client -> the columns it gives (speed, up_mbps, down_mbps; positive numbers)."""
    frame = _read_csv("system.profiles", path, required=("client",))
    given = [c for c in PROFILE_COLUMNS if c in frame.columns]
    extra = sorted(set(frame.columns) - {"client", *PROFILE_COLUMNS})
    if not given or extra:
        raise ConfigError(f"system.profiles={path}: expected columns client and any of {', '.join(PROFILE_COLUMNS)}, got {', '.join(map(str, frame.columns))}")
    frame["client"] = frame["client"].astype(str)
    _known_clients("system.profiles", path, frame["client"], ids)
    if frame["client"].duplicated().any():
        raise ConfigError(f"system.profiles={path}: client {frame['client'][frame['client'].duplicated()].iloc[0]} has more than one row")
    out = {}
    for _, row in frame.iterrows():
        out[row["client"]] = {c: _positive(path, row["client"], c, row[c]) for c in given}
    return out


def correlation_scores(correlate: str, specs: Sequence[ClientSpec], group_names: Mapping[str, Mapping[int, str]]) -> dict[str, float]:
    """Each client's value of `system.correlate` (its training patients, or a group's share of
    them) scaled to [0, 1] across the clients (0.5 for all when every client has the same)."""
    raw = {s.id: _value(correlate, s, group_names) for s in specs}
    low, high = min(raw.values()), max(raw.values())
    if high == low:
        return {cid: 0.5 for cid in raw}
    return {cid: (v - low) / (high - low) for cid, v in raw.items()}


def correlated_group(correlate: str, group_names: Mapping[str, Mapping[int, str]]) -> tuple[str, int]:
    """(attribute, group code) of `<attribute>=<group>`; the group by display name or code."""
    attribute, group = correlate.split("=")
    if attribute not in group_names:
        raise ConfigError(f"system.correlate={correlate}: the data source has no attribute {attribute!r}; its attributes: {', '.join(sorted(group_names)) or 'none'}")
    names = group_names[attribute]
    by_name = {str(name).lower(): code for code, name in names.items()}
    if group.lower() in by_name:
        return attribute, int(by_name[group.lower()])
    if group.lstrip("-").isdigit() and int(group) in names:
        return attribute, int(group)
    raise ConfigError(f"system.correlate={correlate}: {attribute} has no group {group!r}; its groups: {', '.join(f'{n} ({c})' for c, n in sorted(names.items()))}")


def _value(correlate: str, spec: ClientSpec, group_names: Mapping[str, Mapping[int, str]]) -> float:
    train = spec.splits["train"]
    if correlate == "size":
        return float(len(train))
    attribute, code = correlated_group(correlate, group_names)
    return float(np.mean(train.attributes[attribute] == code)) if len(train) else 0.0


def _normalised(ratio: float, z: Mapping[str, float], *, mean: bool) -> dict[str, float]:
    """ratio**z per client, divided by its mean (offline shares: the mean share is kept) or its
    geometric mean (speeds): the client at z = 1 gets `ratio` times the one at z = 0."""
    factor = {cid: ratio**score for cid, score in z.items()}
    scale = float(np.mean(list(factor.values()))) if mean else math.exp(float(np.mean([math.log(f) for f in factor.values()])))
    return {cid: f / scale for cid, f in factor.items()}


def _read_csv(key: str, path: str, *, required: Sequence[str]) -> pd.DataFrame:
    if not Path(path).expanduser().is_file():
        raise ConfigError(f"{key}={path}: no such file (expected a CSV with columns {', '.join(required)}, ...)")
    try:
        frame = pd.read_csv(Path(path).expanduser())
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ConfigError(f"{key}={path}: not a readable CSV ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from err
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ConfigError(f"{key}={path}: missing column(s) {', '.join(missing)}; got {', '.join(map(str, frame.columns))}")
    if frame.empty:
        raise ConfigError(f"{key}={path}: no rows")
    return frame


def _known_clients(key: str, path: str, clients: pd.Series, ids: Sequence[str]) -> None:
    unknown = sorted(set(clients) - set(ids))
    if unknown:
        raise ConfigError(f"{key}={path}: unknown client(s) {', '.join(unknown[:5])}; the run's clients: {', '.join(ids[:10])}{' ...' if len(ids) > 10 else ''}")


def _positive(path: str, cid: str, column: str, value: object) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"system.profiles={path}: client {cid} {column} must be a positive number, got {value!r}")
    return number
