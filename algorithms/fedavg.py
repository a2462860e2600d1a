"""FedAvg (McMahan et al., 2017): the example-count weighted mean of client parameters."""

from raysim.algorithms.base import Algorithm, register_algorithm


@register_algorithm("fedavg")
class FedAvg(Algorithm):
    """The base class already is FedAvg; this registers it under its name."""
