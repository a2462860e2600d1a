"""Foundation models: class probabilities for a public image set, computed once per run.

FedHelp's small clients learn from a foundation model's soft targets on a public, unlabeled
set (specs/fedhelp.md, Stage 0). The model is queried once, the answers are stored in a
Parquet file next to the run and reused every round and after a resume: `soft_targets`.

A backend maps uint8 images shaped (N, C, H, W), as raysim shards store them, and the number
of classes K to an array (N, K) of probabilities (non-negative, finite, rows summing to 1
within 1e-4). For a segmentation run (FedHelp's segmentation variant) a backend with
`answers_maps` answers `predict_maps`: per-pixel class probabilities (N, K, H, W) at the
images' size, summing to 1 over K at every pixel; they are kept in an .npz file
(`soft_target_maps`). `callable` and `http` can (the function is called as for
classification and returns maps; an HTTP request carries `"output": "maps"` and the answer's
"probabilities" is N x K x H x W nested lists); `timm` (a classifier) cannot. Backends live in
`FOUNDATION_MODELS` (entry-point group `raysim.foundation_models`) and are built from a plain
dict of options:

- `timm`: `model` (any timm name), optional `weights` (a local state dict whose head has K
  classes), `img_size` (resize the images first), `batch_size` (64), `device` (default: cuda
  when available). Pixels are normalised with the model's mean/std, softmax on the logits.
- `callable`: `target` = "package.module:function"; the function gets the read-only uint8
  batch and K and returns an array-like (N, K) of probabilities.
- `http`: `url` (https://, or http:// to a loopback host only), optional `timeout` (seconds
  per request, 60), `batch_size` (64 images per request), `max_response_mb` (64), `deadline`
  (seconds for all batches, retries included, 3600; null: none), `retries` (3) and
  `retry_delay` (seconds, 1), `auth_env` (the name of an environment variable). The HTTP
  protocol, its transport, authentication and retry rules and an example server are in
  `raysim.models.foundation_http`'s docstring.

This module is the public face: it builds a backend by name (`build_foundation_model`) and
re-exports what FedHelp, plugins and tests use. The parts live beside it, each changing for
its own reasons: `foundation_base` (the backend contract, the registry, the checks every
answer passes), `foundation_local` (timm, callable), `foundation_http` (http) and
`soft_targets` (the one-time query and its files). Importing this module registers every
built-in backend.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from raysim.config import ConfigError
from raysim.models import foundation_http, foundation_local  # noqa: F401  (register the built-in backends)
from raysim.models.foundation_base import (
    FOUNDATION_MODELS,
    FoundationModel,
    FoundationModelError,
    check_probability_maps,
    predict_probabilities,
    predict_probability_maps,
    register_foundation_model,
)
from raysim.models.foundation_http import is_loopback, redact
from raysim.models.soft_targets import soft_target_maps, soft_targets

__all__ = [
    "FOUNDATION_MODELS",
    "FoundationModel",
    "FoundationModelError",
    "build_foundation_model",
    "check_probability_maps",
    "is_loopback",
    "predict_probabilities",
    "predict_probability_maps",
    "redact",
    "register_foundation_model",
    "soft_target_maps",
    "soft_targets",
]


def build_foundation_model(name: str, options: Mapping[str, Any] | None = None) -> FoundationModel:
    """The backend `name` built from its options; unknown names and options list the choices."""
    if name not in FOUNDATION_MODELS:
        raise ConfigError(FOUNDATION_MODELS.unknown_message(name))
    cls = FOUNDATION_MODELS.get(name)
    options = dict(options or {})
    if dataclasses.is_dataclass(cls):
        _check_options(cls, name, options)
    return cls(**options)


def _check_options(cls: type, name: str, options: Mapping[str, Any]) -> None:
    fields = [f for f in dataclasses.fields(cls) if f.init]
    valid = [f.name for f in fields]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"foundation model {name!r}: unknown option(s) {', '.join(unknown)}; valid options: {', '.join(valid)}")
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [key for key in required if key not in options]
    if missing:
        raise ConfigError(f"foundation model {name!r} needs option(s): {', '.join(missing)}")
