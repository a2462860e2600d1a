"""Models: timm backbones (`backbones`), adapters (`adapters`: LoRA, FairLoRA), segmentation
and joint fundus + OCT models (`segmentation`, `joint`), foundation models (`foundation`, the
public face of `foundation_base`, `foundation_local`, `foundation_http` and `soft_targets`), and
what a model name makes (`kinds`). The backbone API stays importable from here
(`from raysim.models import build_model`), as in 0.6, when this package was one module.
"""

from raysim.models.backbones import SliceFold, build_model, check_weights, exchangeable_keys, normalization, train_mode
from raysim.models.kinds import DECODER_TASKS, SEGMENTATION_DECODERS, JointOutput, is_segmentation_model, model_task

__all__ = [
    "DECODER_TASKS",
    "SEGMENTATION_DECODERS",
    "JointOutput",
    "SliceFold",
    "build_model",
    "check_weights",
    "exchangeable_keys",
    "is_segmentation_model",
    "model_task",
    "normalization",
    "train_mode",
]
