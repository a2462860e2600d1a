"""Local training only (the no-federation baseline of every FL paper, e.g. McMahan et al., 2017)."""

from __future__ import annotations

from typing import Any

from torch import nn

from raysim.algorithms.base import Algorithm, ServerState, register_algorithm


@register_algorithm("local")
class Local(Algorithm):
    """Nothing travels either way: each client trains and keeps its whole model and is scored with it.

    With nothing communicated the base class already sends an empty payload, keeps every key in
    the client's own state and replies with empty tensors, which the base fold takes (nothing to
    sum); only the server's step differs: the state stays as it was.
    """

    newcomer = None  # a site that never trained has only the untrained initial model: eval.holdout_site is refused

    def communicated(self, model: nn.Module) -> list[str]:
        return []

    def finalize(self, round_: int, fold: Any, state: ServerState) -> ServerState:
        return state  # there is nothing to average
