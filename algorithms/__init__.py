"""Federated methods, one module each, registered by name (`raysim.algorithms` entry points add more)."""

from raysim.algorithms import (  # noqa: F401  (register the built-ins)
    afl,
    cksp,
    deer,
    det,
    ditto,
    dp_lora,
    fairfed,
    fairlora,
    fedadagrad,
    fedadam,
    fedavg,
    fedbm,
    fedbn,
    fedfb,
    fedhelp,
    fedlora,
    fednova,
    fedper,
    fedprox,
    fedrdn,
    fedyogi,
    ffa_lora,
    local,
    pfa,
    pfl_resfim,
    qffl,
    silobn,
)
from raysim.algorithms.base import ALGORITHMS, Algorithm, NoParams, ServerState, register_algorithm

__all__ = ["ALGORITHMS", "Algorithm", "NoParams", "ServerState", "register_algorithm"]
