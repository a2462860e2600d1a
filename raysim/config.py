"""Typed, validated experiment configuration: YAML presets + `section.key=value` overrides.

The config is a tree of dataclasses. Defaults live only here (and, for a method's own
hyperparameters, in that method's dataclass); YAML files and the command line only
override. Every value is checked before any work starts, with errors that name the key
and list what is valid. Names that registries hold (`algorithm.name` and the method's own keys,
`data.name`) are checked by the layer that owns the registry: `raysim.algorithms.check(cfg)`,
which every entry point calls after `load`; this module imports no registry.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config key or value is invalid; the message says which and what is expected."""


def _doc(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    if callable(default) and not isinstance(default, (int, float, str, bool)):
        return field(default_factory=default, metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


@dataclass
class DataConfig:
    name: str = _doc("data source (registered name)", "synthetic")
    root: str | None = _doc("dataset directory (synthetic: generated/cached here when empty)", None)
    attribute: str | None = _doc("target sensitive attribute (site split, console table; null: the source's default)", None)
    val_fraction: float = _doc("share of each client's training data held out for validation", 0.15)
    modality: str = _doc("image array to read (FairFedMed-Oph: slo_fundus 2D or oct_bscans 3D; the synthetic twin also oct_onh_bscans), or a fundus image and a volume joined by + for the joint fundus + OCT model (slo_fundus+oct_onh_bscans)", "slo_fundus")
    cache: bool = _doc("cache decoded, resized images on local disk ($RAYSIM_CACHE, else ~/.cache/raysim)", True)
    slice_step: int = _doc("oct_bscans: keep every k-th B-scan (128 -> 32 slices with 4)", 4)
    gender_coding: str = _doc("npz `gender` integers: female0 (Female=0, Male=1) or male0; CSV text wins", "female0")
    keep_unknown: bool = _doc("keep samples whose target attribute is unknown (-1)", False)
    patients: int | None = _doc("synthetic only: patients to generate (null: the generator's default)", None)
    generator_seed: int = _doc("synthetic only: seed of the generated set (independent of `seed`)", 0)
    flag: str | None = _doc("MedMNIST only: which file, e.g. pneumoniamnist or dermamnist_64 (null: the only one in data.root)", None)
    partition: str | None = _doc("split into clients for sources without sites: dirichlet, quantity or iid (null: natural sites, else dirichlet)", None)
    num_clients: int | None = _doc("clients made by the partitioner (null: len(data.ratios) for quantity, else 3)", None)
    alpha: float = _doc("Dirichlet concentration of the label-skew partition (small = more skew)", 0.5)
    ratios: list[float] | None = _doc("quantity-skew shares per client, e.g. [0.6, 0.2, 0.08, 0.06, 0.04, 0.02]", None)

    def validate(self) -> None:
        _check_fraction("data.val_fraction", self.val_fraction, allow_zero=False, allow_one=False)
        if self.patients is not None:
            _check_positive("data.patients", self.patients)
        if self.num_clients is not None:
            _check_positive("data.num_clients", self.num_clients)
        if self.partition == "quantity" and not self.ratios:
            raise ConfigError("data.partition=quantity needs data.ratios, e.g. [0.6, 0.2, 0.08, 0.06, 0.04, 0.02]")
        if self.ratios and self.num_clients is not None and self.num_clients != len(self.ratios):
            raise ConfigError(f"data.num_clients={self.num_clients} but data.ratios has {len(self.ratios)} shares; drop num_clients or make them agree")
        _check_positive("data.slice_step", self.slice_step)
        _check_choice("data.gender_coding", self.gender_coding, ("female0", "male0"))
        _check_positive("data.alpha", self.alpha)
        if self.partition is not None:
            _check_choice("data.partition", self.partition, ("dirichlet", "quantity", "iid"))
        if self.ratios is not None:
            if len(self.ratios) < 1 or any(r <= 0 for r in self.ratios):
                raise ConfigError(f"data.ratios must be positive shares, got {self.ratios}")
            if abs(sum(self.ratios) - 1) > 1e-6:
                raise ConfigError(f"data.ratios must sum to 1, got {sum(self.ratios):g} for {self.ratios}")


@dataclass
class ModelConfig:
    name: str = _doc("any timm model name; unet:<timm encoder> (e.g. unet:resnet18) segments instead (raysim.client.tasks); clip:<open_clip architecture> is a CLIP host (raysim.models.clip)", "resnet18")
    img_size: int = _doc("images are resized to img_size x img_size", 64)
    pretrained: bool = _doc("load timm's pretrained weights (needs them cached locally)", False)
    weights: str | None = _doc("local checkpoint file to load into the backbone", None)
    class_names: list[str] | None = _doc("clip: hosts: the class names the text prompts use, one per class (null: the source's, e.g. FairFedMed's NOT Glaucoma / Glaucoma)", None)
    prompt: str = _doc("clip: hosts with CLIP's fixed text head: the prompt template, {} the class name", "a photo of {}.")

    def validate(self) -> None:
        _check_positive("model.img_size", self.img_size, at_most=MAX_IMG_SIZE)
        if self.prompt.count("{}") != 1:
            raise ConfigError(f"model.prompt must hold {{}} exactly once (where the class name goes), got {self.prompt!r}")
        if self.class_names is not None and (not self.class_names or not all(isinstance(n, str) and n.strip() for n in self.class_names)):
            raise ConfigError(f"model.class_names must be a list of non-empty names, one per class, got {self.class_names!r}")


# Why lower precision is a GPU feature (raysim.client.precision): what a CPU actor would do.
CPU_PRECISION = "on the CPU, torch's bf16 convolution gradients were not repeatable and sometimes NaN (oneDNN, issue 30), so CPU actors compute in fp32"


@dataclass
class FederationConfig:
    # Defaults are the FairFedMed paper's settings (specs/fairfedmed.md); presets adapt them.
    rounds: int = _doc("communication rounds", 50)
    clients_per_round: int | None = _doc("clients sampled each round (null: all)", None)
    local_epochs: int = _doc("local epochs per round", 1)
    batch_size: int = _doc("local batch size", 32)
    optimizer: str = _doc("local optimizer: sgd, adam or adamw", "sgd")
    lr: float = _doc("local learning rate", 1e-3)
    momentum: float = _doc("SGD momentum (reset every round)", 0.9)
    weight_decay: float = _doc("weight decay", 5e-4)
    precision: str = _doc("client-side compute: fp32, or bf16 / fp16 under torch.autocast (fp16 with a gradient scaler); the fold stays float64 (raysim.client.precision)", "fp32")

    def validate(self) -> None:
        _check_positive("federation.rounds", self.rounds)
        if self.clients_per_round is not None:
            _check_positive("federation.clients_per_round", self.clients_per_round)
        _check_positive("federation.local_epochs", self.local_epochs)
        _check_positive("federation.batch_size", self.batch_size)
        _check_choice("federation.optimizer", self.optimizer, ("sgd", "adam", "adamw"))
        _check_choice("federation.precision", self.precision, ("fp32", "bf16", "fp16"))
        _check_positive("federation.lr", self.lr)
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"federation.momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"federation.weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class ResourcesConfig:
    # How the pool is sized and filled: raysim/engine/placement.py.
    actors: int | str = _doc(
        "client actors: auto = min(clients, (CPUs - driver_cpus) / num_cpus, GPUs / num_gpus) from Ray's resources "
        "(in a Tune trial: its reserved client bundles); an integer on an autoscaling cluster",
        "auto",
    )
    num_cpus: float | None = _doc("CPUs reserved per client actor (null: threads_per_client, no oversubscription; fractions allowed)", None)
    num_gpus: float = _doc("GPU fraction per client actor, in [0, 1]", 0.0)
    driver_cpus: float = _doc("CPUs of the driver actor, which runs the rounds and the server step (0: it mostly waits while clients train)", 0.0)
    driver_gpus: float = _doc("GPU share of the driver actor, for server-side computation (> 0 lets it run on any node with a GPU)", 0.0)
    gpu_fold: bool = _doc("sum the round's weighted mean (the default fold) in float64 on the driver's GPU (needs driver_gpus > 0); a different placement class: --resume keeps it as it was", False)
    clients_per_actor: int | None = _doc("clients hosted by one actor (null: from resources.actors); sets ceil(clients / it) actors", None)
    object_store_gb: float | None = _doc("object store of the Ray a run starts itself (null: Ray's 30% of RAM; a cluster's is the cluster's)", 2.0)
    threads_per_client: int = _doc("torch threads per client (fixed for bit-identical results)", 1)

    @property
    def actor_cpus(self) -> float:
        """The CPUs each client actor asks Ray for: `num_cpus`, else `threads_per_client`."""
        return float(self.threads_per_client) if self.num_cpus is None else self.num_cpus

    def validate(self) -> None:
        if self.actors != "auto":
            if isinstance(self.actors, bool) or not isinstance(self.actors, int) or self.actors < 1:
                raise ConfigError(f"resources.actors must be auto or a positive integer, got {self.actors!r}")
            if self.clients_per_actor is not None:
                raise ConfigError(
                    f"resources.actors={self.actors} and resources.clients_per_actor={self.clients_per_actor} both set the number of client actors; set one of them"
                )
        if self.num_cpus is not None:
            _check_positive("resources.num_cpus", self.num_cpus)
        if not 0 <= self.num_gpus <= 1:
            raise ConfigError(f"resources.num_gpus must be a fraction in [0, 1], got {self.num_gpus}")
        if self.driver_cpus < 0:
            raise ConfigError(f"resources.driver_cpus must be >= 0, got {self.driver_cpus}")
        if self.driver_gpus < 0:
            raise ConfigError(f"resources.driver_gpus must be >= 0, got {self.driver_gpus}")
        if self.gpu_fold and self.driver_gpus <= 0:
            raise ConfigError("resources.gpu_fold=true needs a GPU share for the driver: set resources.driver_gpus > 0")
        if self.clients_per_actor is not None:
            _check_positive("resources.clients_per_actor", self.clients_per_actor)
        if self.object_store_gb is not None:
            _check_positive("resources.object_store_gb", self.object_store_gb)
        _check_positive("resources.threads_per_client", self.threads_per_client)


@dataclass
class EvalConfig:
    every: int = _doc("evaluate on val and test every N rounds (the last round always)", 2)
    attributes: list[str] | None = _doc("attributes scored for fairness (null: all the source has)", None)
    bootstrap: int = _doc("bootstrap resamples for group AUC 95% intervals (0: off)", 200)
    clients: int | str = _doc("clients evaluated: all, sampled (the round's cohort) or an integer k (a seeded subset of k, the same every round)", "all")
    # predictions.parquet is the run's only patient-level output (reporting.py says what each output holds).
    predictions: str = _doc("predictions.parquet (per sample: id, label, score or segmentation values, sensitive attributes; predicted masks with eval.masks) of every evaluation (all), the last round's (final) or none", "all")
    masks: bool = _doc("segmentation and joint runs: each sample's predicted mask leaves its actor and is written to predictions.parquet (mask, mask_size) whenever predictions are", False)
    pseudonymize: bool = _doc("sample ids replaced by a keyed hash (HMAC-SHA256, 16 hex digits) inside the client actors, before they leave; the key: eval.id_key_file (the path on a cluster: every node reads it), else $RAYSIM_ID_KEY", False)
    id_key_file: str | None = _doc("absolute path of a file holding the pseudonymisation key, outside the run directory (null: $RAYSIM_ID_KEY)", None)
    # FL-MedSegBench's unseen-site protocol: the engine checks the id against the clients (raysim.engine.driver).
    holdout_site: str | None = _doc(
        "a client id held out of training (never sampled, never aggregated, outside every mean), scored at each evaluation as an unseen site "
        "with its method's `newcomer` model; metric rows of role holdout (null: none)",
        None,
    )

    def validate(self) -> None:
        _check_positive("eval.every", self.every)
        if self.holdout_site is not None and not str(self.holdout_site).strip():
            raise ConfigError("eval.holdout_site must be a client id (e.g. site3) or null, got an empty string")
        if self.clients not in ("all", "sampled") and (isinstance(self.clients, bool) or not isinstance(self.clients, int) or self.clients < 1):
            raise ConfigError(f"eval.clients must be all, sampled or a positive integer, got {self.clients!r}")
        if self.bootstrap < 0:
            raise ConfigError(f"eval.bootstrap must be >= 0, got {self.bootstrap}")
        _check_choice("eval.predictions", self.predictions, ("all", "final", "none"))
        if self.masks and self.predictions == "none":
            raise ConfigError("eval.masks=true writes predicted masks to predictions.parquet, but eval.predictions=none writes none; set eval.predictions=all or final, or drop eval.masks")
        if self.id_key_file is not None:
            if not self.pseudonymize:
                raise ConfigError("eval.id_key_file is set but eval.pseudonymize is false; set eval.pseudonymize=true to hash sample ids, or drop eval.id_key_file")
            if not Path(self.id_key_file).expanduser().is_absolute():
                raise ConfigError(f"eval.id_key_file must be an absolute path (the driver may run in another directory), got {self.id_key_file!r}")


@dataclass
class CheckpointConfig:
    every: int = _doc("checkpoint server and client state every N rounds (the last round always)", 1)
    keep: int = _doc("complete checkpoints kept (the newest; a damaged one falls back to the previous)", 2)

    def validate(self) -> None:
        _check_positive("checkpoint.every", self.every)
        _check_positive("checkpoint.keep", self.keep)


@dataclass
class FaultConfig:
    max_restarts: int = _doc("actor losses (client actors, the driver actor) recovered by restart and replay before the run stops", 3)
    on_client_loss: str = _doc("recover: restart the actor and replay from the last checkpoint (exact); drop: continue without its clients (not deterministic)", "recover")
    min_timeout_s: float = _doc("no wait on an actor ends before this many seconds (the deadline is max(this, timeout_factor x the slowest round so far))", 600.0)
    timeout_factor: float = _doc("a call slower than this many times the slowest round so far counts as a lost actor", 5.0)
    start_timeout_s: float = _doc("client actors that have not started (loaded their shards) within this many seconds count as lost (a new run: it stops, naming what Ray lacks)", 1800.0)
    first_round_timeout_s: float = _doc("the limit of every wait before a round has been timed (round 1: first calls fill caches and pick kernels)", 1800.0)
    eval_timeout_s: float | None = _doc("the limit of a wait during an evaluation; null: the rounds' limit", None)
    driver_timeout_s: float = _doc("the driver actor sends an event (a heartbeat at least) every tenth of this; none for this many seconds: taken for lost, killed and started again (fault.max_restarts)", 300.0)
    max_empty_rounds: int = _doc("consecutive rounds in which every sampled client failed (an error, a rejected update, a lost actor) before the run stops, resumable (exit 1)", 3)

    def validate(self) -> None:
        if isinstance(self.max_restarts, bool) or not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise ConfigError(f"fault.max_restarts must be an integer >= 0, got {self.max_restarts!r}")
        _check_choice("fault.on_client_loss", self.on_client_loss, ("recover", "drop"))
        _check_positive("fault.min_timeout_s", self.min_timeout_s, at_most=MAX_TIMEOUT_S)
        _check_positive("fault.timeout_factor", self.timeout_factor, at_most=1000)
        _check_positive("fault.start_timeout_s", self.start_timeout_s, at_most=MAX_TIMEOUT_S)
        _check_positive("fault.first_round_timeout_s", self.first_round_timeout_s, at_most=MAX_TIMEOUT_S)
        if self.eval_timeout_s is not None:
            _check_positive("fault.eval_timeout_s", self.eval_timeout_s, at_most=MAX_TIMEOUT_S)
        _check_positive("fault.driver_timeout_s", self.driver_timeout_s, at_most=MAX_TIMEOUT_S)
        if isinstance(self.max_empty_rounds, bool) or not isinstance(self.max_empty_rounds, int) or self.max_empty_rounds < 1:
            raise ConfigError(f"fault.max_empty_rounds must be an integer >= 1, got {self.max_empty_rounds!r}")


@dataclass
class SystemConfig:
    # A virtual clock, never wall time (raysim.systems): results stay a function of config and seed.
    simulate: bool = _doc("simulate each client's compute, bandwidth and availability on a virtual clock (the other system.* keys need it)", False)
    step_seconds: float = _doc("simulated seconds of one local optimizer step at speed 1", 0.5)
    speed: float = _doc("median speed factor of a client's compute (a client's step takes step_seconds / speed)", 1.0)
    speed_spread: float = _doc("spread of the speed across clients: the sigma of a seeded log-normal (0: every client at system.speed)", 0.0)
    down_mbps: float = _doc("median download bandwidth in megabits per second", 100.0)
    up_mbps: float = _doc("median upload bandwidth in megabits per second", 20.0)
    bandwidth_spread: float = _doc("spread of both bandwidths across clients: the sigma of a seeded log-normal (0: the medians)", 0.0)
    profiles: str | None = _doc("CSV of per-client values (columns client, speed, up_mbps, down_mbps; a client it does not list gets the distributions above)", None)
    availability: str = _doc("always; bernoulli (offline each round with p_offline); markov (offline spells: a share p_offline of rounds, mean_offline_rounds long); window (offline a share p_offline of every period_s of simulated time, the phase seeded per client); trace (availability_trace)", "always")
    p_offline: float = _doc("the share of rounds (bernoulli, markov) or of each period (window) a client is offline", 0.0)
    mean_offline_rounds: float = _doc("markov: the mean length of an offline spell, in rounds", 2.0)
    period_s: float = _doc("window: the period of the on/off cycle in simulated seconds", 86400.0)
    availability_trace: str | None = _doc("trace: CSV of online intervals (columns client, start, end in simulated seconds); a client is available in a round that starts inside one of its intervals", None)
    correlate: str | None = _doc("the client attribute availability and speed follow: size (training patients), or <attribute>=<group> (that group's share of the client's training patients, e.g. race=Black); null: none", None)
    offline_ratio: float = _doc("with correlate: the client with the highest value is offline this many times as often as the one with the lowest (the mean p_offline kept)", 1.0)
    slowdown_ratio: float = _doc("with correlate: the client with the highest value is this many times slower than the one with the lowest (the geometric mean speed kept)", 1.0)
    round_deadline_s: float | None = _doc("simulated seconds a synchronous round waits for updates; a later one is dropped (its client is not trained) and counted (null: wait for all). Not fault.*_timeout_s, which are wall-clock limits on lost actors", None)
    over_select: float = _doc("sample this fraction more clients than federation.clients_per_round and keep the first to finish (0: none)", 0.0)
    empty_round_s: float = _doc("simulated seconds a round with no available client lasts (the deadline when one is set)", 60.0)
    concurrency: int | None = _doc("asynchronous methods (fedbuff, fedasync): clients training at once (null: federation.clients_per_round, else all)", None)

    def validate(self) -> None:
        defaults = SystemConfig()
        if not self.simulate:
            changed = [f.name for f in fields(self) if f.name != "simulate" and getattr(self, f.name) != getattr(defaults, f.name)]
            if changed:
                raise ConfigError(f"system.{changed[0]} is set but system.simulate is false; set system.simulate=true to simulate time, or drop the system.* keys")
            return
        for key in ("step_seconds", "speed", "down_mbps", "up_mbps", "mean_offline_rounds", "period_s", "empty_round_s", "offline_ratio", "slowdown_ratio"):
            _check_positive(f"system.{key}", getattr(self, key))
        for key in ("speed_spread", "bandwidth_spread", "over_select"):
            if getattr(self, key) < 0:
                raise ConfigError(f"system.{key} must be >= 0, got {getattr(self, key)!r}")
        _check_choice("system.availability", self.availability, AVAILABILITY_MODELS)
        if not 0 <= self.p_offline < 1:
            raise ConfigError(f"system.p_offline must be in [0, 1), got {self.p_offline!r}")
        if (self.availability == "trace") != (self.availability_trace is not None):
            raise ConfigError("system.availability=trace and system.availability_trace go together: name the CSV of online intervals with availability=trace")
        if self.p_offline > 0 and self.availability in ("always", "trace"):
            raise ConfigError(f"system.p_offline={self.p_offline} has no effect with system.availability={self.availability}; choose bernoulli, markov or window")
        if (self.offline_ratio != 1 or self.slowdown_ratio != 1) and self.correlate is None:
            raise ConfigError("system.offline_ratio / system.slowdown_ratio need system.correlate (size, or <attribute>=<group>, e.g. race=Black)")
        if self.correlate is not None and self.correlate != "size" and (self.correlate.count("=") != 1 or not all(self.correlate.split("="))):
            raise ConfigError(f"system.correlate must be size or <attribute>=<group> (e.g. race=Black), got {self.correlate!r}")
        if self.availability == "markov" and self.mean_offline_rounds < 1:
            raise ConfigError(f"system.mean_offline_rounds must be >= 1 round with system.availability=markov, got {self.mean_offline_rounds!r}")
        if self.round_deadline_s is not None:
            _check_positive("system.round_deadline_s", self.round_deadline_s)
        if self.concurrency is not None:
            _check_positive("system.concurrency", self.concurrency)


AVAILABILITY_MODELS = ("always", "bernoulli", "markov", "window", "trace")


@dataclass
class ReportConfig:
    html: bool = _doc("write RUN_DIR/report.html (plots of every metric; `python -m raysim.report RUN_DIR` rebuilds it) when the run ends", True)

    def validate(self) -> None:
        if not isinstance(self.html, bool):
            raise ConfigError(f"report.html must be true or false, got {self.html!r}")


@dataclass
class ExperimentConfig:
    seed: int = _doc("seed of every random choice in the run", 0)
    data: DataConfig = _doc("", DataConfig)
    model: ModelConfig = _doc("", ModelConfig)
    algorithm: dict[str, Any] = _doc("algorithm.name + the method's own fields", lambda: {"name": "fedavg"})
    federation: FederationConfig = _doc("", FederationConfig)
    resources: ResourcesConfig = _doc("", ResourcesConfig)
    eval: EvalConfig = _doc("", EvalConfig)
    checkpoint: CheckpointConfig = _doc("", CheckpointConfig)
    fault: FaultConfig = _doc("", FaultConfig)
    report: ReportConfig = _doc("", ReportConfig)
    system: SystemConfig = _doc("", SystemConfig)

    def validate(self) -> None:
        if not 0 <= self.seed < 2**63:  # numpy's and torch's seeds: non-negative, 64 bits
            raise ConfigError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        for section in SECTIONS:
            getattr(self, section).validate()
            check_finite(section, getattr(self, section))  # every float key, the ones validate() forgot too
        name = self.algorithm.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"algorithm.name must be a method's registered name, got {name!r}")
        if self.federation.precision != "fp32" and self.resources.num_gpus <= 0:
            raise ConfigError(f"federation.precision={self.federation.precision} needs client actors on a GPU (resources.num_gpus > 0); {CPU_PRECISION}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MAX_TIMEOUT_S = 1e7  # ~115 days: beyond it Ray's waits overflow
MAX_IMG_SIZE = 4096  # pixels per side; larger allocations kill the actors instead of failing here
SECTIONS = ("data", "model", "federation", "resources", "eval", "checkpoint", "fault", "report", "system")


def _check_positive(key: str, value: float, *, at_most: float | None = None) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key} must be a positive number, got {value!r}")
    if at_most is not None and value > at_most:
        raise ConfigError(f"{key} must be at most {at_most:g}, got {value!r}")


def _check_fraction(key: str, value: float, *, allow_zero: bool, allow_one: bool) -> None:
    low_ok = value > 0 or (allow_zero and value == 0)
    high_ok = value < 1 or (allow_one and value == 1)
    if not (low_ok and high_ok):
        lo, hi = ("[" if allow_zero else "("), ("]" if allow_one else ")")
        raise ConfigError(f"{key} must be a fraction in {lo}0, 1{hi}, got {value!r}")


def check_finite(prefix: str, obj: Any) -> None:
    """A ConfigError naming the first float field of dataclass `obj` (or item of a list field)
    that is NaN or infinite. Run on every config section and every method's Params after their
    own checks, so a float key without a range check of its own is covered as well."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        for i, item in enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]:
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{prefix}.{f.name}{'' if i is None else f'[{i}]'} must be a finite number, got {item!r}")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def unknown_key_message(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown config key {key!r}{hint}; valid keys: {', '.join(valid)}"


# --- building a config from YAML + overrides ------------------------------------------------


def _presets() -> Any:
    return resources.files("raysim").joinpath("presets")


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in _presets().iterdir() if p.name.endswith(".yaml"))


def read_yaml(source: str | Path) -> dict[str, Any]:
    """A YAML config file, or a packaged preset by name (e.g. `default`)."""
    path = Path(source)
    if not path.exists():
        name = str(source).removesuffix(".yaml")
        if name in preset_names():
            return load_yaml(_presets().joinpath(f"{name}.yaml").read_text()) or {}
        raise ConfigError(f"config file {source!s} not found (and no preset of that name; presets: {', '.join(preset_names())})")
    if not path.is_file():
        raise ConfigError(f"config file {path} is a directory, not a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"config file {path}: cannot be read ({err.strerror})") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, name: str) -> dict[str, Any]:
    """A config's YAML text (`name`: where it came from, for the one-line error)."""
    try:
        loaded = load_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{name}: not valid YAML ({_yaml_problem(err)})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{name}: expected a mapping of config sections, got {type(loaded).__name__}")
    return loaded


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: what is wrong and where."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


class YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading `1e-8` (an exponent without a dot) as a number, as YAML 1.2
    does: YAML 1.1 makes it a string, so `algorithm.delta=1e-8` failed as "not a number"."""


YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml(text: str) -> Any:
    """`yaml.safe_load` with `YAMLLoader`: what every raysim config, preset and override goes through."""
    return yaml.load(text, Loader=YAMLLoader)  # noqa: S506  (a SafeLoader subclass)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["a.b=1", "seed=3"]` -> `{"a": {"b": 1}, "seed": 3}`; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            value = load_yaml(raw) if raw != "" else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({_yaml_problem(err)})") from None
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def from_dict(raw: Mapping[str, Any]) -> ExperimentConfig:
    """Build and validate a config from a (possibly partial) nested mapping."""
    top = {f.name: f for f in fields(ExperimentConfig)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in top:
            raise ConfigError(unknown_key_message(key, all_keys()))
        if key in SECTIONS:
            kwargs[key] = _section(key, value)
        elif key == "algorithm":
            if not isinstance(value, Mapping):
                raise ConfigError(f"algorithm must be a mapping with a name, got {value!r}")
            kwargs[key] = dict(value)
        else:
            kwargs[key] = _coerce(key, value, get_type_hints(ExperimentConfig)[key])
    cfg = ExperimentConfig(**kwargs)
    if "algorithm" in kwargs and "name" not in cfg.algorithm:
        cfg.algorithm = {"name": "fedavg", **cfg.algorithm}
    cfg.validate()
    return cfg


def load(config: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    raw = read_yaml(config) if config else read_yaml("default")
    return from_dict(merge(raw, parse_overrides(overrides or [])))


def _section(name: str, value: Any) -> Any:
    cls = get_type_hints(ExperimentConfig)[name]
    if value is None:
        return cls()
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name} must be a mapping of keys, got {value!r}")
    hints = get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    kwargs = {}
    for key, item in value.items():
        if key not in valid:
            raise ConfigError(unknown_key_message(f"{name}.{key}", [f"{name}.{k}" for k in valid]))
        kwargs[key] = _coerce(f"{name}.{key}", item, hints[key])
    return cls(**kwargs)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check a YAML value against a field's type; ints are accepted where floats are expected."""
    text = str(hint)
    if value is None:
        if "None" in text:
            return None
        raise ConfigError(f"{key} may not be null")
    if hint is bool or text.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if text == "int | str":  # resources.actors: auto or a count; its validate() checks the value
        return value
    if hint is int or text.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float or text.startswith("float"):
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if text.startswith("str"):
        return str(value)
    if text.startswith("list"):
        items = value if isinstance(value, list) else [value]
        if "float" in text:
            return [_coerce(f"{key}[{i}]", v, float) for i, v in enumerate(items)]
        return [str(v) for v in items]
    return value


def all_keys() -> list[str]:
    keys = ["seed", "algorithm.name", "algorithm.<field>"]
    for section in SECTIONS:
        cls = get_type_hints(ExperimentConfig)[section]
        keys += [f"{section}.{f.name}" for f in fields(cls)]
    return keys


def describe_keys() -> str:
    """Every config key with its default and help, for `--help`."""
    lines = []
    default = ExperimentConfig()
    for f in fields(ExperimentConfig):
        if f.name in SECTIONS:
            section = getattr(default, f.name)
            for sub in fields(section):
                lines.append(_describe(f"{f.name}.{sub.name}", getattr(section, sub.name), sub.metadata["help"]))
        elif f.name == "algorithm":
            lines.append(_describe("algorithm.name", "fedavg", "federated method (registered name)"))
            lines.append(_describe("algorithm.<field>", "", "the selected method's hyperparameters"))
        else:
            lines.append(_describe(f.name, getattr(default, f.name), f.metadata["help"]))
    return "\n".join(lines)


def _describe(key: str, default: Any, text: str) -> str:
    return f"  {key:<32} {yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip():<10} {text}"


def dump(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
