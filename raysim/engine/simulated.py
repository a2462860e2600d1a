"""The driver's rounds under the simulated clock (`system.simulate`, `raysim.systems`).

Synchronous rounds: `plan_round` says which sampled clients finish in simulated time (the rest
are never trained), `after_round` moves the clock and records who was served. Asynchronous
methods (FedBuff, FedAsync): `run_async_round` trains the updates the clock says arrive in this
server step, each on the model version its client downloaded. The clock's state lives in the
server state under `SYSTEM`, so checkpoints, resume and recovery carry it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from raysim.algorithms import ServerState
from raysim.engine.run_state import RoundOutcome, RunState
from raysim.outputs import recorder
from raysim.systems import RoundPlan
from raysim.systems.clock import LATE, OFFLINE
from raysim.types import nbytes

SYSTEM = "system"  # the server state's entry holding the clock's state


def initial_state(driver: RunState) -> dict[str, Any]:
    """Simulated time 0, nobody in flight, no participation recorded yet."""
    return {"time": 0.0, "in_flight": [], "rate_sums": {}, "rounds": 0}


def now(state: ServerState) -> float:
    return float(state[SYSTEM]["time"])


def plan_round(driver: RunState, round_: int, state: ServerState, sampled: list[str], payload: Any, down: int) -> RoundPlan:
    """Which of the sampled clients train (`SyncClock.plan`), with a note for the dropped ones."""
    everyone = sorted(driver.specs)
    start = now(state)
    k = driver.cfg.federation.clients_per_round or len(everyone)
    plan = driver.clock.plan(start, driver.clock.available(round_, start, everyone), sampled, k, down, driver.algorithm.update_bytes(payload, round_))
    late = sorted(c for c, why in plan.dropped.items() if why in (LATE, OFFLINE))
    if late:
        why = ", ".join(sorted({plan.dropped[c] for c in late}))
        driver.echo(f"round {round_}: {len(late)} of {len(sampled)} sampled clients would miss the round ({why}; simulated): not trained, e.g. {', '.join(late[:3])}")
    return plan


def run_async_round(driver: RunState, round_: int, state: ServerState, progress: recorder.Progress) -> ServerState:
    """One server step of a buffered asynchronous method: the arrivals the clock gives, trained
    version by version (each group on the weights its clients downloaded, in sorted client order
    within a version), folded with their staleness, then the versions no one still needs dropped."""
    algorithm = driver.algorithm
    current = algorithm.version_payload(state, state["version"])
    down = nbytes(current)  # every version has the same tensors
    ids = sorted(c for c in driver.specs if c not in driver.dead)
    start = now(state)
    arrived, lost, clock_state = driver.clock.step(round_, state[SYSTEM], ids, down, algorithm.update_bytes(current, round_), version=int(state["version"]))
    if lost:
        driver.echo(f"round {round_}: {len(lost)} update(s) lost to clients going offline before they finished (simulated), e.g. {', '.join(a.client_id for a in lost[:3])}")
    driver.last_sampled = sorted({a.client_id for a in arrived})
    outcome = RoundOutcome()
    fold = algorithm.fold_start(round_, state, {})
    for version in sorted({a.base_version for a in arrived}):
        group = sorted(a.client_id for a in arrived if a.base_version == version)
        driver.pool.broadcast(algorithm.version_payload(state, version), group, algorithm.round_values(state, version + 1))
        extra = {a.client_id: {"base_version": version, "staleness": a.staleness} for a in arrived if a.base_version == version}
        driver.fit_and_fold(round_, group, version + 1, fold, outcome, f"round {round_}: updates on version {version}", extra)
    if outcome.arrived:
        state = algorithm.finalize(round_, fold, state)
    else:
        driver.echo(f"round {round_}: no client update arrived; the global state is unchanged")
    del fold
    state = {**state, SYSTEM: {**state[SYSTEM], **clock_state, "time": start}}
    state = algorithm.keep_versions(state, {int(f[2]) for f in clock_state["in_flight"]})
    staleness = {a.client_id: a.staleness for a in arrived if a.client_id in {x.client_id for x in outcome.arrived}}
    state = after_round(driver, round_, state, start, clock_state["time"], outcome, dropped={a.client_id: OFFLINE for a in lost}, available=None, staleness=staleness)
    return driver.end_round(round_, state, down, outcome, progress)


def after_round(
    driver: RunState,
    round_: int,
    state: ServerState,
    start: float,
    end: float,
    outcome: RoundOutcome,
    *,
    dropped: Mapping[str, str],
    available: list[str] | None,
    staleness: Mapping[str, int] | None = None,
) -> ServerState:
    """Move the clock to the round's end and record the round in simulated time (split `train`):
    `sim_time`, `sim_round_s`, `sim_available`, `sim_dropped`, `sim_empty` (client `server`), `participated`
    per participant, `staleness` per arrived asynchronous update, and per attribute and group
    `participation_rate` (the share of the group's training patients whose site's update was
    accepted this round) and `participation_rate_cum` (its mean over the rounds so far)."""
    system = dict(state[SYSTEM])
    served = {a.client_id for a in outcome.arrived}
    rates = participation_rates(driver, served)
    sums = dict(system.get("rate_sums", {}))
    for (attribute, group), rate in rates.items():
        sums[f"{attribute}={group}"] = sums.get(f"{attribute}={group}", 0.0) + rate
    rounds = int(system.get("rounds", 0)) + 1
    system.update(time=float(end), rate_sums=sums, rounds=rounds)
    server = {"sim_time": end, "sim_round_s": end - start, "sim_dropped": float(sum(1 for why in dropped.values() if why in (LATE, OFFLINE)))}
    # a round the simulation left empty (nobody online, every update late): not a failure, so
    # it never counts toward fault.max_empty_rounds (`Driver._count_empty` counts failures only)
    server["sim_empty"] = float(not outcome.arrived and not outcome.failed)
    if available is not None:
        server["sim_available"] = float(len(available))
    rows = [(recorder.SERVER, "", "", metric, float(value)) for metric, value in server.items()]
    rows += [(cid, "", "", "participated", float(cid in served)) for cid in sorted(driver.specs) if cid not in driver.dead]
    rows += [(cid, "", "", "staleness", float(tau)) for cid, tau in sorted((staleness or {}).items())]
    for (attribute, group), rate in sorted(rates.items()):
        rows.append((recorder.SERVER, attribute, group, "participation_rate", rate))
        rows.append((recorder.SERVER, attribute, group, "participation_rate_cum", sums[f"{attribute}={group}"] / rounds))
    frame = pd.DataFrame(rows, columns=["client", "attribute", "group", "metric", "value"])
    roles = {cid: spec.role for cid, spec in driver.specs.items()}
    frame = frame.assign(round=round_, split="train", role=frame["client"].map(roles).fillna(""))
    driver.recorder.add(frame[recorder.METRIC_COLUMNS], [])
    return {**state, SYSTEM: system}


def participation_rates(driver: RunState, served: Iterable[str]) -> dict[tuple[str, str], float]:
    """(attribute, group name) -> the share of the group's training patients (over the run's
    participants) at a site in `served`; groups of unknown code (−1) aside. The counts per client
    are the clock's, computed once (`SimulatedClock.group_counts`)."""
    served = set(served)
    out: dict[tuple[str, str], float] = {}
    for attribute in driver.attributes:
        names = driver.source.group_names.get(attribute, {})
        total: dict[int, int] = {}
        taken: dict[int, int] = {}
        for cid, counts in driver.clock.group_counts.get(attribute, {}).items():
            if cid not in driver.specs:
                continue
            for code, n in counts.items():
                if code < 0:
                    continue
                total[code] = total.get(code, 0) + n
                if cid in served:
                    taken[code] = taken.get(code, 0) + n
        for code, n in sorted(total.items()):
            out[(attribute, str(names.get(code, code)))] = taken.get(code, 0) / n
    return out
