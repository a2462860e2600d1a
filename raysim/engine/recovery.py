"""Recovery from a lost client actor (`fault.on_client_loss: recover`): every lost actor
replaced, every client and the server put back to the last usable checkpoint (or the start),
the rounds since replayed. Rounds are deterministic, so the run ends with exactly the
uninterrupted metrics.

Apart from the driver's round loop (`driver`), which only catches the `ActorLost` and calls
`recover`, because it changes with the fault model, not with the rounds; telling a lost actor
from a failed client, deadlines and probing are `failures`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import ray

from raysim import console
from raysim.engine import checkpoints
from raysim.engine.actor_startup import client_setup, new_actor
from raysim.engine.checkpoint_stream import restore_clients
from raysim.engine.failures import LOST, ActorLost, RunFailed, silent
from raysim.engine.run_state import RunState


def recover(driver: RunState, round_: int, lost: ActorLost) -> None:
    """Replace every lost actor (a lost node takes several), put every client and the server
    back to the last usable checkpoint (or the start) and go on from there. A loss during
    the recovery counts as one more and starts it again."""
    dead, replaced = (set() if lost.maybe_alive else {lost.actor_index}), set()  # an unreachable one: probed below
    while True:
        driver.restarts += 1
        latest = checkpoints.latest(driver.run_dir)
        if driver.restarts > driver.cfg.fault.max_restarts:
            where = f"--resume {driver.run_dir} continues from {latest.name}" if latest else "no checkpoint was complete yet"
            raise RunFailed(f"round {round_}: {lost} - more actor losses than fault.max_restarts={driver.cfg.fault.max_restarts}; {where}")
        replaced.update(replace_dead_actors(driver, dead))  # every pass's, for the message
        try:
            checkpoint, done = rewind(driver, latest)
            break
        except LOST:
            dead = set()  # the next pass finds which
    gone = sorted(spec.id for i in replaced for spec in driver.pool.plan[i])
    driver.echo(
        f"round {round_}: {lost}; "
        + (f"started new actors for {console.first(gone)} and replaying from " if gone else "every actor answers again (none replaced); replaying from ")
        + (f"checkpoint {checkpoint.name}" if checkpoint else "the start")
        + f" (recovery {driver.restarts} of at most {driver.cfg.fault.max_restarts})"
    )
    driver.next_round = done + 1


def replace_dead_actors(driver: RunState, known: set[int]) -> list[int]:
    """Kill and start again the actors in `known` and every other one that does not answer."""
    dead = set(known) | silent(driver.pool, [i for i in range(len(driver.pool.actors)) if i not in known], driver.deadline())
    for i in sorted(dead):
        ray.kill(driver.pool.actors[i], no_restart=True)  # a hung one too: its process goes
        driver.pool.actors[i] = new_actor(driver, i, driver.pool.plan[i])
    return sorted(dead)


def rewind(driver: RunState, latest: Path | None) -> tuple[Path | None, int]:
    """Server, clients and outputs back to the newest usable checkpoint (None: the start)."""
    checkpoint = None
    if latest is not None:
        checkpoint, skipped = checkpoints.usable(driver.run_dir)
        for line in skipped:
            driver.echo(line)
    done = 0
    if checkpoint is not None:
        driver.state, done = checkpoints.load_server(checkpoint)
        restore_clients(driver, checkpoint)
    else:
        driver.manifest, driver.known_files = {}, {}
        ray.get([actor.restore.remote([]) for actor in driver.pool.actors], timeout=driver.deadline("start"))
        driver.state = driver.algorithm.setup_state(copy.deepcopy(driver.initial_state), client_setup(driver))
    driver.recorder.truncate(done)
    return checkpoint, done
