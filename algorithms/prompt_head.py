"""The CLIP prompt head the prompt methods share (PromptFL, FedOTP, and FedLoRA / FairLoRA on a
`clip:` host, as FairFedMed's `GLP_OT_SVLoRA`): its settings, the host it builds and what of it
stays with a client. The model side is `raysim.models.clip.PromptedCLIPClassifier`; the
image-to-prompt matching `raysim.models.prompt_transport`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from raysim.config import ConfigError, ExperimentConfig
from raysim.datasets.base import DataSource
from raysim.models.kinds import is_clip_model
from raysim.models.prompt_transport import Transport

MAX_CONTEXT = 60  # CLIP's 77 tokens hold [SOS], the context, a class name, "." and [EOS]
LOCAL_PROMPTS = "prompt.local_ctx"  # the state-dict key of the prompts a client keeps (FedOTP's local prompts)


def check_context(n_ctx: object) -> None:
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or not 1 <= n_ctx <= MAX_CONTEXT:
        raise ValueError(f"algorithm.n_ctx must be an integer in [1, {MAX_CONTEXT}], got {n_ctx!r}")


def _positive_int(key: str, value: object, low: int = 1, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise ValueError(f"algorithm.{key} must be an integer in [{low}, {high if high is not None else 'inf'}], got {value!r}")


@dataclass
class PromptHeadParams:
    """The prompt learner and its image-to-prompt matching. Defaults: FedOTP's few-shot script."""

    n_ctx: int = 16  # context words per prompt (FedOTP's few-shot script; FairFedMed's scripts 4)
    prompts: int = 2  # N prompts per class (both references)
    shared: int = 1  # of the N, how many the server averages (FedOTP's --avg_prompt); the rest stay local
    ot: str = "cot"  # cot | sinkhorn | mean | pooled (raysim.models.prompt_transport)
    ot_eps: float = 0.01  # entropic ε (FedOTP's few-shot script; FairFedMed's 0.1)
    top_percent: float = 0.8  # COT's transported mass
    ot_iters: int = 100  # at most this many projections (sinkhorn: exactly)
    ot_thresh: float = 1e-3  # COT stops when its log column scalings move less than this

    def __post_init__(self) -> None:
        check_context(self.n_ctx)
        _positive_int("prompts", self.prompts)
        _positive_int("shared", self.shared, 1, self.prompts if isinstance(self.prompts, int) else None)
        self.transport()  # ot, ot_eps, top_percent, ot_iters, ot_thresh checked in one place

    def transport(self) -> Transport:
        return Transport(kind=self.ot, eps=self.ot_eps, top_percent=self.top_percent, max_iter=self.ot_iters, thresh=self.ot_thresh)

    def head_kwargs(self) -> dict[str, Any]:
        """`build_clip_classifier`'s prompt-head arguments."""
        return {"n_ctx": self.n_ctx, "n_prompts": self.prompts, "local": self.prompts - self.shared, "transport": self.transport()}


def require_clip_host(name: str, cfg: ExperimentConfig) -> None:
    """One line for a prompt method on a model that has no text tower."""
    model = getattr(cfg, "model", None)
    if model is not None and not is_clip_model(model.name):
        raise ConfigError(f"algorithm {name} needs a CLIP host (model.name=clip:<open_clip architecture>, e.g. clip:ViT-B-16), got model.name={model.name}")


def build_prompted_host(algorithm: Any, source: DataSource, head: Any) -> nn.Module:
    """The `clip:` host with `head`'s prompt learner (`head_kwargs()`): towers as loaded, all trainable until the method freezes them."""
    from raysim.models.backbones import clip_class_names, with_volume_front_end
    from raysim.models.clip import build_clip_classifier  # open_clip loads only here

    names = clip_class_names(algorithm.cfg.model, source.class_names, source.num_classes)
    slices = source.volume_slices
    model = build_clip_classifier(algorithm.cfg.model, class_names=names, in_chans=3 if slices else source.channels, seed=algorithm.cfg.seed, **head.head_kwargs())
    return with_volume_front_end(model, slices, algorithm.cfg.seed)


def prompted_host(model: nn.Module) -> nn.Module | None:
    """The `PromptedCLIPClassifier` in `model` (itself, or behind a SliceFold), None for any other model."""
    return next((m for m in model.modules() if callable(getattr(m, "text_tower", None))), None)


def freeze_text_tower(model: nn.Module) -> None:
    """The text tower never trains (no adapters, no norm affines): only the prompt contexts
    change the class features, as in both reference codes."""
    host = prompted_host(model)
    for part in host.text_tower() if host is not None else ():
        for p in part.parameters():
            p.requires_grad_(False)


def without_local_prompts(keys: list[str]) -> list[str]:
    """`keys` without the prompts a client keeps (never sent, never averaged)."""
    return [k for k in keys if k != LOCAL_PROMPTS and not k.endswith(f".{LOCAL_PROMPTS}")]  # (behind a SliceFold: backbone.prompt...)
