"""The client actor pool: which actor hosts which client, and results streamed in client order.

Every per-client call (`fit`, `statistics`, `evaluate`) goes through `ordered`: calls are
queued per actor in sorted client order, at most `window` of them submitted and unconsumed
per actor, and results come back in sorted client order whichever actor finishes first. The
caller folds each result and drops it before asking for the next, so the driver holds one
result at a time and the object store at most `window` per actor: memory is O(actors),
whatever the cohort, and the reduction order depends only on the cohort, never on placement.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from raysim.datasets import ClientSpec
from raysim.engine.client_actor import to_wire

# Results an actor may have finished (or be computing) ahead of the driver's fold. 2: an actor
# starts its next client while its last result waits for the driver; more buys little and
# costs one update each in the object store.
WINDOW = 2
CallError = (RayActorError, RayTaskError, GetTimeoutError)


class ActorPool:
    def __init__(self, actors: list[Any], plan: list[list[ClientSpec]]) -> None:
        self.actors = actors
        self.plan = plan
        self.index = {spec.id: i for i, group in enumerate(plan) for spec in group}
        self.retired: set[int] = set()  # actors killed and out of every later call (fault.on_client_loss=drop)

    def actor_of(self, client_id: str) -> Any:
        return self.actors[self.index[client_id]]

    def clients_of(self, client_id: str) -> list[str]:
        """Every client hosted by the same actor (what a dead actor takes with it)."""
        return [spec.id for spec in self.plan[self.index[client_id]]]

    def broadcast(self, payload: Any, client_ids: Iterable[str], values: dict[str, Any] | None = None) -> None:
        """Put `payload` (and the method's small `values`) into the object store once; each actor
        that hosts one of `client_ids` fetches and deserialises it once (`set_payload`), before
        any call submitted after this. A failure shows in those later calls (actor tasks from
        one caller run in order)."""
        ref = ray.put(to_wire(payload))
        for i in sorted({self.index[cid] for cid in client_ids}):
            self.actors[i].set_payload.remote(ref, values or {})

    def ordered(self, method: str, client_ids: Iterable[str], *args: Any, window: int = WINDOW, timeout: float | None = None) -> Iterator[tuple[str, Any]]:
        """(client id, result or the call's exception) in sorted client order; see the module docstring.
        A result not there within `timeout` seconds comes back as GetTimeoutError."""
        order = sorted(client_ids)
        queues: dict[int, deque[str]] = defaultdict(deque)
        for cid in order:
            queues[self.index[cid]].append(cid)
        pending: dict[str, Any] = {}
        running: dict[int, int] = defaultdict(int)

        def submit(i: int) -> None:
            while queues[i] and running[i] < window:
                cid = queues[i].popleft()
                pending[cid] = getattr(self.actors[i], method).remote(cid, *args)
                running[i] += 1

        for i in list(queues):
            submit(i)
        for cid in order:
            ref = pending.pop(cid)
            try:
                result: Any = ray.get(ref, timeout=timeout)
            except CallError as err:
                result = err
            del ref  # the object store copy goes as soon as the driver has its own
            yield cid, result
            del result  # not kept alive while the next one is fetched
            i = self.index[cid]
            running[i] -= 1
            submit(i)

    def each_actor(self, method: str, *args: Any, timeout: float | None = None, on_answer: Callable[[int], None] | None = None) -> list[Any]:
        """One call per actor, results (or exceptions) in actor order; one not there within
        `timeout` seconds of the previous one comes back as GetTimeoutError. `on_answer(i)`
        after actor i's (progress: a pool loading 1,000 clients takes a while)."""
        refs = [getattr(actor, method).remote(*args) for actor in self.actors]
        out = []
        for i, ref in enumerate(refs):
            try:
                out.append(ray.get(ref, timeout=timeout))
            except CallError as err:
                out.append(err)
            if on_answer is not None:
                on_answer(i)
        return out

    def retire(self, i: int) -> None:
        """Kill actor i (dead or hung: a hung one keeps its CPU / GPU until its process goes) and
        leave it out of every later call: `live` skips it, and its queued calls fail at once."""
        if i not in self.retired:
            self.retired.add(i)
            ray.kill(self.actors[i], no_restart=True)

    def live(self) -> list[tuple[int, Any]]:
        """(index, actor) of every actor not retired."""
        return [(i, actor) for i, actor in enumerate(self.actors) if i not in self.retired]

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
