"""FedAdagrad (Reddi et al., "Adaptive Federated Optimization", ICLR 2021): Adagrad on the server's pseudo-gradient."""

from raysim.algorithms.base import register_algorithm
from raysim.algorithms.fedopt import AdaptiveParams, FedOpt


@register_algorithm("fedadagrad")
class FedAdagrad(FedOpt):
    """v ← v + Δ² (no β2: Adagrad never forgets); server momentum β1 as in the paper's Algorithm 2."""

    rule = "adagrad"
    Params = AdaptiveParams
