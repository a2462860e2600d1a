"""FedBM (Zhu, Yang, Gao, Yuan, Liu, "FedBM: Stealing knowledge from pre-trained language models for
heterogeneous federated learning", Medical Image Analysis 2025; reference code meiluzhu/FedBM).

**LKCC** (`fedbm_concepts`): the prompt embeddings of each class's concept give μ_c and σ²_c; the
network's classifier is replaced by a trainable projection P from the backbone's features to the
embedding space (the reference's `linear_fedbm`, trained and averaged like the backbone) and a
frozen classifier: f = P(h)/‖P(h)‖, logits z_c = T·f·μ_c + ½T²·Σ_d f_d² σ²_{c,d}, local loss
CE(z, y) + ½T²·Σ_d f_d² σ²_{y,d}. Aggregation is FedAvg.

**CGDE**: after every `generator_every`-th round's aggregation (except the last round's), the server
(the driver actor, on `server_device`) trains a conditional generator G for `generator_steps` Adam
steps (lr `generator_lr`, betas (0.5, 0.999)) against the new global model (eval mode, frozen).
Each step draws `generator_batch` labels uniformly and one concept embedding e ~ N(μ_c, Σ_c + 10⁻⁴·I)
per label; x = G(e) ∈ [0, 1], augmented (random crop with 4 pixels of zero padding, horizontal and
vertical flips, one draw per batch) and normalised as the model expects. Its objective is the
local loss on x + λ_dis·Σ_BN (‖mean_batch − running_mean‖₂ + ‖var_batch − running_var‖₂) over
each BatchNorm's input (DeepInversion's statistics; none without BatchNorm) + λ_div·(1/C)·Σ_c
mean_{i<j of class c} 1/(‖x_i − x_j‖₁ / ‖e_i − e_j‖₁ + 10⁻⁵) (diversity). G persists across
trainings. Its weights (parameters and BatchNorm buffers) go down with every later payload; each
sampled client then appends `pseudo_batch` generated, augmented images with uniform labels to
every training batch (same loss, G in eval mode), which calibrates its feature extractor.

Randomness: the concepts' stand-in by (seed), G's initial weights by (seed), its training draws by
(seed, round), a client's pseudo-data by (seed, round, client id): no result depends on placement.
What leaves a client: the model's tensors (backbone, BatchNorm statistics, P), as FedAvg.
"""

from __future__ import annotations

import copy
import math
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from raysim.algorithms.aggregation import WeightedSum
from raysim.algorithms.base import Algorithm, ServerState, register_algorithm
from raysim.algorithms.fedbm_concepts import (
    DEFAULT_TEMPLATES,
    SYNTHETIC,
    ConceptHead,
    attach_concept_head,
    concept_head,
    concept_loss,
    concept_stats,
    encode_prompts,
    load_embeddings,
    sample_concepts,
    synthetic_embeddings,
)
from raysim.client.training import Batch, forward
from raysim.config import ConfigError
from raysim.models.backbones import normalization
from raysim.seeding import derive_seed
from raysim.types import Tensors, Update

if TYPE_CHECKING:
    from raysim.client.client import Client
    from raysim.config import ExperimentConfig
    from raysim.datasets.base import DataSource

# Payload keys of the generator: "fedbm.generator/<its state-dict key>" ("/" is never in a model key).
PREFIX = "fedbm.generator/"
PAD = 4  # the augmentation's random-crop padding (the reference's RandomCrop(size, padding=4))


@dataclass
class FedBMParams:
    """Defaults from the paper's scripts, except the generator's size and steps, cut for CPU runs."""

    embeddings: str = ""  # prompt embeddings: a .npy / .parquet / directory (fedbm_concepts), or "synthetic"; "" = synthetic on the synthetic data set
    text_encoder: str = ""  # instead: a local open_clip or Hugging Face model directory that embeds the prompts
    class_concepts: list[str] = field(default_factory=list)  # with text_encoder: each class's concept, in label order
    templates: list[str] = field(default_factory=list)  # with text_encoder: prompts with "{}" for the concept; empty = fedbm_concepts.DEFAULT_TEMPLATES
    temperature: float = 12.5  # T (the scripts: 12.5 in two of four settings, 17.5 and 7.5 in the others)
    generator_every: int = 5  # train G after every k-th round (the scripts' freq_g_driver = 5)
    generator_steps: int = 20  # Adam steps per training (the scripts: g_iter = 100)
    generator_batch: int = 32  # pseudo-images per generator step (the scripts: synthesis_batch_size = 64)
    generator_lr: float = 3e-4  # G's Adam learning rate (the scripts' lr_g)
    generator_width: int = 16  # G's base channel count (the reference: ngf = 64)
    lambda_div: float = 1.0  # weight of the diversity term (the scripts: 1)
    lambda_dis: float = 0.1  # weight of the BatchNorm-statistics term (the scripts: 0.1 in three of four settings, 1)
    pseudo_batch: int = 16  # pseudo-images a client appends to each training batch (the scripts' g_batchsize: 16 for OCT, 32 for Kvasir)

    def __post_init__(self) -> None:
        if self.embeddings and self.text_encoder:
            raise ValueError("algorithm.embeddings and algorithm.text_encoder: set one of them, not both")
        if self.text_encoder and not self.class_concepts:
            raise ValueError("algorithm.class_concepts: expected one concept per class (label order) with algorithm.text_encoder")
        if (self.class_concepts or self.templates) and not self.text_encoder:
            raise ValueError("algorithm.class_concepts / algorithm.templates: expected only with algorithm.text_encoder")
        for template in self.templates:
            if not _one_slot(template):
                raise ValueError(f"algorithm.templates: expected '{{}}' (the concept) exactly once and no other braces (write {{{{ }}}} for literal ones) in every template, got {template!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"algorithm.temperature must be a number > 0, got {self.temperature!r}")
        for key in ("generator_every", "generator_steps", "generator_batch", "generator_width", "pseudo_batch"):
            value = getattr(self, key)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"algorithm.{key} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.generator_lr, (int, float)) and self.generator_lr > 0):
            raise ValueError(f"algorithm.generator_lr must be a number > 0, got {self.generator_lr!r}")
        for key in ("lambda_div", "lambda_dis"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"algorithm.{key} must be a number >= 0, got {value!r}")


def _one_slot(template: object) -> bool:
    """True when `template` is text whose only replacement field is one bare `{}` (so
    `template.format(concept)` fills it once and cannot fail or leave a field unfilled)."""
    if not isinstance(template, str):
        return False
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError:  # an unmatched brace
        return False
    return fields == [("", "", None)]


# --- the generator (pure torch) -------------------------------------------------------------------


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour ×2 by expand (its gradient is a plain sum: deterministic on every device)."""
    b, c, h, w = x.shape
    return x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)


class Upsample2(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample2(x)


class ConceptGenerator(nn.Module):
    """Concept embedding (D) -> image (channels, size, size) in [0, 1]: a linear map to a
    (2w, s, s) grid, s = ⌈size/16⌉, four ×2 upsampling conv blocks, a sigmoid; centre-cropped to size."""

    def __init__(self, code_dim: int, channels: int, size: int, width: int) -> None:
        super().__init__()
        self.size, self.start, self.width = size, -(-size // 16), width
        self.fc = nn.Linear(code_dim, 2 * width * self.start**2)

        def block(cin: int, cout: int, up: bool) -> list[nn.Module]:
            return [*([Upsample2()] if up else []), nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]

        w = width
        layers = block(2 * w, 2 * w, False) + block(2 * w, 2 * w, True) + block(2 * w, 2 * w, True) + block(2 * w, w, True) + block(w, w, True)
        self.body = nn.Sequential(*layers, nn.Conv2d(w, channels, 3, padding=1), nn.Sigmoid())

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.body(self.fc(codes).view(len(codes), 2 * self.width, self.start, self.start))
        top = (x.shape[-1] - self.size) // 2
        return x[:, :, top : top + self.size, top : top + self.size]


def augment(images: torch.Tensor, draw: torch.Generator) -> torch.Tensor:
    """Random crop after PAD pixels of zero padding, then horizontal and vertical flips, each with
    probability ½; one draw for the whole batch (as torchvision's transforms on a batch tensor)."""
    size = images.shape[-2:]
    top, left = (int(v) for v in torch.randint(0, 2 * PAD + 1, (2,), generator=draw))
    flips = torch.rand(2, generator=draw) < 0.5
    out = nn.functional.pad(images, (PAD, PAD, PAD, PAD))[:, :, top : top + size[0], left : left + size[1]]
    if flips[0]:
        out = out.flip(3)
    if flips[1]:
        out = out.flip(2)
    return out


def diversity_loss(codes: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(1/C)·Σ_c mean_{i<j of class c} 1/(‖x_i − x_j‖₁/‖e_i − e_j‖₁ + 10⁻⁵) over the classes with ≥ 2 samples.

    Row by row with slices and masks only (no index gathering, whose CUDA gradient is a
    non-deterministic scatter-add)."""
    flat = images.reshape(len(images), -1)
    sums, pairs = [flat.new_zeros(()) for _ in range(num_classes)], [0.0] * num_classes
    for i in range(len(flat) - 1):
        c = int(labels[i])
        same = (labels[i + 1 :] == c).to(flat.dtype)
        if not same.any():
            continue
        ratio = (flat[i + 1 :] - flat[i]).abs().sum(1) / (codes[i + 1 :] - codes[i]).abs().sum(1)
        sums[c] = sums[c] + (same / (ratio + 1e-5)).sum()
        pairs[c] += float(same.sum())
    return sum((sums[c] / pairs[c] for c in range(num_classes) if pairs[c]), flat.new_zeros(())) / num_classes


class BatchNormStatistics:
    """Forward hooks on the BatchNorm layers (with running statistics) of a model: after a forward,
    `loss()` = Σ_layers ‖var_batch − running_var‖₂ + ‖mean_batch − running_mean‖₂ of their inputs."""

    def __init__(self, model: nn.Module) -> None:
        self.terms: list[torch.Tensor] = []
        layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
        self.handles = [m.register_forward_hook(self._hook) for m in layers]

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0]
        dims = [0, *range(2, x.dim())]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        self.terms.append(torch.linalg.vector_norm(module.running_var - var) + torch.linalg.vector_norm(module.running_mean - mean))

    def loss(self) -> torch.Tensor:
        terms, self.terms = self.terms, []
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def pseudo_data(generator: nn.Module, head: ConceptHead, n: int, draw: torch.Generator, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels, concept embeddings, raw images, augmented normalised inputs) of n pseudo-samples."""
    labels = torch.randint(head.num_classes, (n,), generator=draw)
    codes = sample_concepts(head.stats, labels, draw)
    images = generator(codes)
    return labels.to(images.device), codes, images, (augment(images, draw) - mean) / std


def train_generator(
    generator: nn.Module, model: nn.Module, *, steps: int, batch_size: int, lr: float, lambda_div: float, lambda_dis: float, seed: int, mean: torch.Tensor, std: torch.Tensor
) -> list[float]:
    """`steps` Adam steps of `generator` on the FedBM objective against `model` (frozen, eval mode;
    both on one device); every draw from `seed`. Returns the objective at each step."""
    head = concept_head(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    generator.train()
    optimizer = torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.5, 0.999))
    draw = torch.Generator().manual_seed(seed)
    statistics = BatchNormStatistics(model) if lambda_dis > 0 else None
    objective = []
    try:
        for _ in range(steps):
            labels, codes, images, x = pseudo_data(generator, head, batch_size, draw, mean, std)
            loss = concept_loss(model(x), head, labels)
            if statistics is not None:
                loss = loss + lambda_dis * statistics.loss().to(loss.device)
            if lambda_div > 0:
                loss = loss + lambda_div * diversity_loss(codes, images, labels, head.num_classes)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            objective.append(float(loss.detach()))
    finally:
        if statistics is not None:
            statistics.remove()
    return objective


def split_payload(payload: Tensors) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model tensors, generator state) of a FedBM payload."""
    weights = {k: v for k, v in payload.items() if not k.startswith(PREFIX)}
    return weights, {k[len(PREFIX) :]: v for k, v in payload.items() if k.startswith(PREFIX)}


# --- the method -----------------------------------------------------------------------------------


@register_algorithm("fedbm")
class FedBM(Algorithm):
    """FedAvg with the concept classifier; the server state adds the generator's weights
    (`generator`, empty until its first training) and its last training's objective per step."""
    tasks = ("classification",)  # it replaces a linear classifier head with class concept embeddings
    down_only = PREFIX

    Params = FedBMParams
    params: FedBMParams

    def __init__(self, params: Any, cfg: ExperimentConfig) -> None:
        super().__init__(params, cfg)
        self.server_model: nn.Module | None = None  # the driver's model (init_state): the generator's discriminator
        self.sample_shape: tuple[int, int, int] | None = None  # (channels, size, size) of an input image
        self.client_generator: ConceptGenerator | None = None  # in a client actor: one module, each round's weights loaded
        self.pseudo: ConceptGenerator | None = None  # the generator of the client being trained

    # --- the model ----------------------------------------------------------------------------

    def adapt(self, model: nn.Module, source: DataSource) -> nn.Module:
        stats = concept_stats(self.class_embeddings(source))
        try:
            attach_concept_head(model, stats, float(self.params.temperature))
        except ValueError as err:
            raise ConfigError(f"algorithm fedbm: {err}") from err
        self.sample_shape = (source.channels, source.img_size, source.img_size)
        return model

    def class_embeddings(self, source: DataSource) -> list[Any]:
        p = self.params
        if p.text_encoder:
            return encode_prompts(Path(p.text_encoder).expanduser(), p.class_concepts, p.templates or DEFAULT_TEMPLATES, source.num_classes)
        if p.embeddings == SYNTHETIC or (not p.embeddings and source.name == SYNTHETIC):
            return synthetic_embeddings(source.num_classes, self.cfg.seed)
        if p.embeddings:
            return load_embeddings(Path(p.embeddings).expanduser(), source.num_classes)
        raise ConfigError(
            f"algorithm.embeddings: fedbm needs class-concept embeddings for data.name={source.name}: a .npy / .parquet file or a directory "
            "(format: raysim.algorithms.fedbm_concepts), algorithm.text_encoder=DIR with algorithm.class_concepts, or algorithm.embeddings=synthetic (a seeded stand-in)"
        )

    def new_generator(self, head: ConceptHead) -> ConceptGenerator:
        """G with its initial weights from the seed alone (the caller's RNG state untouched)."""
        if self.sample_shape is None:
            raise RuntimeError("fedbm: the input shape is unknown (build_model sets it)")
        channels, size, _ = self.sample_shape
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(derive_seed(self.cfg.seed, "fedbm", "generator init"))
            return ConceptGenerator(head.mu.shape[1], channels, size, self.params.generator_width)

    # --- server side --------------------------------------------------------------------------

    def init_state(self, model: nn.Module) -> ServerState:
        self.server_model = model
        return {**super().init_state(model), "generator": {}, "generator_objective": []}

    def payload(self, state: ServerState, round_: int) -> Tensors:
        weights = super().payload(state, round_)
        if clash := [k for k in weights if k.startswith(PREFIX)]:
            raise ValueError(f"fedbm: model keys {clash[:3]} clash with the generator prefix {PREFIX!r}")
        return {**weights, **{PREFIX + k: v for k, v in state["generator"].items()}}

    def trains_generator(self, round_: int) -> bool:
        """After every `generator_every`-th round; not after the last (no client would use it)."""
        return round_ % self.params.generator_every == 0 and round_ < self.cfg.federation.rounds

    def finalize(self, round_: int, fold: WeightedSum, state: ServerState) -> ServerState:
        state = super().finalize(round_, fold, state)
        if not self.trains_generator(round_):
            return state
        generator, objective = self.train_generator(round_, state)
        return {**state, "generator": generator, "generator_objective": objective}

    def train_generator(self, round_: int, state: ServerState) -> tuple[dict[str, torch.Tensor], list[float]]:
        """G trained against the global model of `state` on `server_device`; its weights on the CPU."""
        if self.server_model is None:
            raise RuntimeError("fedbm: no server model (init_state sets it)")
        device, p = self.server_device, self.params
        model = copy.deepcopy(self.server_model)
        model.load_state_dict({**model.state_dict(), **state["weights"]})
        model.to(device)
        generator = self.new_generator(concept_head(model))
        if state["generator"]:
            generator.load_state_dict(state["generator"])
        generator.to(device)
        mean, std = (t.to(device) for t in normalization(model, self.sample_shape[0]))  # type: ignore[index]
        objective = train_generator(
            generator,
            model,
            steps=p.generator_steps,
            batch_size=p.generator_batch,
            lr=p.generator_lr,
            lambda_div=p.lambda_div,
            lambda_dis=p.lambda_dis,
            seed=derive_seed(self.cfg.seed, "fedbm", "generator", round_),
            mean=mean,
            std=std,
        )
        return {k: v.detach().cpu().clone() for k, v in generator.state_dict().items()}, objective

    def server_metrics(self, round_: int, state: ServerState) -> dict[str, float]:
        """`generator_loss`: the generator's objective at its last step, in the rounds it trained."""
        objective = state.get("generator_objective") or []
        return {"generator_loss": objective[-1]} if self.trains_generator(round_) and objective else {}

    # --- client side --------------------------------------------------------------------------

    def client_fit(self, client: Client, payload: Tensors, round_: int) -> Update:
        weights, generator = split_payload(payload)
        self.pseudo = self.load_generator(client, generator) if generator else None
        try:
            return super().client_fit(client, weights, round_)
        finally:
            self.pseudo = None

    def load_generator(self, client: Client, state: Mapping[str, torch.Tensor]) -> ConceptGenerator:
        if self.client_generator is None:
            self.client_generator = self.new_generator(concept_head(client.model))
        self.client_generator.load_state_dict(state)
        return self.client_generator.to(client.device).eval()

    def batch_transform(self, client: Client, round_: int) -> Callable[[Batch], Batch] | None:
        """Append `pseudo_batch` pseudo-samples (labels uniform, unknown groups, index −1) to each batch."""
        generator = self.pseudo
        if generator is None:
            return None
        head = concept_head(client.model)
        draw = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "fedbm", "pseudo", round_, client.id))

        def with_pseudo(batch: Batch) -> Batch:
            with torch.no_grad():
                labels, _, _, x = pseudo_data(generator, head, self.params.pseudo_batch, draw, client.mean, client.std)
            unknown = lambda t: torch.cat([t, torch.full((len(labels),), -1, dtype=t.dtype, device=t.device)])  # noqa: E731
            group = unknown(batch.group) if batch.group is not None else None
            return Batch(torch.cat([batch.x, x.to(batch.x.dtype)]), torch.cat([batch.y, labels.to(batch.y)]), {a: unknown(c) for a, c in batch.groups.items()}, unknown(batch.index), group)

        return with_pseudo

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return concept_loss(forward(model, batch), concept_head(model), batch.y)

    def eval_model(self, client: Client, payload: Tensors) -> nn.Module:
        return client.load(split_payload(payload)[0])
