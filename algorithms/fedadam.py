"""FedAdam (Reddi et al., "Adaptive Federated Optimization", ICLR 2021): Adam on the server's pseudo-gradient."""

from raysim.algorithms.base import register_algorithm
from raysim.algorithms.fedopt import FedOpt


@register_algorithm("fedadam")
class FedAdam(FedOpt):
    """v ← β2 v + (1−β2) Δ²; hyperparameters in `FedOptParams` (eta, tau, beta1, beta2, weighting)."""

    rule = "adam"
