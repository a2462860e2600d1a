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

from raysim import foundation
from raysim.algorithms import fedhelp_public as public_set
from raysim.algorithms.aggregation import WeightedSum
from raysim.algorithms.base import Algorithm, register_algorithm
from raysim.client import Client
from raysim.config import ConfigError, ModelConfig
from raysim.datasets.base import ClientSpec, DataSource, Shard
from raysim.models import build_model, check_weights
from raysim.seeding import derive_seed
from raysim.training import Batch, forward, make_optimizer, train_epochs
from raysim.types import Tensors, Update

TARGETS_FILE = "foundation_targets.parquet"
LARGE = "large"  # client.memory key of a large client's private model (state dict)
ROLES = ("large", "small")


@dataclass
class FedHelpParams:
    top_n: int = 2  # the top_n clients by training examples are large
    small_model: str = "resnet10t"  # timm name of the shared small model (the paper's ResNet-20)
    large_model: str = "resnet50"  # timm name of each large client's private model (the paper's ResNet-110)
    temperature: float = 1.0  # T of every KD term (each is scaled by T², Hinton et al.)
    kd_public: float = 1.0  # small clients: weight of KL(p_FM || public head) on public batches
    kd_forward: float = 1.0  # large clients: weight of KL(large || proxy) in the proxy's loss
    kd_backward: float = 1.0  # large clients: weight of KL(proxy || large) in the large model's loss
    lambda_rank: float = 0.2  # large clients: weight of the ranking loss on the proxy's top-k classes
    top_k: int | None = None  # classes the ranking loss protects; None: 1 for binary tasks, else min(5, K - 1)
    margin: float = 0.0  # ranking margin
    public: dict[str, Any] | None = None  # where D_pub comes from (fedhelp_public); null: the synthetic public population
    large_weights: str | None = None  # local weights file of the large model (model.weights is the small model's)
    weighting: str = "uniform"  # server mean of the uploads: "uniform" (the paper's code) or "examples" (FedAvg)
    foundation: dict[str, Any] = field(default_factory=lambda: {"backend": "timm", "model": "resnet50"})
    # `backend` (timm / callable / http) plus its options (raysim.foundation); timm without
    # `weights` uses the backbone `python -m raysim.pretrain` builds on the synthetic public pool.
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


class Pair(nn.Module):
    """A large client's proxy and private large model, trained in one loop with one optimizer:
    each loss reaches only its own model (the other's logits are detached), so one step over
    both parameter sets equals the two separate steps."""

    def __init__(self, proxy: nn.Module, large: nn.Module) -> None:
        super().__init__()
        self.proxy, self.large = proxy, large


# --- the losses (pure) --------------------------------------------------------------------------


def kd(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) || softmax(student/T)), mean over the batch."""
    target = F.softmax(teacher_logits / temperature, dim=1)
    return temperature**2 * F.kl_div(F.log_softmax(student_logits / temperature, dim=1), target, reduction="batchmean")


def rank_loss(large_logits: torch.Tensor, proxy_logits: torch.Tensor, k: int, margin: float = 0.0) -> torch.Tensor:
    """mean_b (1/2k) Σ_{i∈Top} Σ_{j∉Top} ReLU(z_L[j] − z_L[i] + margin), Top = the proxy's top-k classes."""
    top = proxy_logits.topk(k, dim=1).indices
    in_top = torch.zeros_like(large_logits, dtype=torch.bool).scatter(1, top, True)
    top_scores = large_logits.gather(1, top)  # (B, k)
    others = large_logits.masked_fill(in_top, float("-inf"))  # (B, K); excluded classes give ReLU(-inf) = 0
    pairs = F.relu(others.unsqueeze(1) - top_scores.unsqueeze(2) + margin)  # (B, k, K)
    return pairs.sum(dim=(1, 2)).mean() / (2 * k)


def forward_kd_loss(proxy_logits: torch.Tensor, large_logits: torch.Tensor, y: torch.Tensor, p: FedHelpParams) -> torch.Tensor:
    """Large -> proxy: CE + KD from the detached large model; trains the proxy only."""
    return F.cross_entropy(proxy_logits, y) + p.kd_forward * kd(large_logits.detach(), proxy_logits, p.temperature)


def backward_kd_loss(proxy_logits: torch.Tensor, large_logits: torch.Tensor, y: torch.Tensor, p: FedHelpParams, k: int) -> torch.Tensor:
    """Proxy -> large: CE + KD from the detached proxy + ranking on its top-k; trains the large model only."""
    teacher = proxy_logits.detach()
    return F.cross_entropy(large_logits, y) + p.kd_backward * kd(teacher, large_logits, p.temperature) + p.lambda_rank * rank_loss(large_logits, teacher, k, p.margin)


def public_kd_loss(public_logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(p_FM || softmax(public head / T)) against the stored foundation-model targets."""
    return temperature**2 * F.kl_div(F.log_softmax(public_logits / temperature, dim=1), targets, reduction="batchmean")


@register_algorithm("fedhelp")
class FedHelp(Algorithm):
    tasks = ("classification",)  # its knowledge distillation exchanges class probabilities (the segmentation variant is future work)
    Params = FedHelpParams

    # --- the model and the clients ---------------------------------------------------------------

    def build_model(self, source: DataSource) -> nn.Module:
        """The shared small model with its public head (the `model` section's size and weights)."""
        if source.volume_slices:
            raise ConfigError("algorithm fedhelp works on 2D images; choose a 2D modality (e.g. data.modality=slo_fundus)")
        small = build_model(self._small_cfg(), num_classes=source.num_classes, in_chans=source.channels, seed=self.cfg.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.cfg.seed, "public_head"))
            return DualHead(small, source.num_classes)

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
        the foundation model, once per run (a resume reads the file)."""
        for key, model_cfg in (("model.weights", self._small_cfg()), ("algorithm.large_weights", self._large_cfg())):
            check_weights(key, model_cfg, num_classes=source.num_classes, in_chans=source.channels)
        held_out = getattr(self, "held_out", None)  # set by arrange_clients
        public = public_set.resolve(self.params.public, source, held_out)
        clients = None if held_out is not None else public_set.pool_of(source, f"{source.name}, the run's data")
        public_set.check_disjoint(public, clients, public_set.foundation_pool(self.params.foundation, self.cfg.model.img_size))
        shard, ids = public.load(source)
        echo(f"fedhelp: public set D_pub: {public.description} ({len(ids)} images, outside the clients)")
        path = run_dir / TARGETS_FILE
        if not path.exists():
            echo(f"fedhelp: asking the foundation model ({self.params.foundation.get('backend')}) once for {len(ids)} public images")
        targets = foundation.soft_targets(path, lambda: self._foundation(source, echo), shard.images, ids, source.num_classes)
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
        private = F.cross_entropy(forward(model, batch), batch.y)
        return private + self.params.kd_public * public_kd_loss(model.public_logits(public.x), targets, self.params.temperature)

    def _large_loss(self, pair: nn.Module, batch: Batch, k: int) -> torch.Tensor:
        proxy_logits, large_logits = forward(pair.proxy, batch), forward(pair.large, batch)
        return forward_kd_loss(proxy_logits, large_logits, batch.y, self.params) + backward_kd_loss(proxy_logits, large_logits, batch.y, self.params, k)

    def _large(self, client: Client) -> nn.Module:
        """The actor's large network holding this client's private weights (fresh at first use)."""
        if self._large_net is None:
            cfg = self._large_cfg()
            self._large_net = build_model(cfg, num_classes=self.source.num_classes, in_chans=self.source.channels, seed=derive_seed(self.cfg.seed, "large"), weights_key="algorithm.large_weights").to(client.device)
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
        classes = self.source.num_classes
        return self.params.top_k or (1 if classes == 2 else min(5, classes - 1))

    def _small_cfg(self) -> ModelConfig:
        return dataclasses.replace(self.cfg.model, name=self.params.small_model)  # model.weights is the small model's

    def _large_cfg(self) -> ModelConfig:
        return dataclasses.replace(self.cfg.model, name=self.params.large_model, weights=self.params.large_weights)

    def _foundation(self, source: DataSource, echo: Callable[[str], None]) -> foundation.FoundationModel:
        options = dict(self.params.foundation)
        backend = options.pop("backend")
        if backend == "timm" and "weights" not in options:
            if source.name not in ("synthetic", "fairfedmed_oph"):
                raise ConfigError(
                    f"algorithm.foundation: the built-in foundation model knows the synthetic glaucoma task only, not {source.name}; "
                    "give it weights ({backend: timm, model: NAME, weights: PATH}), a callable or an http endpoint"
                )
            from raysim.pretrain import ensure_pretrained

            options["weights"] = str(ensure_pretrained(dataclasses.replace(self.cfg.model, name=options.get("model", "resnet50"), weights=None), echo=echo))
            options.setdefault("img_size", self.cfg.model.img_size)
        return foundation.build_foundation_model(backend, options)

    # --- server side --------------------------------------------------------------------------------

    def accumulate(self, fold: WeightedSum, update: Update) -> None:
        weight = 1.0 if self.params.weighting == "uniform" else float(update.num_examples)
        fold.add(update.tensors, weight, update.client_id)
