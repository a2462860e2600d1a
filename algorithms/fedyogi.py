"""FedYogi (Reddi et al., "Adaptive Federated Optimization", ICLR 2021): Yogi on the server's pseudo-gradient."""

from raysim.algorithms.base import register_algorithm
from raysim.algorithms.fedopt import FedOpt


@register_algorithm("fedyogi")
class FedYogi(FedOpt):
    """v ← v − (1−β2) Δ² sign(v − Δ²): v grows or shrinks additively, never by a factor (Zaheer et al. 2018)."""

    rule = "yogi"
