"""Federated methods, one module each, registered by name (`raysim.algorithms` entry points add more).

`check(cfg)` is where a config's registered names are checked (the config module knows no
registry), `params(cfg)` builds the selected method's hyperparameters, `build(cfg)` the method.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from raysim.algorithms import (  # noqa: F401  (register the built-ins)
    adapter,
    afl,
    cksp,
    deer,
    det,
    ditto,
    dp_lora,
    fairfed,
    fairlora,
    fedadagrad,
    fedadam,
    fedasync,
    fedavg,
    fedbm,
    fedbn,
    fedbuff,
    fedfb,
    fedheal,
    fedhelp,
    fedlora,
    fednova,
    fedotp,
    fedper,
    fedprox,
    fedrdn,
    fedyogi,
    ffa_lora,
    local,
    pfa,
    pfl_resfim,
    promptfl,
    qffl,
    silobn,
)
from raysim.algorithms.base import ALGORITHMS, Algorithm, NoParams, ServerState, register_algorithm
from raysim.config import ConfigError, check_finite, unknown_key_message

if TYPE_CHECKING:
    from raysim.config import ExperimentConfig
    from raysim.console import Echo

__all__ = ["ALGORITHMS", "Algorithm", "NoParams", "ServerState", "build", "check", "params", "register_algorithm", "with_backbone"]


def params(cfg: ExperimentConfig) -> Any:
    """The selected method's hyperparameter dataclass, built and validated (a ConfigError
    naming the unknown method or key otherwise)."""
    given = dict(cfg.algorithm)
    name = given.pop("name", "fedavg")
    if name not in ALGORITHMS:
        raise ConfigError(f"algorithm.name: {ALGORITHMS.unknown_message(name)}")
    params_cls = ALGORITHMS.get(name).Params
    valid = {f.name for f in dataclasses.fields(params_cls)}
    for key in given:
        if key not in valid:
            raise ConfigError(unknown_key_message(f"algorithm.{key}", [f"algorithm.{k}" for k in ["name", *sorted(valid)]]))
    try:
        built = params_cls(**given)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"algorithm {name}: {err}") from err
    check_finite("algorithm", built)
    return built


def check(cfg: ExperimentConfig) -> Any:
    """The registered names of a loaded config, checked: the method and its own keys, the keys
    of the method that must agree with other sections (`Params.check_config`), then the data
    source (`raysim.datasets.check`). Every entry point calls it after `config.load`; returns
    the method's Params."""
    from raysim import datasets

    built = params(cfg)
    if hasattr(built, "check_config"):
        try:
            built.check_config(cfg)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    datasets.check(cfg)
    return built


def build(cfg: ExperimentConfig) -> Algorithm:
    """The selected method, built from its Params."""
    return ALGORITHMS.get(cfg.algorithm["name"])(params(cfg), cfg)


def with_backbone(cfg: ExperimentConfig, echo: Echo = print) -> ExperimentConfig:
    """`cfg` with model.weights set to `raysim.pretrain`'s backbone when the method adapts a
    pretrained one (`Algorithm.needs_pretrained`) and the config names none; else `cfg`."""
    from raysim.client.pretraining import resolve_weights

    needs = getattr(ALGORITHMS.get(cfg.algorithm.get("name", "fedavg")), "needs_pretrained", False)
    return resolve_weights(cfg, needs_pretrained=needs, echo=echo)
