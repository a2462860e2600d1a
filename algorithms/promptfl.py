"""PromptFL (Guo et al., IEEE TMC 2023; FairFedMed's `trainers/promptfl.py` baseline): CoOp's
learnable prompt context on a frozen CLIP host, trained locally and averaged by FedAvg.

Every class prompt is [SOS] + `n_ctx` learnable word vectors + "<class name>." + [EOS]; the text
tower turns them into class features each forward pass and the logits are the logit scale times
the cosine similarity with the image features (`raysim.models.clip.PromptedCLIPClassifier`).
Both towers stay frozen (BatchNorm statistics included), so a round sends and receives only the
context: n_ctx x the text width floats (16 x 512 for ViT-B/16 and RN50: 32 KB), against the
image tower's ~86 M parameters for FedAvg. Needs a `clip:` host; refuses any other model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from raysim.algorithms.base import Algorithm, register_algorithm
from raysim.config import ConfigError, ExperimentConfig
from raysim.datasets.base import DataSource
from raysim.models.adapters import freeze_backbone
from raysim.models.kinds import is_clip_model

MAX_CONTEXT = 60  # CLIP's 77 tokens hold [SOS], the context, a class name, "." and [EOS]


@dataclass
class PromptFLParams:
    n_ctx: int = 16  # context words: CoOp's and PromptFL's 16 (FairFedMed's prompt-learner default; its GLP scripts use 4)

    def __post_init__(self) -> None:
        if isinstance(self.n_ctx, bool) or not isinstance(self.n_ctx, int) or not 1 <= self.n_ctx <= MAX_CONTEXT:
            raise ValueError(f"n_ctx must be an integer in [1, {MAX_CONTEXT}], got {self.n_ctx!r}")


@register_algorithm("promptfl")
class PromptFL(Algorithm):
    """FedAvg of the prompt context alone; the CLIP host is frozen."""

    Params = PromptFLParams
    params: PromptFLParams
    tasks = ("classification",)

    def __init__(self, params: Any, cfg: ExperimentConfig) -> None:
        super().__init__(params, cfg)
        model = getattr(cfg, "model", None)
        if model is not None and not is_clip_model(model.name):
            raise ConfigError(f"algorithm {self.name} needs a CLIP host (model.name=clip:<open_clip architecture>, e.g. clip:ViT-B-16), got model.name={model.name}")

    def build_model(self, source: DataSource) -> nn.Module:
        from raysim.models.clip import build_clip_classifier  # open_clip loads only here

        self.task.check(source, self.cfg)
        names = list(source.class_names) or [f"class {k}" for k in range(source.num_classes)]
        model = build_clip_classifier(self.cfg.model, class_names=names, in_chans=source.channels, seed=self.cfg.seed, n_ctx=self.params.n_ctx)
        freeze_backbone(model, train_norm=False)  # only `untrained_parts()`: the context
        return model
