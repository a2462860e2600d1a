"""Local training only (the no-federation baseline of every FL paper, e.g. McMahan et al., 2017)."""

from __future__ import annotations

from torch import nn

from raysim.algorithms.base import Algorithm, ServerState, register_algorithm
from raysim.types import Update


@register_algorithm("local")
class Local(Algorithm):
    """Nothing travels either way: each client trains and keeps its whole model and is scored with it.

    With nothing communicated the base class already sends an empty payload, keeps every key in
    the client's own state and replies with empty tensors; only aggregation has to change.
    """

    def communicated(self, model: nn.Module) -> list[str]:
        return []

    def aggregate(self, round_: int, updates: list[Update], state: ServerState) -> ServerState:
        return state  # there is nothing to average
