"""Federated methods, one module each, registered by name (`raysim.algorithms` entry points add more)."""

from raysim.algorithms import fedavg  # noqa: F401  (register the built-ins)
from raysim.algorithms.base import ALGORITHMS, Algorithm, NoParams, ServerState, register_algorithm

__all__ = ["ALGORITHMS", "Algorithm", "NoParams", "ServerState", "register_algorithm"]
