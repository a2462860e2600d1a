"""Federated methods, one module each, registered by name (`raysim.algorithms` entry points add more)."""

from raysim.algorithms import (  # noqa: F401  (register the built-ins)
    ditto,
    fairfed,
    fairlora,
    fedadagrad,
    fedadam,
    fedavg,
    fedbn,
    fedhelp,
    fedlora,
    fednova,
    fedper,
    fedprox,
    fedrdn,
    fedyogi,
    local,
    qffl,
    silobn,
)
from raysim.algorithms.base import ALGORITHMS, Algorithm, NoParams, ServerState, register_algorithm

__all__ = ["ALGORITHMS", "Algorithm", "NoParams", "ServerState", "register_algorithm"]
