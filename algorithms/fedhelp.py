"""FedHelp (Wang et al., KDD 2025): asymmetric reciprocity between large and small clients.

The `top_n` clients with the most training examples are `large`, the rest `small`. One small
model travels through the server. Small clients train it on their data (private head) and on
a public set labelled once by a foundation model (public head, KL to its soft targets).
Large clients keep a private large model that never leaves their actor; each round they
distil it into the received small model (the proxy: CE + KD, large detached) and the proxy
back into it (CE + KD + ranking on the proxy's top-k classes, proxy detached), and upload
the proxy only. Large clients are scored with their large model, small ones with the global
small model. Rules and defaults: specs/fedhelp.md.

The public set D_pub comes from outside the clients (`algorithm.public`, see
`fedhelp_public`): the clients keep exactly the training rows FedAvg would give them. The
foundation model labels D_pub once per run into `foundation_targets.parquet` in the run
directory, which every later round and a resumed run reuse. `model.weights` is the small
model's file, `large_weights` the large model's; a file that does not fit its network fails
in the driver, before any actor starts.

Segmentation (`model.name=unet:<encoder>`, specs/fedhelp.md "Segmentation variant"): both
networks are U-Nets of the run's mask classes (`small_model` defaults to `model.name`,
`large_model` to `unet:resnet50`; a classifier there is a ConfigError); the supervised term is
the task's (`raysim.client.training.supervised_loss`: CE + soft Dice); every KD term, the ranking loss
included, is taken per pixel (softmax over the class dimension, mean over pixels and batch,
T² as for classification), so the backward step stays CE + KD + ranking as the spec's
asymmetry asks. The public head is a second segmentation head on the U-Net's decoder, and the
foundation model answers per-pixel probability maps (N, K, H, W) (`foundation_maps.npz`);
a backend that answers per image only (timm) turns the small clients' FM term off
(kd_public = 0, no public set loaded) and the run says so in one line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import raysim.algorithms.fedhelp_public as public_set
from raysim.algorithms.aggregation import WeightedSum
from raysim.algorithms.base import Algorithm, register_algorithm
from raysim.client.client import Client
from raysim.client.training import Batch, cross_entropy, forward, make_optimizer, supervised_loss, train_epochs
from raysim.config import ConfigError, ModelConfig
from raysim.datasets.base import ClientSpec, DataSource, Shard
from raysim.models import foundation
from raysim.models.backbones import build_model, check_weights, model_task
from raysim.seeding import derive_seed
from raysim.types import Tensors, Update

TARGETS_FILE = "foundation_targets.parquet"
MAPS_FILE = "foundation_maps.npz"  # segmentation: the foundation model's per-pixel maps
# Where each task keeps the foundation model's answers and how it asks (once per run).
TARGETS = {"classification": (TARGETS_FILE, foundation.soft_targets), "segmentation": (MAPS_FILE, foundation.soft_target_maps)}
LARGE = "large"  # client.memory key of a large client's private model (state dict)
ROLES = ("large", "small")
# The (small, large) pair when algorithm.small_model / large_model are null, by task, from model.name:
# the paper's ResNet-20 / ResNet-110 stand-ins; segmenting, the run's U-Net and one on resnet50.
DEFAULT_MODELS: dict[str, Callable[[str], tuple[str, str]]] = {
    "classification": lambda run_model: ("resnet10t", "resnet50"),
    "segmentation": lambda run_model: (run_model, f"{run_model.partition(':')[0]}:resnet50"),
}


@dataclass
class FedHelpParams:
    top_n: int = 2  # the top_n clients by training examples are large
    small_model: str | None = None  # the shared small model (the paper's ResNet-20); None: resnet10t, or model.name when segmenting
    large_model: str | None = None  # each large client's private model (the paper's ResNet-110); None: resnet50, or unet:resnet50 when segmenting
    temperature: float = 1.0  # T of every KD term (each is scaled by T², Hinton et al.)
    kd_public: float = 1.0  # small clients: weight of KL(p_FM || public head) on public batches
    kd_forward: float = 1.0  # large clients: weight of KL(large || proxy) in the proxy's loss
    kd_backward: float = 1.0  # large clients: weight of KL(proxy || large) in the large model's loss
    lambda_rank: float = 0.2  # large clients: weight of the ranking loss on the proxy's top-k classes (per pixel when segmenting)
    top_k: int | None = None  # classes the ranking loss protects; None: 1 for binary tasks, else min(5, K - 1) (K: classes or mask classes)
    margin: float = 0.0  # ranking margin
    public: dict[str, Any] | None = None  # where D_pub comes from (fedhelp_public); null: the synthetic public population
    large_weights: str | None = None  # local weights file of the large model (model.weights is the small model's)
    weighting: str = "uniform"  # server mean of the uploads: "uniform" (the paper's code) or "examples" (FedAvg)
    foundation: dict[str, Any] = field(default_factory=lambda: {"backend": "timm", "model": "resnet50"})
    # `backend` (timm / callable / http) plus its options (raysim.models.foundation); timm without
    # `weights` uses the backbone `python -m raysim.pretrain` builds on the synthetic public pool.
    # Segmentation needs a backend that answers per-pixel maps (callable, http); timm turns the FM term off.
    public_fraction: None = field(default=None, repr=False)  # removed: it took D_pub from the clients' rows

    def __post_init__(self) -> None:
        if self.top_n < 1:
            raise ValueError(f"algorithm.top_n must be >= 1, got {self.top_n}")
        if self.temperature <= 0:
            raise ValueError(f"algorithm.temperature must be > 0, got {self.temperature}")
        for key in ("kd_public", "kd_forward", "kd_backward", "lambda_rank", "margin"):
            if getattr(self, key) < 0:
                raise ValueError(f"algorithm.{key} must be >= 0, got {getattr(self, key)}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"algorithm.top_k must be >= 1 or null, got {self.top_k}")
        if self.public_fraction is not None:
            raise ValueError(
                "algorithm.public_fraction was removed (it carved the public set out of the clients' private training rows); "
                f"use algorithm.public instead: null (the synthetic public population) or {public_set.FORMS}"
            )
        public_set.check_option(self.public)
        if self.weighting not in ("uniform", "examples"):
            raise ValueError(f"algorithm.weighting must be 'uniform' or 'examples', got {self.weighting!r}")
        options = dict(self.foundation)
        backend = options.pop("backend", None)
        if backend is None:
            raise ValueError("algorithm.foundation needs a 'backend' (timm, callable or http) and its options")
        if backend not in foundation.FOUNDATION_MODELS:  # its options are checked in the driver, before any training
            raise ValueError(f"algorithm.foundation: {foundation.FOUNDATION_MODELS.unknown_message(backend)}")

    def check_config(self, cfg: Any) -> None:
        """Keys that must agree with the rest of the config (`ExperimentConfig.validate`, before Ray)."""
        site = self.public.get("site") if isinstance(self.public, dict) else None
        if site is not None and site == cfg.eval.holdout_site:
            raise ValueError(
                f"eval.holdout_site={site} and algorithm.public={{site: {site}}} name the same client: it cannot be both the unseen test site "
                "and FedHelp's public set; hold out another site or take the public set from another"
            )


class DualHead(nn.Module):
    """A timm network (its head is the private head) plus a public head on the same features."""

    def __init__(self, net: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.net = net
        self.pretrained_cfg = getattr(net, "pretrained_cfg", {})
        self.public_head = nn.Linear(net.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def public_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.public_head(self.net.forward_head(self.net.forward_features(x), pre_logits=True))


class MapDualHead(nn.Module):
    """A U-Net (its segmentation head is the private head) plus a public segmentation head of the
    same shape on the decoder's output: per-pixel logits for the foundation model's maps."""

    def __init__(self, net: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.net = net
        self.pretrained_cfg = getattr(net, "pretrained_cfg", {})
        private = next(m for m in net.get_classifier().modules() if isinstance(m, nn.Conv2d))
        self.public_head = nn.Conv2d(private.in_channels, num_classes, private.kernel_size, padding=private.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def public_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.public_head(self.net.decoder(self.net.encoder(x)))


WITH_PUBLIC_HEAD: dict[str, type[nn.Module]] = {"classification": DualHead, "segmentation": MapDualHead}  # by task


class Pair(nn.Module):
    """A large client's proxy and private large model, trained in one loop with one optimizer:
    each loss reaches only its own model (the other's logits are detached), so one step over
    both parameter sets equals the two separate steps."""

    def __init__(self, proxy: nn.Module, large: nn.Module) -> None:
        super().__init__()
        self.proxy, self.large = proxy, large


# --- the losses (pure) --------------------------------------------------------------------------
# Each takes logits (B, K) of a classifier or (B, K, H, W) of a segmenter: a map is scored per
# pixel, as if every pixel were a sample (`per_pixel`), so its terms are means over the batch
# and the pixels. The supervised term is the task's (`supervised_loss`: CE, or CE + soft Dice).


def per_pixel(scores: torch.Tensor) -> torch.Tensor:
    """(B, K) as it is; a map (B, K, H, W) as one row per pixel (B·H·W, K), classes last."""
    return scores if scores.dim() == 2 else scores.movedim(1, -1).reshape(-1, scores.shape[1])


def kd(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) || softmax(student/T)), mean over the batch (and pixels)."""
    teacher_logits, student_logits = per_pixel(teacher_logits), per_pixel(student_logits)
    target = F.softmax(teacher_logits / temperature, dim=1)
    return temperature**2 * F.kl_div(F.log_softmax(student_logits / temperature, dim=1), target, reduction="batchmean")


def rank_loss(large_logits: torch.Tensor, proxy_logits: torch.Tensor, k: int, margin: float = 0.0) -> torch.Tensor:
    """mean_b (1/2k) Σ_{i∈Top} Σ_{j∉Top} ReLU(z_L[j] − z_L[i] + margin), Top = the proxy's top-k
    classes (per pixel for maps: the mean is over the batch's pixels)."""
    large_logits, proxy_logits = per_pixel(large_logits), per_pixel(proxy_logits)
    top = proxy_logits.topk(k, dim=1).indices
    in_top = torch.zeros_like(large_logits, dtype=torch.bool).scatter(1, top, True)
    top_scores = large_logits.gather(1, top)  # (B, k)
    others = large_logits.masked_fill(in_top, float("-inf"))  # (B, K); excluded classes give ReLU(-inf) = 0
    pairs = F.relu(others.unsqueeze(1) - top_scores.unsqueeze(2) + margin)  # (B, k, K)
    return pairs.sum(dim=(1, 2)).mean() / (2 * k)


def forward_kd_loss(proxy_logits: torch.Tensor, large_logits: torch.Tensor, batch: Batch, p: FedHelpParams) -> torch.Tensor:
    """Large -> proxy: supervised + KD from the detached large model; trains the proxy only."""
    return supervised_loss(proxy_logits, batch) + p.kd_forward * kd(large_logits.detach(), proxy_logits, p.temperature)


def backward_kd_loss(proxy_logits: torch.Tensor, large_logits: torch.Tensor, batch: Batch, p: FedHelpParams, k: int) -> torch.Tensor:
    """Proxy -> large: supervised + KD from the detached proxy + ranking on its top-k; trains the large model only."""
    teacher = proxy_logits.detach()
    return supervised_loss(large_logits, batch) + p.kd_backward * kd(teacher, large_logits, p.temperature) + p.lambda_rank * rank_loss(large_logits, teacher, k, p.margin)


def public_kd_loss(public_logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(p_FM || softmax(public head / T)) against the stored foundation-model targets
    (probabilities (B, K), or maps (B, K, H, W) compared per pixel)."""
    return temperature**2 * F.kl_div(F.log_softmax(per_pixel(public_logits) / temperature, dim=1), per_pixel(targets), reduction="batchmean")


@register_algorithm("fedhelp")
class FedHelp(Algorithm):
    tasks = ("classification", "segmentation")  # segmentation: per-pixel KD (module docstring)
    Params = FedHelpParams

    def __init__(self, params: FedHelpParams, cfg: Any) -> None:
        super().__init__(params, cfg)
        if getattr(cfg, "model", None) is not None:  # a config built for the server step alone has none
            self._check_models()

    def _check_models(self) -> None:
        """Both networks make the run's task (the task is model.name's; a segmenting pair shares its
        mask classes, as both are built with the task's output size): a ConfigError otherwise."""
        task, run_model = self.task.name, self.cfg.model.name
        for key, name in (("small_model", self._small_name()), ("large_model", self._large_name())):
            made = model_task(name)
            if made != task:
                example = DEFAULT_MODELS[task](run_model)[key == "large_model"]
                raise ConfigError(
                    f"algorithm.{key}={name} is a {made} model, but model.name={run_model} makes this a {task} run: "
                    f"FedHelp's {key.split('_')[0]} model must be a {task} model{' of the same mask classes' if task == 'segmentation' else ''} (e.g. {example})"
                )
            if task == "segmentation":
                from raysim.models.segmentation import split_segmentation_name  # segmentation-models-pytorch loads only here

                split_segmentation_name(name)  # an unknown encoder fails here, before training

    # --- the model and the clients ---------------------------------------------------------------

    def build_model(self, source: DataSource) -> nn.Module:
        """The shared small model with its public head (the `model` section's size and weights)."""
        if source.volume_slices:
            raise ConfigError("algorithm fedhelp works on 2D images; choose a 2D modality (e.g. data.modality=slo_fundus)")
        self.task.check(source, self.cfg)
        classes = self.task.output_size(source)
        small = build_model(self._small_cfg(), num_classes=classes, in_chans=source.channels, seed=self.cfg.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.cfg.seed, "public_head"))
            return WITH_PUBLIC_HEAD[self.task.name](small, classes)

    def communicated(self, model: nn.Module) -> list[str]:
        return [k for k in super().communicated(model) if not k.startswith("public_head.")]  # h_pub stays with its client

    def arrange_clients(self, specs: list[ClientSpec]) -> list[ClientSpec]:
        """Rank the clients: top_n large, the rest small. Their rows are untouched; only a site
        named by `algorithm.public: {site: ID}` leaves the run (its rows become D_pub)."""
        specs, self.held_out = public_set.hold_out_site(self.params.public, specs)
        if self.params.top_n >= len(specs):
            raise ConfigError(f"algorithm.top_n={self.params.top_n} leaves no small client among {len(specs)} clients; choose at most {len(specs) - 1}")
        ranked = sorted(specs, key=lambda s: (-s.num_train, s.id))
        large = {s.id for s in ranked[: self.params.top_n]}
        return [dataclasses.replace(s, role="large" if s.id in large else "small") for s in specs]

    def prepare_run(self, source: DataSource, specs: list[ClientSpec], run_dir: Path, echo: Callable[[str], None]) -> dict[str, Any]:
        """Check both models' weights files, find D_pub and check it is public, then label it with
        the foundation model, once per run (a resume reads the file). Segmenting without a
        foundation model that answers per-pixel maps: no D_pub, the FM term is off."""
        classes = self.task.output_size(source)
        for key, model_cfg in (("model.weights", self._small_cfg()), ("algorithm.large_weights", self._large_cfg())):
            check_weights(key, model_cfg, num_classes=classes, in_chans=source.channels)
        if self.task.name == "segmentation" and self.params.large_weights:  # U-Net encoder weights are checked by loading them
            build_model(self._large_cfg(), num_classes=classes, in_chans=source.channels, seed=0, weights_key="algorithm.large_weights")
        backend = self.params.foundation.get("backend")
        if self.task.name == "segmentation" and not foundation.FOUNDATION_MODELS.get(backend).answers_maps:
            echo(
                f"fedhelp: the foundation model (backend {backend}) answers one class distribution per image, not per-pixel maps: "
                "the small clients' FM term is off (kd_public = 0) and no public set is loaded; a callable or http backend answering (N, K, H, W) maps turns it on"
            )
            return {"public": None, "targets": None}
        held_out = getattr(self, "held_out", None)  # set by arrange_clients
        public = public_set.resolve(self.params.public, source, held_out)
        clients = None if held_out is not None else public_set.pool_of(source, f"{source.name}, the run's data")
        public_set.check_disjoint(public, clients, public_set.foundation_pool(self.params.foundation, self.cfg.model.img_size))
        shard, ids = public.load(source)
        echo(f"fedhelp: public set D_pub: {public.description} ({len(ids)} images, outside the clients)")
        file, ask = TARGETS[self.task.name]
        path = run_dir / file
        if not path.exists():
            echo(f"fedhelp: asking the foundation model ({backend}) once for {len(ids)} public images")
        targets = ask(path, lambda: self._foundation(source, echo), shard.images, ids, classes)
        return {"public": public, "targets": targets.astype(np.float32)}

    def attach(self, source: DataSource, context: dict[str, Any]) -> None:
        super().attach(source, context)
        self.source = source
        self._public: Shard | None = None
        self._large_net: nn.Module | None = None

    # --- client side --------------------------------------------------------------------------------

    def client_fit(self, client: Client, payload: Tensors, round_: int) -> Update:
        model = client.load(payload)
        fed = self.cfg.federation
        epochs = client.train_epochs(round_, fed.local_epochs, fed.batch_size, self.cfg.seed)
        if client.spec.role == "large":
            large = self._large(client)
            pair = Pair(model, large)
            k = self._top_k(client)
            stats = train_epochs(pair, epochs, make_optimizer(pair, fed), loss_fn=lambda m, b: self._large_loss(m, b, k))
            client.memory[LARGE] = {key: v.detach().clone() for key, v in large.state_dict().items()}
        elif self.context.get("public") is None:  # segmenting without a map-answering foundation model: kd_public = 0
            stats = train_epochs(model, epochs, make_optimizer(model, fed), loss_fn=cross_entropy)  # the task's supervised loss alone
        else:
            self._public_stream = self._public_batches(client, round_)
            stats = train_epochs(model, epochs, make_optimizer(model, fed), loss_fn=self._small_loss)
        state = model.state_dict()
        client.keep(set(state) - set(payload))
        return Update(client.id, {k: state[k].detach().cpu().clone() for k in payload}, client.num_train, stats)

    def eval_model(self, client: Client, payload: Tensors) -> nn.Module:
        return self._large(client) if client.spec.role == "large" else client.load(payload)

    def _small_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        public, targets = next(self._public_stream)
        private = supervised_loss(forward(model, batch), batch)
        return private + self.params.kd_public * public_kd_loss(model.public_logits(public.x), targets, self.params.temperature)

    def _large_loss(self, pair: nn.Module, batch: Batch, k: int) -> torch.Tensor:
        proxy_logits, large_logits = forward(pair.proxy, batch), forward(pair.large, batch)
        return forward_kd_loss(proxy_logits, large_logits, batch, self.params) + backward_kd_loss(proxy_logits, large_logits, batch, self.params, k)

    def _large(self, client: Client) -> nn.Module:
        """The actor's large network holding this client's private weights (fresh at first use)."""
        if self._large_net is None:
            cfg = self._large_cfg()
            classes = self.task.output_size(self.source)
            self._large_net = build_model(cfg, num_classes=classes, in_chans=self.source.channels, seed=derive_seed(self.cfg.seed, "large"), weights_key="algorithm.large_weights").to(client.device)
            self._large_init = {k: v.detach().clone() for k, v in self._large_net.state_dict().items()}
        self._large_net.load_state_dict(client.memory.get(LARGE, self._large_init))
        return self._large_net

    def _public_batches(self, client: Client, round_: int) -> Iterator[tuple[Batch, torch.Tensor]]:
        """Endless public batches with their targets, reshuffled each pass, seeded by (seed, round, client)."""
        targets = torch.from_numpy(np.array(self.context["targets"]))  # a writable copy of the shared array
        if self._public is None:  # D_pub is public: each actor reads it from its own source
            self._public, _ = self.context["public"].load(self.source)
            if len(self._public.table) != len(targets):
                raise RuntimeError(f"FedHelp: this actor read {len(self._public.table)} public images, the driver labelled {len(targets)}")
        n, size = len(targets), self.cfg.federation.batch_size
        for epoch in range(1_000_000):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(self.cfg.seed, "public", round_, client.id, epoch)))
            for start in range(0, n - min(size, n) + 1, size):
                index = order[start : start + size]
                yield client.batch_of(self._public, index), targets[index].to(client.device)

    def _top_k(self, client: Client) -> int:
        classes = self.task.output_size(self.source)  # segmentation: the mask classes, ranked per pixel
        return self.params.top_k or (1 if classes == 2 else min(5, classes - 1))

    def _small_name(self) -> str:
        return self.params.small_model or DEFAULT_MODELS[self.task.name](self.cfg.model.name)[0]

    def _large_name(self) -> str:
        return self.params.large_model or DEFAULT_MODELS[self.task.name](self.cfg.model.name)[1]

    def _small_cfg(self) -> ModelConfig:
        return dataclasses.replace(self.cfg.model, name=self._small_name())  # model.weights is the small model's

    def _large_cfg(self) -> ModelConfig:
        return dataclasses.replace(self.cfg.model, name=self._large_name(), weights=self.params.large_weights)

    def _foundation(self, source: DataSource, echo: Callable[[str], None]) -> foundation.FoundationModel:
        options = dict(self.params.foundation)
        backend = options.pop("backend")
        if backend == "timm" and "weights" not in options:
            if source.name not in ("synthetic", "fairfedmed_oph"):
                raise ConfigError(
                    f"algorithm.foundation: the built-in foundation model knows the synthetic glaucoma task only, not {source.name}; "
                    "give it weights ({backend: timm, model: NAME, weights: PATH}), a callable or an http endpoint"
                )
            from raysim.client.pretraining import ensure_pretrained

            options["weights"] = str(ensure_pretrained(dataclasses.replace(self.cfg.model, name=options.get("model", "resnet50"), weights=None), echo=echo))
            options.setdefault("img_size", self.cfg.model.img_size)
        return foundation.build_foundation_model(backend, options)

    # --- server side --------------------------------------------------------------------------------

    def accumulate(self, fold: WeightedSum, update: Update) -> None:
        weight = 1.0 if self.params.weighting == "uniform" else float(update.num_examples)
        fold.add(update.tensors, weight, update.client_id)
