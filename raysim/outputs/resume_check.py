"""What `--resume` may change in a run's config.yaml, checked against hashes kept at its start.

A fresh run keeps, in `provenance.json` (entry `resume_check`), a short sha256 of every config
value that must stay as it was, its `federation.rounds`, and a check value of its
pseudonymisation key (an HMAC of a constant under the key: it tells two keys apart and gives
neither away). A resume compares the config it is given with them and refuses, in one line
naming the first differing key, anything but:

- `federation.rounds`, only to extend the run, and not for a method whose schedule was set
  from it (`ROUNDS_SCHEDULES`);
- `resources.*` (where and how wide the pool runs), except `threads_per_client` (torch's
  threads change the floating-point sums), a change of `num_gpus` / `driver_gpus` between
  0 and > 0 (computation moving between CPU and GPU) and `gpu_fold` (where the fold sums);
- `fault.*`, `report.*`, `checkpoint.*`, `data.root` (the data moved);
- `eval.id_key_file` (the key file moved), as long as the key's check value matches: one
  `predictions.parquet` never mixes two pseudonym spaces.

The files whose rows are part of the experiment (`CONTENT_KEYS`: the simulated system's per-client
profiles and availability trace) are kept as a sha256 of their bytes: a resume with the same path
but an edited file would otherwise simulate other clients from the resumed round on. A run
started before a check existed has no entry for it and resumes unchecked. Plain Python, no Ray.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from raysim import config, secrets
from raysim.config import ConfigError, ExperimentConfig
from raysim.outputs import storage

RECORD = "resume_check"  # its entry in provenance.json
# Keys added after this check existed, with the value every run started before them used: a
# resume of such a run compares the config's value with that one instead of refusing.
ADDED_KEYS: dict[str, Any] = {"federation.precision": "fp32", "resources.gpu_fold": False, "model.class_names": None, "model.prompt": "a photo of {}."}
ADDED_KEYS.update({f"system.{f.name}": getattr(config.SystemConfig(), f.name) for f in dataclasses.fields(config.SystemConfig)})  # 0.8.0
MAY_CHANGE = ("resources.", "fault.", "report.", "checkpoint.", "data.root", "eval.id_key_file", "federation.rounds")
# Config keys naming a file whose content is part of the experiment (checked by content).
CONTENT_KEYS = ("system.profiles", "system.availability_trace")
ALLOWED = "only federation.rounds (to extend), resources.* (not threads_per_client, gpu_fold, nor between CPU and GPU), fault.*, report.*, checkpoint.*, data.root and eval.id_key_file may change"


def _dp_target(params: Any, _rounds: int) -> bool:
    from raysim.algorithms.dp import PrivacyParams

    return isinstance(params, PrivacyParams) and params.noise_multiplier is None


# Methods whose schedule was computed from federation.rounds at the start: (applies to the
# method's Params and the run's rounds so far, why the rounds cannot change).
ROUNDS_SCHEDULES: tuple[tuple[Callable[[Any, int], bool], str], ...] = (
    (lambda p, _: getattr(p, "ema", 0) > 0, "algorithm.ema > 0 weighs every round's server EMA by round / federation.rounds"),
    (_dp_target, "the DP noise was computed to reach algorithm.epsilon after federation.rounds rounds (set algorithm.noise_multiplier for a run that can be extended)"),
    (lambda p, _: hasattr(p, "box_start") and p.box_start != p.box_end, "the box L_t of pfa / det grows from box_start to box_end over federation.rounds"),
    (lambda p, rounds: hasattr(p, "generator_every") and rounds % p.generator_every == 0, "fedbm skipped its generator after the last round, which would now be trained"),
)


def fixed_values(cfg: ExperimentConfig) -> dict[str, Any]:
    """Every config value a resume must keep, by dotted key, in the config's order (the
    algorithm with all its fields, defaults included)."""
    values: dict[str, Any] = {}
    for key, value in cfg.to_dict().items():
        if key == "algorithm":
            from raysim.algorithms import params as algorithm_params  # torch and the methods: only when asked

            params = dataclasses.asdict(algorithm_params(cfg))
            values.update({f"algorithm.{k}": v for k, v in {"name": cfg.algorithm.get("name", "fedavg"), **params}.items()})
        elif isinstance(value, dict):
            values.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            values[key] = value
    values = {k: v for k, v in values.items() if not k.startswith(MAY_CHANGE)}
    values["resources.threads_per_client"] = cfg.resources.threads_per_client
    values["resources.num_gpus"] = "> 0" if cfg.resources.num_gpus > 0 else "0"  # the GPU share may change, not CPU <-> GPU
    values["resources.driver_gpus"] = "> 0" if cfg.resources.driver_gpus > 0 else "0"
    values["resources.gpu_fold"] = cfg.resources.gpu_fold  # a GPU fold's float64 sums may round otherwise than the CPU's
    return values


def record(cfg: ExperimentConfig, run_dir: str | Path) -> dict[str, Any]:
    """What a fresh run keeps for its resumes (hashes only: no value, no key)."""
    return {"keys": {k: _digest(v) for k, v in fixed_values(cfg).items()}, "rounds": cfg.federation.rounds, "id_key_check": key_check(cfg, run_dir), "files": file_digests(cfg)}


def file_digests(cfg: ExperimentConfig) -> dict[str, str]:
    """A short sha256 of each `CONTENT_KEYS` file the config names. A file that is not there has
    none: reading it is the run's own one-line error, later."""
    digests = {}
    for key in CONTENT_KEYS:
        file = _named_file(cfg, key)
        if file is not None and file.is_file():
            digests[key] = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    return digests


def _named_file(cfg: ExperimentConfig, key: str) -> Path | None:
    section, field = key.split(".")
    path = getattr(getattr(cfg, section), field)
    return Path(path).expanduser() if path else None


def key_check(cfg: ExperimentConfig, run_dir: str | Path) -> str | None:
    """A check value of the pseudonymisation key (None: eval.pseudonymize is off); the key is
    read as the run reads it (a ConfigError without one)."""

    key = secrets.id_key(cfg.eval, None if storage.is_uri(run_dir) else Path(run_dir))
    return None if key is None else secrets.derive(key, "raysim eval.id_key_file check").hex()[:16]


def check(saved: Mapping[str, Any] | None, cfg: ExperimentConfig, run_dir: str | Path) -> None:
    """A ConfigError naming the first key of `cfg` (the config in `run_dir`) that a resume may
    not change from `saved` (`record` at the run's start); nothing when `saved` is None."""
    if saved is None:
        return
    where = f"{run_dir}/config.yaml"
    now = record(cfg, run_dir)
    old, new = saved.get("keys", {}), now["keys"]
    old = {**{k: _digest(v) for k, v in ADDED_KEYS.items() if k in new}, **old}
    for key in [*new, *(k for k in old if k not in new)]:
        if old.get(key) != new.get(key):
            raise ConfigError(f"{where}: {key} differs from the run's start; a resumed run keeps its config: {ALLOWED}")
    rounds, started = cfg.federation.rounds, int(saved.get("rounds", cfg.federation.rounds))
    if rounds < started:
        raise ConfigError(f"{where}: federation.rounds={rounds} is fewer than the run's {started}; a resume may only extend the rounds")
    if rounds != started:
        from raysim.algorithms import params as algorithm_params

        params = algorithm_params(cfg)
        for applies, why in ROUNDS_SCHEDULES:
            if applies(params, started):
                raise ConfigError(f"{where}: federation.rounds cannot change from {started} to {rounds} for {cfg.algorithm.get('name')}: {why}")
    for key, digest in (saved.get("files") or {}).items():
        if now["files"].get(key, digest) != digest:
            raise ConfigError(f"{where}: {key}={_named_file(cfg, key)}: the file's content differs from the run's start (sha256 {now['files'][key]}, was {digest}); a resumed run keeps the system it simulated: restore the file")
    if saved.get("id_key_check") != now["id_key_check"]:
        raise ConfigError(
            f"{where}: eval.id_key_file: the pseudonymisation key is not the one the run started with (its check value differs); use that key, so one predictions.parquet holds one pseudonym space"
        )


def saved_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The `resume_check` entry of a run directory's provenance.json (a path or a URI), if any."""
    if storage.is_uri(run_dir):
        text = storage.RunMirror(str(run_dir)).read_text("provenance.json")
    else:
        path = Path(run_dir) / "provenance.json"
        text = path.read_text() if path.is_file() else None
    try:
        entry = json.loads(text).get(RECORD) if text else None
    except (ValueError, AttributeError):
        raise ConfigError(f"{run_dir}/provenance.json: not the JSON object raysim wrote; it holds what a resume checks") from None
    return entry if isinstance(entry, dict) else None


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
