"""Simulated systems: each client's compute and bandwidth, its availability, and the virtual
clock that turns them into round times, deadlines and asynchronous arrivals (`system.*`).

Nothing measured enters the clock: a client's simulated time follows from the config (its
local steps, the bytes its method sends, its speed and bandwidth), so results stay a function
of config and seed whatever the actor count. Plain Python; the engine's driver consults it.
"""

from raysim.systems.clock import Arrival, AsyncClock, RoundPlan, SyncClock, simulated_clock

__all__ = ["Arrival", "AsyncClock", "RoundPlan", "SyncClock", "simulated_clock"]
