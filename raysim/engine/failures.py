"""What a failed call on a client actor means: a client's error, or its actor lost (dead, hung,
unreachable); how long the driver waits for an actor; the errors that end a run.

Apart from the driver's round loop (`driver`) because every part of it reads a failure the same
way (the rounds, the actors' start, checkpoint streaming, recovery) and because it changes with
the fault model (`cfg.fault`), not with the rounds. Under `fault.on_client_loss: drop` a lost
actor is retired here; under `recover` the `ActorLost` raised here goes to `recovery.recover`.
"""

from __future__ import annotations

import time
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from raysim import console
from raysim.config import FaultConfig
from raysim.engine.pool import ActorPool
from raysim.engine.run_state import RunState


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


def deadline(fault: FaultConfig, slowest_round: float, kind: str = "round") -> float:
    """Seconds one wait on an actor may take. "start": actors starting (`fault.start_timeout_s`);
    "eval": `fault.eval_timeout_s`, if set; otherwise, before any round is timed,
    `fault.first_round_timeout_s`, then max(`fault.min_timeout_s`, `timeout_factor` x the
    slowest round so far, its evaluation and checkpoint included)."""
    if kind == "start":
        return fault.start_timeout_s
    if kind == "eval" and fault.eval_timeout_s is not None:
        return fault.eval_timeout_s
    if slowest_round == 0:
        return fault.first_round_timeout_s
    return max(fault.min_timeout_s, fault.timeout_factor * slowest_round)


def mark_failed(driver: RunState, cid: str, err: Exception) -> str:
    """Why client `cid`'s call failed. A lost actor raises `ActorLost` (`fault.on_client_loss:
    recover`) or is retired with every client it hosted (`drop`); a client's own error is noted."""
    if isinstance(err, LOST):
        # The actor is gone (or hung), and with it every client it hosted.
        gone = driver.pool.clients_of(cid)
        if isinstance(err, GetTimeoutError):
            reason = f"no answer within {driver.deadline():.0f} s"
        elif isinstance(err, ActorUnavailableError):  # e.g. a network blip: the call may or may not have run
            reason = "unreachable; the call may not have run"
        else:
            reason = "actor died"
        if driver.cfg.fault.on_client_loss == "recover":
            raise ActorLost(driver.pool.index[cid], gone, reason, maybe_alive=isinstance(err, ActorUnavailableError))
        if cid in driver.dead:  # the actor's other clients: it was retired when the first one failed
            return driver.dead[cid]
        driver.pool.retire(driver.pool.index[cid])  # a hung one would hold its CPU / GPU and cost a deadline per later call
        driver.lost_in_round = True
        for c in gone:
            driver.dead[c] = reason
        driver.echo(f"client actor of {console.first(gone)} lost ({reason}); fault.on_client_loss=drop: continuing without {'it' if len(gone) == 1 else 'them'}")
        return reason
    reason = str(unwrap(err)).splitlines()[0]
    driver.notes.say("failed this step", f"client {cid} failed this step: {reason}")
    return reason


def silent(pool: ActorPool, indices: list[int], wait_s: float) -> set[int]:
    """Of the actors `indices`, those that do not answer `describe` within one deadline (`wait_s`).
    All are asked at once (n unreachable actors cost one deadline, not n); one Ray reports
    unavailable (transient) is asked again until the deadline."""
    until = time.monotonic() + wait_s
    asking = {pool.actors[i].describe.remote(): i for i in indices}
    silent: set[int] = set()
    while asking and (left := until - time.monotonic()) > 0:
        ready, _ = ray.wait(list(asking), num_returns=1, timeout=left)
        for ref in ready:
            i = asking.pop(ref)
            try:
                ray.get(ref)
            except ActorUnavailableError:
                time.sleep(UNAVAILABLE_PAUSE_S)
                asking[pool.actors[i].describe.remote()] = i
            except LOST:
                silent.add(i)
    return silent | set(asking.values())


def answers(actor: Any, wait_s: float) -> Any:
    """The actor's `describe`, or None if it does not answer within the deadline (`wait_s`). Asked
    again while Ray calls it unavailable (transient: a network blip, a node under pressure)."""
    until = time.monotonic() + wait_s
    while True:
        try:
            return ray.get(actor.describe.remote(), timeout=max(until - time.monotonic(), 0.1))
        except ActorUnavailableError:
            if time.monotonic() >= until:
                return None
            time.sleep(UNAVAILABLE_PAUSE_S)
        except LOST:
            return None


def unwrap(err: RayTaskError) -> Exception:
    """The user-facing exception a remote call raised (e.g. a DataError naming a file)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, Exception) else err
