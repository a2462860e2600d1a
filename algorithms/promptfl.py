"""PromptFL (Guo et al., IEEE TMC 2023; FairFedMed's `trainers/promptfl.py` baseline): CoOp's
learnable prompt context on a frozen CLIP host, trained locally and averaged by FedAvg.

Every class prompt is [SOS] + `n_ctx` learnable word vectors + "<class name>." + [EOS]; the text
tower turns them into class features each forward pass and the logits are the logit scale times
the cosine similarity with the pooled image feature (`raysim.models.clip.PromptedCLIPClassifier`).
Both towers stay frozen (BatchNorm statistics included), so a round sends and receives only the
context: n_ctx x the text width floats (16 x 512 for ViT-B/16 and RN50: 32 KB), against the
image tower's ~86 M parameters for FedAvg. Needs a `clip:` host; refuses any other model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from raysim.algorithms.base import Algorithm, register_algorithm
from raysim.algorithms.prompt_head import build_prompted_host, check_context, require_clip_host
from raysim.config import ExperimentConfig
from raysim.datasets.base import DataSource
from raysim.models.adapters import freeze_backbone
from raysim.models.prompt_transport import Transport


@dataclass
class PromptFLParams:
    n_ctx: int = 16  # context words: CoOp's and PromptFL's 16 (FairFedMed's prompt-learner default; its GLP scripts use 4)
    ot: str = "pooled"  # CoOp's pooled image feature; FairFedMed's PromptFL script (GLP_OT with OT=None, 1 prompt): mean

    def __post_init__(self) -> None:
        check_context(self.n_ctx)
        Transport(kind=self.ot)

    def head_kwargs(self) -> dict[str, Any]:
        return {"n_ctx": self.n_ctx, "n_prompts": 1, "local": 0, "transport": Transport(kind=self.ot)}


@register_algorithm("promptfl")
class PromptFL(Algorithm):
    """FedAvg of the prompt context alone; the CLIP host is frozen."""

    Params = PromptFLParams
    params: PromptFLParams
    tasks = ("classification",)
    needs_pretrained = True  # prompts tune a pretrained CLIP (the small synthetic one by default)
    on_clip = True

    def __init__(self, params: Any, cfg: ExperimentConfig) -> None:
        super().__init__(params, cfg)
        require_clip_host(self.name, cfg)

    def build_host(self, source: DataSource) -> nn.Module:
        self.task.check(source, self.cfg)
        return build_prompted_host(self, source, self.params)

    def adapt(self, model: nn.Module, source: DataSource) -> nn.Module:
        freeze_backbone(model, train_norm=False)  # only `untrained_parts()`: the contexts
        return model
