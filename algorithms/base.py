"""The Algorithm base class: FedAvg behaviour, with hooks each method overrides.

Server half (driver): `sample_clients`, `init_state`, `payload` (tensors) with `round_values`
(small non-tensor values, e.g. FedFB's group weights), and the server step as a fold over the round's
updates: `fold_start` -> `accumulate` (once per update, in sorted client order, each update
dropped right after) -> `finalize`. The server therefore holds one accumulator, never the
cohort. A method whose weights need cohort-wide numbers (FairFed's global gap) sets
`round_statistics` and gets every sampled client's `client_statistics` (small values) in
`fold_start`, before any update arrives. Client half (inside the client's actor):
`receive` (the round's values), `client_fit` with `trained_keys` (a round-dependent subset of
what is trained and sent up), `batch_transform`, `loss`, `after_step`, `eval_model`. Clients send
small non-tensor values up in `Update.extra`. After each round the driver writes
`server_metrics` (e.g. privacy spent) as `client=server` rows and asks `stop_before` whether
the next round may run. Server-side computation (a generator, DP noise) runs in the driver
actor, on `server_device`. A method subclasses this and overrides only the steps that
differ; hyperparameters are a dataclass in `Params`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from raysim.algorithms.aggregation import WeightedSum
from raysim.client import tasks
from raysim.client.training import Batch, cross_entropy, make_optimizer, only_trainable, train_epochs
from raysim.config import ConfigError
from raysim.models.backbones import build_model, exchangeable_keys
from raysim.models.kinds import is_clip_model
from raysim.registry import Registry
from raysim.seeding import derive_seed, rng
from raysim.types import Tensors, Update, nbytes

if TYPE_CHECKING:
    from raysim.client.client import Client
    from raysim.config import ExperimentConfig
    from raysim.datasets.base import ClientSpec, DataSource

ServerState = dict[str, Any]
HOLDOUT = "holdout"  # the role of the `eval.holdout_site` client: its spec, predictions and metric rows


@dataclass
class NoParams:
    """This method has no hyperparameters of its own."""


class Algorithm:
    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    # Adapter methods adapt a pretrained backbone: without model.weights / model.pretrained
    # the run uses the synthetic public-pool backbone built by `python -m raysim.pretrain`.
    needs_pretrained: ClassVar[bool] = False
    # An adapter method (needs_pretrained) that runs on a `clip:` host with its CLIP prompt head
    # (`build_host`); the others refuse a CLIP host in one line.
    on_clip: ClassVar[bool] = False
    # True: before each round's training, every sampled client's `client_statistics` reaches
    # `fold_start` (a light pass over the cohort; one extra call per actor).
    round_statistics: ClassVar[bool] = False
    # True: clients train asynchronously in simulated time (FedBuff, FedAsync): a round is one
    # server step over the updates the clock (`raysim.systems.AsyncClock`) says arrived, each
    # trained on the version it downloaded (`version_payload`); needs `system.simulate`.
    asynchronous: ClassVar[bool] = False
    # Payload keys under this prefix go down to the clients and never come back (FedRDN's
    # statistics, FedBM's generator, pFL-ResFIM's amplitude bank): not in `update_bytes`.
    down_only: ClassVar[str] = ""
    # The tasks (raysim.client.tasks) the method supports: one that needs class probabilities or a
    # classification head lists only "classification", and refuses a segmentation model (one
    # ConfigError line, before anything starts).
    tasks: ClassVar[tuple[str, ...]] = ("classification", "segmentation", "joint")
    # Where the server step runs (in the driver actor): the driver sets it from
    # resources.driver_gpus; server-side training (FedBM's generator) puts its tensors here.
    server_device: torch.device = torch.device("cpu")
    # Where the default fold (`fold_start`'s WeightedSum) sums: the driver's GPU with
    # resources.gpu_fold, else the CPU. Methods with folds of their own sum on the CPU.
    fold_device: torch.device = torch.device("cpu")
    # What an unseen site (`eval.holdout_site`: it never trains and shares nothing) is scored
    # with, in words: the console and README say it; `newcomer_model` builds it. None: the method
    # has no model for a site that never trained and refuses a holdout site in one line.
    newcomer: ClassVar[str | None] = "the global model as the server holds it (any part the server never holds at its initial value)"

    def __init__(self, params: Any, cfg: ExperimentConfig) -> None:
        self.params = params
        self.cfg = cfg
        # Classification, or segmentation / joint for a U-Net model. A method built for its server
        # step alone (a config without a model section, as the server-step tests do) classifies.
        model = getattr(cfg, "model", None)
        self.task = tasks.task_of(model) if model is not None else tasks.get("classification")
        if self.task.name not in self.tasks:
            supported = sorted(n for n in ALGORITHMS.names() if self.task.name in ALGORITHMS.get(n).tasks)
            raise ConfigError(f"algorithm {self.name} does not support the {self.task.name} task (model.name={cfg.model.name}); methods that do: {', '.join(supported)}")
        if model is not None and is_clip_model(model.name):
            from raysim.models.clip import check_host  # open_clip loads only for a CLIP host

            check_host(model)  # before any actor starts
        if model is not None and is_clip_model(model.name) and self.needs_pretrained and not self.on_clip:
            raise ConfigError(f"algorithm {self.name} on model.name={model.name}: this adapter method has no CLIP prompt head; on a CLIP host run fedlora, fairlora, promptfl, fedotp or a full fine-tuning method (e.g. fedavg)")
        self.received: dict[str, Any] = {}  # in a client actor: the values sent with the current payload
        self._check_system(getattr(cfg, "system", None))
        holdout = getattr(getattr(cfg, "eval", None), "holdout_site", None)
        if holdout is not None and self.newcomer is None:
            raise ConfigError(
                f"algorithm {self.name} has no model for a site that never trained, so eval.holdout_site={holdout} cannot be scored; choose a method with a global model (e.g. fedavg) or drop eval.holdout_site"
            )

    def _check_system(self, system: Any) -> None:
        """Asynchronous methods need the simulated clock; its asynchronous and synchronous keys
        go with their kind of method (one line each, before anything starts)."""
        if system is None:
            return
        if self.asynchronous and not system.simulate:
            raise ConfigError(f"algorithm {self.name} trains asynchronously in simulated time: set system.simulate=true (the system.* keys say how fast and how available each client is)")
        if not self.asynchronous and system.concurrency is not None:
            asynchronous = sorted(n for n in ALGORITHMS.names() if ALGORITHMS.get(n).asynchronous)
            raise ConfigError(f"system.concurrency={system.concurrency} is for asynchronous methods ({', '.join(asynchronous)}); algorithm {self.name} runs synchronous rounds (drop system.concurrency)")
        if self.asynchronous and (system.round_deadline_s is not None or system.over_select > 0):
            key = "system.round_deadline_s" if system.round_deadline_s is not None else "system.over_select"
            raise ConfigError(f"{key} applies to synchronous rounds; algorithm {self.name} is asynchronous (its rounds end when its buffer is full): drop {key}")

    # --- what travels -------------------------------------------------------------------------

    def communicated(self, model: nn.Module) -> list[str]:
        """State-dict keys exchanged with the server: trainable parameters and live float buffers."""
        return exchangeable_keys(model)

    # --- the model ----------------------------------------------------------------------------

    def build_model(self, source: DataSource) -> nn.Module:
        """The model every client and the server start from (same seed: the same everywhere)."""
        model = self.build_host(source)
        # Adapters draw initial values (LoRA's A, FairLoRA's B): from the seed alone, not from
        # whatever the process's RNG went through before (several runs in one process). Only
        # the CPU generator is seeded, inside a fork, so the caller's RNG state is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(derive_seed(self.cfg.seed, "adapters"))
            return self.adapt(model, source)

    def build_host(self, source: DataSource) -> nn.Module:
        """The model as `model.*` names it, before `adapt` (a prompt method builds its CLIP prompt head here)."""
        self.task.check(source, self.cfg)
        return build_model(self.cfg.model, **self.task.model_outputs(source), in_chans=source.channels, seed=self.cfg.seed, slices=source.volume_slices, class_names=source.class_names)

    def adapt(self, model: nn.Module, source: DataSource) -> nn.Module:
        """Change the model before training (adapter methods inject adapters and freeze the rest)."""
        return model

    # --- the run ------------------------------------------------------------------------------

    def arrange_clients(self, specs: list[ClientSpec]) -> list[ClientSpec]:
        """Adjust the clients before the run (e.g. FedHelp's roles); the source's specs by default."""
        return specs

    def prepare_run(self, source: DataSource, specs: list[ClientSpec], run_dir: Path, echo: Callable[[str], None]) -> dict[str, Any]:
        """Once per run, in the driver, before the actors start (and again on resume): whatever
        every client actor needs besides its own shards; handed to `attach` in each actor."""
        return {}

    def read_keys(self, run_dir: Path) -> None:
        """In the driver only (the CLI's check before Ray starts, then the driver actor, the
        process that uses them): read the secret keys the server step needs with
        `raysim.secrets.read_key` (DP's keyed noise); a ConfigError when one is missing. Never
        called in a client actor, so a key never travels. Nothing by default."""

    def attach(self, source: DataSource, context: dict[str, Any]) -> None:
        """In each client actor, after it loaded its shards: receive `prepare_run`'s context."""
        self.context = context

    def client_setup(self, client: Client) -> dict[str, Any]:
        """Once per client, in its actor, before round 1 (not again on resume): what the client
        shares with the server before training, e.g. FedRDN's channel statistics. Raw images
        never leave the client; whatever this returns does."""
        return {}

    def setup_state(self, state: ServerState, shared: dict[str, dict[str, Any]]) -> ServerState:
        """In the driver, before round 1: fold the clients' `client_setup` results (by client id) into the server state."""
        return state

    # --- server side --------------------------------------------------------------------------

    def init_state(self, model: nn.Module) -> ServerState:
        state = model.state_dict()
        return {"weights": {k: state[k].detach().clone() for k in self.communicated(model)}}

    def sample_clients(self, round_: int, clients: list[str], k: int, state: ServerState) -> list[str]:
        """The round's cohort: `k` of `clients` (sorted ids), in sorted order. Seeded by (seed,
        round) alone, so every method sees the same selections; AFL overrides it (by λ)."""
        chosen = rng(self.cfg.seed, "sample", round_).choice(len(clients), size=min(k, len(clients)), replace=False)
        return [clients[i] for i in sorted(chosen)]

    def payload(self, state: ServerState, round_: int) -> Tensors:
        """The tensors every client of the round gets (one object, shared by all of them)."""
        return state["weights"]

    def update_bytes(self, payload: Tensors, round_: int) -> int:
        """The bytes a client's update carries, known before it trains (the simulated clock's
        upload time, `system.*`): the payload's `trained_keys` by default, less `down_only`."""
        keys = [k for k in payload if not (self.down_only and k.startswith(self.down_only))]
        return nbytes({k: payload[k] for k in self.trained_keys(round_, keys)})

    def round_values(self, state: ServerState, round_: int) -> dict[str, Any]:
        """Small non-tensor values sent with the payload (FedFB's group weights λ, AFL's mixture
        weights); a client actor gets them through `receive` before the round's calls."""
        return {}

    def server_metrics(self, round_: int, state: ServerState) -> dict[str, float]:
        """Server-level numbers of the round just folded (DEeR's `epsilon`, `delta`): written to
        metrics.parquet as split `train`, client `server`, outside every mean."""
        return {}

    def stop_before(self, round_: int, state: ServerState) -> str | None:
        """A reason not to run round `round_` (e.g. it would exceed a privacy budget): the run
        then ends after a checkpoint of the round before, exit 0, the reason on the console."""
        return None

    def fold_start(self, round_: int, state: ServerState, statistics: dict[str, dict[str, Any]]) -> Any:
        """The round's empty accumulator; `statistics`: client id -> `client_statistics` (empty unless `round_statistics`)."""
        return WeightedSum(device=self.fold_device)

    def accumulate(self, fold: Any, update: Update) -> None:
        """Add one update (called in sorted client-id order; the update is dropped afterwards).

        The update's tensors may be read-only views of Ray's object store: read them, never
        change them in place, never keep them (keep running sums)."""
        fold.add(update.tensors, float(update.num_examples), update.client_id)

    def finalize(self, round_: int, fold: Any, state: ServerState) -> ServerState:
        """The new server state from the round's accumulator (a round that trained a subset,
        `trained_keys`, leaves the other weights as they were)."""
        return {**state, "weights": {**state["weights"], **fold.mean()}}

    def aggregate(self, round_: int, updates: list[Update], state: ServerState, statistics: dict[str, dict[str, Any]] | None = None) -> ServerState:
        """The fold over a list of updates in the given order (tests, tools; the engine folds as updates arrive)."""
        fold = self.fold_start(round_, state, statistics or {})
        for update in updates:
            self.accumulate(fold, update)
        return self.finalize(round_, fold, state)

    # --- client side --------------------------------------------------------------------------

    def receive(self, values: dict[str, Any]) -> None:
        """In a client actor: the `round_values` that came with the current payload."""
        self.received = values

    def trained_keys(self, round_: int, keys: list[str]) -> list[str]:
        """Which of the payload's keys are trained and sent back this round (DEeR alternates
        A and B); the payload's other parameters stay frozen. Default: all of them."""
        return keys

    def batch_transform(self, client: Client, round_: int) -> Callable[[Batch], Batch] | None:
        """A change applied to every training batch of this client's round (pFL-ResFIM's style
        transfer); None: the batches as they are."""
        return None

    def client_fit(self, client: Client, payload: Tensors, round_: int) -> Update:
        model = client.load(payload)
        extra = self.before_training(client, model)
        fed = self.cfg.federation
        trained = self.trained_keys(round_, list(payload))
        epochs = client.train_epochs(round_, fed.local_epochs, fed.batch_size, self.cfg.seed)
        transform = self.batch_transform(client, round_)
        if transform is not None:
            epochs = (map(transform, batches) for batches in epochs)
        with only_trainable(model, frozen=set(payload) - set(trained)):
            stats = train_epochs(model, epochs, make_optimizer(model, fed), loss_fn=self.loss, after_step=self.after_step)
        state = model.state_dict()
        client.keep(set(state) - set(payload))
        tensors = {k: state[k].detach().cpu().clone() for k in trained}
        return Update(client.id, tensors, client.num_train, stats, extra)

    def client_statistics(self, client: Client, payload: Tensors, round_: int) -> dict[str, Any]:
        """With `round_statistics`: what this sampled client tells the server before the round's
        fold starts (small values only, e.g. FairFed's group confusion of the received model)."""
        return {}

    def before_training(self, client: Client, model: nn.Module) -> dict[str, object]:
        """Measure what the server needs from the received model (e.g. q-FFL's loss); goes to Update.extra."""
        return {}

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return cross_entropy(model, batch)

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step (e.g. projections); nothing for FedAvg."""

    def eval_model(self, client: Client, payload: Tensors) -> nn.Module:
        """The model a client is scored with: the global one here, a personal one elsewhere."""
        return client.load(payload)

    def newcomer_model(self, client: Client, payload: Tensors) -> nn.Module:
        """The model the held-out site (`eval.holdout_site`, role `holdout`) is scored with: what
        `eval_model` gives a client with no state of its own, i.e. the payload over the initial
        model. For FedAvg-like methods that is the global model; a method whose personal parts
        the server never holds (FedBN's norm layers) overrides this, and `newcomer` says the rule.
        It must not change the client's state: the site never trains."""
        return self.eval_model(client, payload)

    def scoring_model(self, client: Client, payload: Tensors) -> nn.Module:
        """`newcomer_model` for the held-out site, `eval_model` for every participant (the actor's evaluate)."""
        return (self.newcomer_model if client.spec.role == HOLDOUT else self.eval_model)(client, payload)


ALGORITHMS: Registry[type[Algorithm]] = Registry("algorithm", "raysim.algorithms")


def register_algorithm(name: str):  # type: ignore[no-untyped-def]
    def decorator(cls: type[Algorithm]) -> type[Algorithm]:
        cls.name = name
        return ALGORITHMS.register(name)(cls)

    return decorator
