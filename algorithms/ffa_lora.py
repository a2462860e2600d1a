"""FFA-LoRA: federated freeze-A LoRA with client-level differential privacy (Sun, Qin, Wei, Li,
"Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024), a baseline of DEeR
(Zhu et al., IEEE TMI 2024).

LoRA's A keeps its random initial value (the same on every client: adapters are drawn from the
run's seed) and is never trained nor communicated; clients train B (zero at start) and the head
(with `algorithm.train_norm: true` also the backbone's normalisation-layer affine parameters),
and send them. As the product B·A has a fixed A, averaging
is exact (mean_k(B_k)·A = mean_k(B_k·A)) and the DP noise on B is never multiplied by noise on
A. The server clips each client's update to norm C, adds N(0, z²C²) to the sum and divides by
the number of updates (`raysim.algorithms.dp`, which also describes the accountant and the keys).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from raysim.algorithms.base import register_algorithm
from raysim.algorithms.dp_lora import DPLoRA, DPLoRAParams
from raysim.datasets.base import DataSource
from raysim.models import adapters


@dataclass
class FFALoRAParams(DPLoRAParams):
    clip: float = 0.3  # C: the DEeR code's FFA-LoRA C (0.3 at ε = 1, 3 and 6 on Kvasir)


def freeze_down(model: nn.Module) -> None:
    """Freeze every adapter's A (it is then neither trained nor communicated)."""
    for module in model.modules():
        if isinstance(module, adapters.LowRankAdapter):
            module.lora_A.requires_grad_(False)


@register_algorithm("ffa_lora")
class FFALoRA(DPLoRA):
    Params = FFALoRAParams

    def adapt(self, model: nn.Module, source: DataSource) -> nn.Module:
        model = super().adapt(model, source)
        freeze_down(model)
        return model
