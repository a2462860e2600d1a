"""What the round's helpers need from the Driver: `RunState`, the driver's state and the few
methods that `actor_startup`, `round_metrics`, `checkpoint_stream`, `failures` and `recovery`
read or change, and the records of a round (`Arrived`, `RoundOutcome`).

Apart from the driver (`driver`) so that the helpers depend on this contract, not on the
driver's module: the driver imports them, they import this, and nothing imports back.
`Driver` satisfies `RunState` structurally (it does not inherit it); a helper that needs more
of the driver adds the member here first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ray.util.placement_group import PlacementGroup

from raysim import console
from raysim.algorithms import Algorithm, ServerState
from raysim.config import ExperimentConfig
from raysim.datasets import ClientSpec, DataSource
from raysim.engine.pool import ActorPool
from raysim.outputs import recorder, storage
from raysim.systems.clock import SimulatedClock


@dataclass
class Arrived:
    """What the driver keeps of a folded update: a few numbers, never its tensors."""

    client_id: str
    num_examples: int
    nbytes: int
    loss: float


@dataclass
class RoundOutcome:
    arrived: list[Arrived] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # client id -> reason


class RunState(Protocol):
    """What the round's helpers need from the Driver (`driver.Driver` documents each member).

    Set when the Driver is built: the config, outputs and method; set by `Driver.start`: the
    participants (`specs`), `context`, `state`, `initial_state`, `next_round` and, by
    `actor_startup.start_actors`, `pool`. `round_metrics.eval_clients` also reads the last
    round's cohort, `last_sampled`, with `getattr` (absent before the first round); the simulated
    rounds (`simulated`) set it.
    """

    # The run as configured and where it writes.
    cfg: ExperimentConfig
    run_dir: Path
    mirror: storage.RunMirror | None
    placement_group: PlacementGroup | None
    echo: console.Echo
    notes: console.Capped
    recorder: recorder.RunRecorder
    # The data and the method.
    source: DataSource
    algorithm: Algorithm
    attributes: list[str]
    specs: dict[str, ClientSpec]
    holdout: ClientSpec | None
    context: dict[str, Any]
    clock: SimulatedClock | None  # system.simulate's clock (raysim.systems), else None
    # Where the run stands.
    pool: ActorPool | None
    state: ServerState
    initial_state: ServerState
    next_round: int
    evaluated_round: int
    restarts: int
    lost_in_round: bool
    dead: dict[str, str]
    manifest: dict[str, str]
    known_files: dict[str, dict[str, Any]]
    traffic_down: int
    traffic_up: int

    @property
    def target_attribute(self) -> str: ...

    def deadline(self, kind: str = "round") -> float: ...

    def fit_and_fold(self, round_: int, sampled: list[str], fit_round: int, fold: Any, outcome: RoundOutcome, phase: str, extra: dict[str, dict[str, Any]] | None = None) -> None: ...

    def end_round(self, round_: int, state: ServerState, down: int, outcome: RoundOutcome, progress: recorder.Progress) -> ServerState: ...
