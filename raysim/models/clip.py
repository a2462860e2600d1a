"""CLIP hosts (`model.name=clip:<open_clip architecture>`, issue 31).

open_clip builds both towers (`clip:ViT-B-16`, `clip:RN50`, any architecture open_clip knows
whose tokenizer ships with it), weights only from a local file (`model.weights`: open_clip
would download for `model.pretrained=true`, which is refused). `CLIPClassifier` classifies by
the cosine similarity of the image features with the text features of one prompt per class
(`model.prompt`, default "a photo of {}."), scaled by the checkpoint's logit scale, as CLIP's zero-shot
classifier does; the text features are computed once when the model is built (the text tower
is then dropped) and are not part of the state dict, so nothing of the text side is
communicated. This is the host FedAvg fine-tunes (the image tower). `PromptedCLIPClassifier`
replaces the fixed prompts by learnable contexts (PromptFL, FedOTP, FairFedMed's FairLoRA head:
`raysim.algorithms.prompt_head`), scored through `raysim.models.prompt_transport`.

Images: 1-channel inputs are repeated to 3; the normalisation is CLIP's (`pretrained_cfg`,
read by `backbones.normalization`); `model.img_size` sets open_clip's `force_image_size` (a
checkpoint at another size has its position embedding interpolated by open_clip).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from raysim.config import ConfigError, ModelConfig
from raysim.models.prompt_transport import Transport, class_scores

PREFIX = "clip:"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's (FairFedMed's PIXEL_MEAN)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROMPT = "a photo of {}."  # CLIP's zero-shot prompt: model.prompt's default, the small CLIP's zero-shot check


def architecture(name: str) -> str:
    """The open_clip architecture of a `clip:<arch>` name, checked against open_clip's list."""
    import open_clip

    from raysim.models.clip_tiny import register  # RaySim-Tiny-ViT into open_clip's registry first

    register()

    arch = name[len(PREFIX) :]
    if arch not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if m.lower().startswith(arch.lower()[:4])][:5]
        raise ConfigError(f"model.name={name}: {arch!r} is not an open_clip architecture" + (f" (e.g. {', '.join(close)})" if close else ""))
    return arch


class CLIPClassifier(nn.Module):
    """The image tower of a CLIP model and fixed text features of one prompt per class."""

    def __init__(self, clip_model: nn.Module, text_features: torch.Tensor, in_chans: int) -> None:
        super().__init__()
        self.visual = clip_model.visual
        self.in_chans = in_chans
        self.register_buffer("text_features", F.normalize(text_features.detach().float(), dim=-1), persistent=False)
        self.register_buffer("logit_scale", clip_model.logit_scale.detach().exp().reshape(()).clone(), persistent=False)
        self.pretrained_cfg = {"mean": CLIP_MEAN, "std": CLIP_STD}

    @property
    def num_classes(self) -> int:
        return int(self.text_features.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:  # grayscale fundus / chest X-ray: the RGB tower sees it as three equal channels
            x = x.expand(-1, 3, -1, -1)
        features = F.normalize(self.visual(x), dim=-1)
        return self.logit_scale * features @ self.text_features.t()


class PromptContext(nn.Module):
    """CoOp's learnable context, N prompts of `n_ctx` word vectors each, shared by every class
    ("X X ... X <class name>."), drawn from N(0, 0.02²) as CoOp, FedOTP and FairFedMed draw
    them. The first `n_prompts − local` are `ctx` (what a federation averages), the last
    `local` are `local_ctx` (FedOTP's per-client prompts, never sent)."""

    def __init__(self, n_prompts: int, n_ctx: int, width: int, local: int = 0) -> None:
        super().__init__()
        drawn = torch.empty(n_prompts, n_ctx, width).normal_(0.0, 0.02)
        self.ctx = nn.Parameter(drawn[: n_prompts - local].clone())
        self.local_ctx = nn.Parameter(drawn[n_prompts - local :].clone()) if local else None

    def all(self) -> torch.Tensor:
        """(N, n_ctx, width): the shared prompts first, then the local ones."""
        return self.ctx if self.local_ctx is None else torch.cat([self.ctx, self.local_ctx])


class PromptedCLIPClassifier(nn.Module):
    """A CLIP host whose class prompts carry learnable contexts (`PromptContext`): the text
    tower runs every forward pass on [SOS] + context + "<class name>." + [EOS] token embeddings
    for each of the N prompts, so the class features follow the contexts as they train; an
    image is scored against a class by `prompt_transport` (CoOp's pooled feature for PromptFL,
    an optimal-transport match of its patch features with the N prompts for FedOTP). Both
    towers are frozen parts of the model (`untrained_parts` is the context alone; adapters go
    in the image tower: `image_tower`); their text-side constants (the prompts' token
    embeddings, positions, mask) are non-persistent buffers."""

    def __init__(self, clip_model: nn.Module, tokens: torch.Tensor, n_ctx: int, in_chans: int, *, n_prompts: int = 1, local: int = 0, transport: Transport | None = None) -> None:
        super().__init__()
        self.visual = clip_model.visual
        self.transformer = clip_model.transformer
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.text_pool_type = clip_model.text_pool_type
        self.text_eos_id = getattr(clip_model, "text_eos_id", None)
        self.in_chans = in_chans
        self.transport = transport or Transport(kind="pooled")
        with torch.no_grad():
            embedded = clip_model.token_embedding(tokens)
        self.prompt = PromptContext(n_prompts, n_ctx, embedded.shape[-1], local)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", embedded[:, :1].clone(), persistent=False)  # [SOS]
        self.register_buffer("suffix", embedded[:, 1 + n_ctx :].clone(), persistent=False)  # class name, ".", [EOS], padding
        self.register_buffer("positions", clip_model.positional_embedding.detach().clone(), persistent=False)
        self.register_buffer("attn_mask", clip_model.attn_mask.clone() if clip_model.attn_mask is not None else None, persistent=False)
        self.register_buffer("logit_scale", clip_model.logit_scale.detach().exp().reshape(()).clone(), persistent=False)
        self.pretrained_cfg = {"mean": CLIP_MEAN, "std": CLIP_STD}

    @property
    def num_classes(self) -> int:
        return int(self.tokens.shape[0])

    def untrained_parts(self) -> tuple[nn.Module, ...]:
        """What a frozen host trains (`adapters.freeze_backbone`): the prompt contexts."""
        return (self.prompt,)

    def text_tower(self) -> tuple[nn.Module, ...]:
        """The text tower's modules: frozen whatever the method (no adapters, no norm training)."""
        return (self.transformer, self.ln_final) + ((self.text_projection,) if isinstance(self.text_projection, nn.Module) else ())

    def class_features(self) -> torch.Tensor:
        """(N, C, D) L2-normalised features of each prompt for each class."""
        from open_clip.transformer import text_global_pool

        ctx = self.prompt.all()
        n, classes = ctx.shape[0], self.tokens.shape[0]
        x = torch.cat([self.prefix.repeat(n, 1, 1), ctx.repeat_interleave(classes, dim=0), self.suffix.repeat(n, 1, 1)], dim=1)
        x = self.transformer(x + self.positions, attn_mask=self.attn_mask)
        x = text_global_pool(self.ln_final(x), self.tokens.repeat(n, 1), self.text_pool_type, eos_token_id=self.text_eos_id)
        x = self.text_projection(x) if isinstance(self.text_projection, nn.Linear) else x @ self.text_projection
        return F.normalize(x, dim=-1).view(n, classes, -1)

    def _scoring_features(self) -> torch.Tensor:
        """`class_features()` without gradients, computed once per state of the contexts: an
        evaluation runs the text tower once, not once per batch. The key is each context's storage
        and version counter, which every in-place change (an optimizer step, `load_state_dict`) bumps."""
        key = tuple((p.data_ptr(), p._version) for p in self.prompt.parameters())
        if self.__dict__.get("_scored_key") != key:
            self.__dict__["_scored"], self.__dict__["_scored_key"] = self.class_features(), key
        return self.__dict__["_scored"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        prompts = self.class_features() if torch.is_grad_enabled() else self._scoring_features()
        if not self.transport.uses_patches:
            pooled = F.normalize(self.visual(x), dim=-1)
            text = prompts[0] if len(prompts) == 1 else F.normalize(prompts.mean(dim=0), dim=-1)  # FedOTP's pooled text feature
            return self.logit_scale * pooled @ text.t()
        _, patches = image_features(self.visual, x)
        return self.logit_scale * class_scores(self.transport, F.normalize(patches, dim=-1), prompts)


def image_features(visual: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled (B, D), patches (B, M, D)) from an open_clip image tower, both in the joint
    embedding space, as FedOTP's modified CLIP returns them: a ViT's patch tokens after its
    final LayerNorm through the same projection as the class token; a ModifiedResNet's
    attention pool applied with every spatial position as a query (the pooled feature is the
    mean-token query's output, as open_clip's own)."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        tokens = visual.transformer(visual._embeds(x))
        pooled, patches = visual._pool(tokens)
        if visual.proj is not None:
            pooled, patches = pooled @ visual.proj, patches @ visual.proj
        return pooled, patches
    if isinstance(visual, ModifiedResNet):
        grid = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(x)))))
        out = attention_pool_all(visual.attnpool, grid)
        return out[:, 0], out[:, 1:]
    raise ConfigError(f"a prompt head with patch features needs an open_clip VisionTransformer or ModifiedResNet image tower, not {type(visual).__name__}; use algorithm.ot=pooled")


def attention_pool_all(pool: nn.Module, grid: torch.Tensor) -> torch.Tensor:
    """open_clip's AttentionPool2d with the mean token and every position as queries: (B, 1 + HW, D).
    The projections are called as modules (not their weights), so LoRA on them takes effect."""
    x = grid.flatten(2).transpose(1, 2)  # (B, HW, C)
    x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + pool.positional_embedding.to(x.dtype)
    b, t, c = x.shape
    heads = pool.num_heads

    def split(h: torch.Tensor) -> torch.Tensor:
        return h.view(b, t, heads, c // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(pool.q_proj(x)), split(pool.k_proj(x)), split(pool.v_proj(x)))
    return pool.c_proj(out.transpose(1, 2).reshape(b, t, c))


def check_host(cfg: ModelConfig, weights_key: str = "model.weights") -> str:
    """The architecture of a `clip:` model config, its settings checked (one line each): run
    before any actor starts, as the rest of the config is."""
    arch = architecture(cfg.name)
    if cfg.pretrained:
        raise ConfigError(f"model.pretrained=true with model.name={cfg.name}: open_clip would download the weights; raysim needs no network: pass {weights_key}=PATH to a local checkpoint")
    if cfg.weights and not Path(cfg.weights).expanduser().is_file():
        raise ConfigError(f"{weights_key}={Path(cfg.weights).expanduser()} is not a file (an open_clip checkpoint for {arch})")
    return arch


def build_clip_classifier(cfg: ModelConfig, *, class_names: list[str], in_chans: int, seed: int, weights_key: str = "model.weights", n_ctx: int = 0, n_prompts: int = 1, local: int = 0, transport: Transport | None = None) -> CLIPClassifier | PromptedCLIPClassifier:
    """`cfg.name` (`clip:<arch>`) with `cfg.weights` (a local open_clip checkpoint; none: a
    seeded random initialisation) and one prompt per class of `class_names`: fixed
    (`model.prompt`), or with `n_ctx` > 0 `n_prompts` learnable contexts of that many words before
    each name (`local` of them kept per client), scored by `transport`."""
    import open_clip

    arch = check_host(cfg, weights_key)
    if in_chans not in (1, 3):
        raise ConfigError(f"model.name={cfg.name} takes 1- or 3-channel images, the data has {in_chans} (a 3D volume needs the OCT front end: not yet for CLIP hosts)")
    weights = str(Path(cfg.weights).expanduser()) if cfg.weights else None
    with torch.random.fork_rng(devices=[]), _quiet_when(weights is None):
        torch.manual_seed(seed)
        try:
            model = open_clip.create_model(arch, pretrained=weights, force_image_size=cfg.img_size)
        except (RuntimeError, KeyError, ValueError, OSError) as err:
            raise ConfigError(f"{weights_key}={weights}: not an open_clip checkpoint for {arch} ({' '.join(str(err).split())[:200]})") from err
        tokenizer = open_clip.get_tokenizer(arch)
        if n_ctx > 0:  # the context is drawn here too: from the seed, as the towers
            prompts = tokenizer([" ".join(["X"] * n_ctx) + f" {name}." for name in class_names])
            return PromptedCLIPClassifier(model, prompts, n_ctx, in_chans, n_prompts=n_prompts, local=local, transport=transport)
    with torch.no_grad():
        text = model.encode_text(tokenizer([cfg.prompt.format(name) for name in class_names]))
    return CLIPClassifier(model, text, in_chans)


@contextlib.contextmanager
def _quiet_when(random_init: bool) -> Iterator[None]:
    """open_clip's root-logger warning that a model without weights is randomly initialised:
    what a seeded random host is meant to be, so not printed by every client actor."""
    if not random_init:
        yield
        return
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
