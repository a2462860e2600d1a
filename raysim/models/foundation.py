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
  `retry_delay` (seconds, 1), `auth_env` (the name of an environment variable; see below).

HTTP protocol (one POST per batch, JSON both ways)::

    request:  {"shape": [N, C, H, W], "dtype": "uint8", "num_classes": K,
               "data": "<base64 of the images' raw C-order bytes>"}
    response: {"probabilities": [[p_0, ..., p_{K-1}], ...]}   # N rows, status 200
    errors:   any non-2xx status; its body (text) is shown to the user
    segmentation: the request also has "output": "maps"; "probabilities" is then
              N x K x H x W nested lists (a class-probability map per image and class)

The images leave the process, so the client is strict:

- Transport: `url` must be https:// (certificates are verified against the system's CAs;
  SSL_CERT_FILE names another bundle) unless its host is loopback (localhost, 127.0.0.0/8,
  ::1). A url with credentials (user:password@host) is refused: the config and provenance
  keep the url as written. Redirects are not followed (the Authorization header would go
  along); a 3xx answer is an error naming the new address. A loopback url is always asked
  directly, never through a proxy (http_proxy would see the images and the header in clear
  text); an https:// url goes through HTTPS_PROXY / https_proxy when set (a CONNECT tunnel:
  the proxy sees the host name, not the images nor the header; no_proxy excludes hosts).
- Authentication: `auth_env: FM_TOKEN` sends the value of the environment variable FM_TOKEN,
  as it is (e.g. "Bearer abc..."), as the Authorization header of every request. The variable
  must be set in the process that asks the model (the run's driver: on a cluster, the node the
  run starts from); only its name is in the config, the value is never shown or stored.
- Limits: an answer over `max_response_mb` (10^6 bytes) is refused (a larger Content-Length
  before reading, otherwise after cap + 1 bytes); `timeout` bounds each request, `deadline` all
  of them together.
- Retries: a connection error, a timeout, HTTP 429 or a 5xx other than 501/505 is retried up
  to `retries` times per batch, after `retry_delay` * 2^attempt seconds (at most 60; longer if
  the server sends Retry-After, honoured up to 60 s). Only the failed batch is asked again:
  the answered ones are kept. Other 4xx answers, invalid answers and oversized ones fail at
  once. A failure names how many batches had been answered.
- Messages: every message and the backend's label and repr show the url through `redact`:
  credentials and query parameters that look like secrets (token=, key=, sig=, ...) become
  ***; a server's error text is shown with the Authorization value blanked out.

A server needs only the standard library and numpy, e.g.::

    import base64, json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import numpy as np

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            images = np.frombuffer(base64.b64decode(request["data"]), np.uint8).reshape(request["shape"])
            probs = my_model(images, request["num_classes"])  # yours: (N, K), rows sum to 1
            body = json.dumps({"probabilities": np.asarray(probs, float).tolist()}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    ThreadingHTTPServer(("127.0.0.1", 8000), Handler).serve_forever()

It listens on loopback only; to serve other machines, put it behind TLS (e.g. a reverse proxy
with a certificate) and have it check the Authorization header.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import email.utils
import http.client
import importlib
import ipaddress
import json
import logging
import os
import pickle
import re
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import timm
import torch
import torch.nn.functional as F
from timm.models import load_pretrained
from torch import nn

from raysim import console
from raysim.config import ConfigError, ModelConfig
from raysim.models.backbones import build_model, normalization
from raysim.registry import Registry

log = logging.getLogger(__name__)

SUM_TOLERANCE = 1e-4  # rows of a float32 softmax sum to 1 only within a few ulps


class FoundationModelError(RuntimeError):
    """A foundation model failed or answered outside the protocol; the message names the backend."""


class FoundationModel(ABC):
    """A backend: uint8 images (N, C, H, W) and K -> probabilities (N, K). Construction is cheap
    (options are checked, nothing is loaded or contacted); the work happens in `predict`."""

    name: ClassVar[str] = ""

    @property
    def label(self) -> str:
        """How errors name this backend."""
        return f"foundation model {self.name!r}"

    # Whether it can answer a segmentation run: per-pixel maps (N, K, H, W) from `predict_maps`.
    # A classifier (timm) cannot; callable and http pass the question on to the user's code.
    answers_maps: ClassVar[bool] = False

    @abstractmethod
    def predict(self, images: np.ndarray, num_classes: int) -> Any:
        """Class probabilities (N, num_classes), array-like; validated by the caller."""

    def predict_maps(self, images: np.ndarray, num_classes: int) -> Any:
        """Per-pixel class probabilities (N, num_classes, H, W), array-like; validated by the caller."""
        raise FoundationModelError(f"{self.label} answers one class distribution per image, not per-pixel maps")


FOUNDATION_MODELS: Registry[type[FoundationModel]] = Registry("foundation model", "raysim.foundation_models")


def register_foundation_model(name: str) -> Callable[[type[FoundationModel]], type[FoundationModel]]:
    def decorator(cls: type[FoundationModel]) -> type[FoundationModel]:
        cls.name = name
        return FOUNDATION_MODELS.register(name)(cls)

    return decorator


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


# --- validation ---------------------------------------------------------------------------


def check_images(images: Any, who: str) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
        got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"{who} takes a non-empty uint8 array of images shaped (N, C, H, W); got {got}")


def check_probabilities(probs: Any, *, n: int, num_classes: int, source: str) -> np.ndarray:
    """`probs` as float64 (n, num_classes) if it is a valid probability table, else a clear error."""
    try:
        array = np.asarray(probs, dtype=np.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise FoundationModelError(f"{source} returned something that is not a numeric array ({err}); expected probabilities shaped ({n}, {num_classes})") from err
    if array.shape != (n, num_classes):
        raise FoundationModelError(f"{source} returned shape {array.shape}; expected ({n}, {num_classes}): one row per image, one column per class (num_classes={num_classes})")
    return _check_distributions(array, source, "row")


def check_probability_maps(maps: Any, *, n: int, num_classes: int, size: tuple[int, int], source: str) -> np.ndarray:
    """`maps` as float64 (n, num_classes, H, W) if every pixel holds a class distribution, else a clear error."""
    expected = (n, num_classes, *size)
    try:
        array = np.asarray(maps, dtype=np.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise FoundationModelError(f"{source} returned something that is not a numeric array ({err}); expected per-pixel probabilities shaped {expected}") from err
    if array.shape != expected:
        raise FoundationModelError(f"{source} returned shape {array.shape}; expected {expected}: per image, one probability map per class at the image's size (num_classes={num_classes})")
    return _check_distributions(array, source, "image")


def _check_distributions(array: np.ndarray, source: str, unit: str) -> np.ndarray:
    """Finite, non-negative, summing to 1 over axis 1 (the classes); errors name the first bad `unit` (row / image)."""
    finite = np.isfinite(array)
    if not finite.all():
        row = int(np.argwhere(~finite)[0, 0])
        raise FoundationModelError(f"{source} returned NaN or infinite values (first in {unit} {row}); expected probabilities")
    if (array < 0).any():
        row = int(np.argwhere(array < 0)[0, 0])
        raise FoundationModelError(f"{source} returned negative values ({unit} {row}: min {array[row].min():.6g}); expected probabilities, not logits")
    sums = array.sum(axis=1)
    off = np.abs(sums - 1.0)
    if off.max() > SUM_TOLERANCE:
        where = np.unravel_index(int(off.argmax()), off.shape)
        place = f"row {where[0]}" if unit == "row" else f"image {where[0]}, pixel {tuple(int(i) for i in where[1:])}"
        noun = "rows" if unit == "row" else "pixels whose class probabilities"
        raise FoundationModelError(f"{source} returned {noun} that do not sum to 1 ({place} sums to {sums[where]:.6g}, tolerance {SUM_TOLERANCE}); expected softmax probabilities")
    return array


def predict_probabilities(model: FoundationModel, images: np.ndarray, num_classes: int) -> np.ndarray:
    """Ask `model` about all `images` (it batches internally) and validate the answer."""
    check_images(images, model.label)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"{model.label}: num_classes must be an integer >= 2, got {num_classes!r}")
    return check_probabilities(model.predict(images, num_classes), n=len(images), num_classes=num_classes, source=model.label)


def predict_probability_maps(model: FoundationModel, images: np.ndarray, num_classes: int) -> np.ndarray:
    """Ask `model` for per-pixel maps of all `images` (segmentation) and validate the answer."""
    check_images(images, model.label)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"{model.label}: num_classes must be an integer >= 2, got {num_classes!r}")
    size = (int(images.shape[2]), int(images.shape[3]))
    return check_probability_maps(model.predict_maps(images, num_classes), n=len(images), num_classes=num_classes, size=size, source=model.label)


# --- the one-time query and its file --------------------------------------------------------


def prob_columns(num_classes: int) -> list[str]:
    return [f"p_{k}" for k in range(num_classes)]


def soft_targets(path: str | Path, factory: Callable[[], FoundationModel], images: np.ndarray, sample_ids: Sequence[Any] | np.ndarray, num_classes: int) -> np.ndarray:
    """Probabilities (N, num_classes) for the public `images`, from `path` when it holds them.

    Otherwise `factory()` builds the model, which is queried once for all images; the answer
    is written to `path` (Parquet: sample_id, p_0..p_{K-1}) before it is returned, so later
    rounds and resumed runs never call the model again. A file for other samples or another
    K is an error, never overwritten. Sample ids are stored as strings.
    """
    path = Path(path).expanduser()
    check_images(images, "soft_targets")
    ids = _as_ids(sample_ids, len(images))
    if path.exists():
        log.info("soft targets: reusing %s", path)
        return read_soft_targets(path, ids, num_classes)
    model = factory()
    probs = predict_probabilities(model, images, num_classes)
    write_soft_targets(path, ids, probs)
    log.info("soft targets: queried %s once for %d public images -> %s", model.label, len(ids), path)
    return probs


def _as_ids(sample_ids: Sequence[Any] | np.ndarray, n: int) -> np.ndarray:
    ids = np.asarray(sample_ids).astype(str)
    if ids.shape != (n,):
        raise ValueError(f"soft_targets: expected {n} sample ids (one per image), got shape {ids.shape}")
    if len(np.unique(ids)) != n:
        raise ValueError("soft_targets: sample ids must be unique (they key the stored soft targets)")
    return ids


def read_soft_targets(path: Path, sample_ids: np.ndarray, num_classes: int) -> np.ndarray:
    """The stored rows for `sample_ids` (string array), in that order; a clear error otherwise."""
    redo = "delete it (the foundation model is then queried again) or choose another file"
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid for a corrupt file is a ValueError
        raise ConfigError(f"soft targets file {path} cannot be read ({type(err).__name__}: {err}); {redo}") from err
    expected = ["sample_id", *prob_columns(num_classes)]
    if list(frame.columns) != expected:
        raise ConfigError(f"soft targets file {path} has columns {list(frame.columns)}; expected {expected} (num_classes={num_classes}); {redo}")
    stored = frame["sample_id"].astype(str).to_numpy()
    if not np.array_equal(stored, sample_ids):
        # The same samples in another order are the same answer: reorder instead of failing.
        if len(stored) != len(sample_ids) or set(stored) != set(sample_ids) or len(set(stored)) != len(stored):
            missing = len(set(sample_ids) - set(stored))
            raise ConfigError(f"soft targets file {path} holds other samples ({len(stored)} stored; {missing} of the {len(sample_ids)} requested ids missing); {redo}")
        frame = frame.set_index("sample_id").loc[sample_ids].reset_index()
    probs = frame[expected[1:]].to_numpy(dtype=np.float64)
    return check_probabilities(probs, n=len(sample_ids), num_classes=num_classes, source=f"soft targets file {path}")


def write_soft_targets(path: Path, sample_ids: np.ndarray, probs: np.ndarray) -> None:
    """Atomic: a crash never leaves a half-written file that a resumed run would trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {"sample_id": sample_ids, **{name: probs[:, k] for k, name in enumerate(prob_columns(probs.shape[1]))}}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pd.DataFrame(columns).to_parquet(tmp, index=False)
    tmp.replace(path)


# --- segmentation: per-pixel maps, asked once, kept in an .npz ---------------------------------


def soft_target_maps(path: str | Path, factory: Callable[[], FoundationModel], images: np.ndarray, sample_ids: Sequence[Any] | np.ndarray, num_classes: int) -> np.ndarray:
    """Per-pixel probabilities (N, num_classes, H, W) for the public `images`, as `soft_targets`
    does for class probabilities: from `path` when it holds them, else `factory()`'s model is
    asked once (`predict_maps`) and the answer written to `path` (npz: `sample_id`, float32
    `probabilities`) before it is returned. A file for other samples, K or size is an error."""
    path = Path(path).expanduser()
    check_images(images, "soft_target_maps")
    ids = _as_ids(sample_ids, len(images))
    size = (int(images.shape[2]), int(images.shape[3]))
    if path.exists():
        log.info("soft target maps: reusing %s", path)
        return read_soft_target_maps(path, ids, num_classes, size)
    model = factory()
    maps = predict_probability_maps(model, images, num_classes).astype(np.float32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(tmp, sample_id=ids, probabilities=maps)
    tmp.replace(path)
    log.info("soft target maps: queried %s once for %d public images -> %s", model.label, len(ids), path)
    return maps


def read_soft_target_maps(path: Path, sample_ids: np.ndarray, num_classes: int, size: tuple[int, int]) -> np.ndarray:
    """The stored maps for `sample_ids`, in that order (float32); a clear error otherwise."""
    redo = "delete it (the foundation model is then queried again) or choose another file"
    try:
        with np.load(path, allow_pickle=False) as stored:
            stored_ids, maps = stored["sample_id"].astype(str), stored["probabilities"]
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"soft target maps file {path} cannot be read ({type(err).__name__}: {err}); {redo}") from err
    if len(stored_ids) != len(sample_ids) or set(stored_ids) != set(sample_ids) or len(set(stored_ids)) != len(stored_ids):
        raise ConfigError(f"soft target maps file {path} holds other samples ({len(stored_ids)} stored, {len(sample_ids)} requested); {redo}")
    order = pd.Index(stored_ids).get_indexer(sample_ids)
    maps = maps[order]
    if maps.shape[1:] != (num_classes, *size):
        raise ConfigError(f"soft target maps file {path} holds maps shaped {maps.shape[1:]}; this run needs {(num_classes, *size)} (num_classes, img_size); {redo}")
    check_probability_maps(maps, n=len(sample_ids), num_classes=num_classes, size=size, source=f"soft target maps file {path}")
    return maps.astype(np.float32)


# --- backends ------------------------------------------------------------------------------


def _check_positive(label: str, key: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):  # NaN fails too
        raise ConfigError(f"{label}: option {key} must be a positive number, got {value!r}")


@register_foundation_model("timm")
@dataclass
class TimmModel(FoundationModel):
    model: str
    weights: str | None = None
    img_size: int | None = None
    batch_size: int = 64
    device: str | None = None

    def __post_init__(self) -> None:
        if not timm.is_model(self.model):
            raise ConfigError(f"{self.label}: model {self.model!r} is not a timm model (see timm.list_models())")
        if self.weights is not None and not Path(self.weights).expanduser().is_file():
            raise ConfigError(f"{self.label}: weights {self.weights} is not a file")
        if self.img_size is not None:
            _check_positive(self.label, "img_size", self.img_size)
        _check_positive(self.label, "batch_size", self.batch_size)
        # Built on first use: in_chans and num_classes come with the images.
        self._networks: dict[tuple[int, int], nn.Module] = {}

    @property
    def label(self) -> str:
        return f"foundation model 'timm' ({self.model})"

    def predict(self, images: np.ndarray, num_classes: int) -> np.ndarray:
        channels = images.shape[1]
        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        net = self._network(channels, num_classes).to(device).eval()
        mean, std = (t.to(device) for t in normalization(net, channels))
        out = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                console.report(f"asking {self.label}, images", start, len(images))
                x = torch.from_numpy(np.array(images[start : start + self.batch_size], dtype=np.float32)).to(device).div_(255.0)
                if self.img_size and tuple(x.shape[-2:]) != (self.img_size, self.img_size):
                    x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", antialias=True, align_corners=False)
                out.append(torch.softmax(net((x - mean) / std).double(), dim=1).cpu().numpy())
        console.report(f"asking {self.label}, images", len(images), len(images))
        return np.concatenate(out)

    def _network(self, channels: int, num_classes: int) -> nn.Module:
        key = (channels, num_classes)
        if key not in self._networks:
            net = build_model(ModelConfig(name=self.model, img_size=self.img_size or 64), num_classes=num_classes, in_chans=channels, seed=0)
            if self.weights is None:
                log.warning("%s has no weights: its predictions are random (fine for tests only)", self.label)
            else:
                self._load_weights(net, channels, num_classes)
            self._networks[key] = net
        return self._networks[key]

    def _load_weights(self, net: nn.Module, channels: int, num_classes: int) -> None:
        # Not build_model's weights path: that drops a head whenever K differs from the timm
        # default (1000), and a foundation model's head is the part that answers. Declaring
        # num_classes=K makes timm keep the head and load strictly; the stem is still adapted
        # to the image channels.
        path = Path(self.weights or "").expanduser()
        cfg = {**net.pretrained_cfg, "file": str(path), "num_classes": num_classes, "source": ""}
        try:
            load_pretrained(net, pretrained_cfg=cfg, num_classes=num_classes, in_chans=channels, strict=True)
        except (RuntimeError, OSError, ValueError, KeyError, pickle.UnpicklingError) as err:
            raise ConfigError(f"{self.label}: weights {path} do not fit {self.model} with num_classes={num_classes}, in_chans={channels}: {err}") from err


def resolve_target(target: str, label: str) -> Callable[..., Any]:
    """The object named by "package.module:attribute" (dots after the colon walk attributes)."""
    module_name, _, attribute = target.partition(":") if isinstance(target, str) else ("", "", "")
    if not module_name or not attribute:
        raise ConfigError(f"{label}: target {target!r} must look like 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{label}: cannot import module {module_name!r} of target {target!r} ({err})") from err
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{label}: target {target!r}: {module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{label}: target {target!r} is not callable ({type(obj).__name__})")
    return obj


@register_foundation_model("callable")
@dataclass
class CallableModel(FoundationModel):
    target: str

    def __post_init__(self) -> None:
        self._function = resolve_target(self.target, f"foundation model {self.name!r}")

    @property
    def label(self) -> str:
        return f"foundation model 'callable' ({self.target})"

    answers_maps = True  # on a segmentation run the function is asked for (N, K, H, W) maps

    def predict(self, images: np.ndarray, num_classes: int) -> Any:
        view = images.view()
        view.flags.writeable = False  # the function must not change the public set
        return self._function(view, num_classes)

    def predict_maps(self, images: np.ndarray, num_classes: int) -> Any:
        return self.predict(images, num_classes)  # the same call: a function configured for a segmentation run answers maps


# --- http: redaction, transport rules, retries -------------------------------------------------

SECRET_PARAM = re.compile(r"token|key|secret|sig|pass|pwd|auth|credential|session", re.IGNORECASE)
REDACTED = "***"
RETRY_STATUSES = frozenset({429, *range(500, 600)}) - {501, 505}  # 501/505: the server will never do it
MAX_WAIT = 60.0  # seconds: the longest pause between two tries, Retry-After included
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def redact(url: str) -> str:
    """`url` safe to show: credentials (user:password@) and the values of query or fragment
    parameters whose name looks like a secret (token, api_key, sig, password, ...) become ***.
    Works on the raw text, so a url urllib cannot parse is redacted too."""
    text = str(url)
    text = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*:)?//[^/?#]*@", lambda m: f"{m.group(1) or ''}//{REDACTED}@", text)

    def param(match: re.Match[str]) -> str:
        sep, key, value = match.group(1), match.group(2), match.group(3)
        return f"{sep}{key}={REDACTED}" if value and SECRET_PARAM.search(urllib.parse.unquote_plus(key)) else match.group(0)

    return re.sub(r"([?&;#])([^=&;#]*)=([^&;#]*)", param, text)


def is_loopback(host: str | None) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (also IPv4-mapped): traffic that never leaves the machine."""
    if not host:
        return False
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are refused (urllib would resend the Authorization header to the new host, even
    over plain http); the 3xx then reaches the caller as an HTTPError."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class _Retryable(Exception):
    """One try failed in a way that may pass: a connection error, a timeout, 429 or a 5xx."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(headers: Any) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    value = (headers.get("Retry-After") if headers is not None else None) or ""
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return max(0.0, (when - dt.datetime.now(dt.timezone.utc)).total_seconds())


@register_foundation_model("http")
@dataclass(repr=False)
class HttpModel(FoundationModel):
    url: str
    timeout: float = 60.0  # seconds, each request
    batch_size: int = 64  # images per request
    max_response_mb: float = 64.0  # the largest answer read (10^6 bytes)
    deadline: float | None = 3600.0  # seconds for all batches, retries and waits included; None: no limit
    retries: int = 3  # further tries of a batch after a retryable failure
    retry_delay: float = 1.0  # seconds before the first retry, doubled each time (at most MAX_WAIT)
    auth_env: str | None = None  # name of the environment variable holding the Authorization header's value

    def __post_init__(self) -> None:
        shown = redact(self.url) if isinstance(self.url, str) else repr(self.url)
        parts = _split_url(self.url)
        host = parts.hostname if parts else None
        if parts is None or parts.scheme not in ("http", "https") or not host:
            raise ConfigError(f"foundation model 'http': url must be an http:// or https:// address (no spaces), got {shown}")
        if parts.username is not None or parts.password is not None:
            raise ConfigError(
                f"foundation model 'http': url {shown} carries credentials (user:password@); the run's config and provenance keep the url as written. "
                "Put the Authorization header's value in an environment variable and name it with option auth_env"
            )
        if parts.scheme == "http" and not is_loopback(host):
            raise ConfigError(
                f"foundation model 'http': url {shown} is plain http to {host}, which is not loopback: the images and answers would cross the network unencrypted. "
                "Use https:// (http:// is allowed for localhost, 127.0.0.0/8 and ::1 only)"
            )
        _check_positive(self.label, "timeout", self.timeout)
        _check_count(self.label, "batch_size", self.batch_size, minimum=1)
        _check_positive(self.label, "max_response_mb", self.max_response_mb)
        if self.deadline is not None:
            _check_positive(self.label, "deadline", self.deadline)
        _check_count(self.label, "retries", self.retries, minimum=0)
        if not isinstance(self.retry_delay, (int, float)) or isinstance(self.retry_delay, bool) or not 0 <= self.retry_delay <= MAX_WAIT:
            raise ConfigError(f"{self.label}: option retry_delay must be a number of seconds from 0 to {MAX_WAIT:g}, got {self.retry_delay!r}")
        if self.auth_env is not None:
            if not isinstance(self.auth_env, str) or not ENV_NAME.fullmatch(self.auth_env):
                # Not echoed: a value here may be the secret itself, put where its variable's name belongs.
                raise ConfigError(f"{self.label}: option auth_env must be the name of an environment variable (letters, digits, _), not its value")
            self._authorization()  # set here, or an error now rather than after the run has started
        secrets = sorted({key for key in re.findall(r"[?&;#]([^=&;#]*)=[^&;#]", self.url) if SECRET_PARAM.search(urllib.parse.unquote_plus(key))})
        if secrets:
            log.warning("%s: the url carries what looks like a secret (%s); it is stored with the run's config as written: prefer option auth_env", self.label, ", ".join(secrets))

    @property
    def label(self) -> str:
        return f"foundation model 'http' at {redact(self.url)}"

    def __repr__(self) -> str:
        options = ", ".join(f"{f.name}={redact(self.url) if f.name == 'url' else getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"{type(self).__name__}({options})"

    answers_maps = True  # a segmentation run's requests say "output": "maps" (module docstring)

    def predict(self, images: np.ndarray, num_classes: int) -> np.ndarray:
        return self._ask_all(images, num_classes, maps=False)

    def predict_maps(self, images: np.ndarray, num_classes: int) -> np.ndarray:
        return self._ask_all(images, num_classes, maps=True)

    def _ask_all(self, images: np.ndarray, num_classes: int, *, maps: bool) -> np.ndarray:
        ends = None if self.deadline is None else time.monotonic() + self.deadline
        starts = range(0, len(images), self.batch_size)
        parts: list[np.ndarray] = []  # the answered batches: a retry asks again for the failed one only
        for start in starts:
            console.report(f"asking {self.label}, images", start, len(images))  # each batch a round trip: the bar moves with them
            batch = images[start : start + self.batch_size]
            where = f"{self.label} (images {start}..{start + len(batch) - 1})"
            done = f"{len(parts)} of {len(starts)} batches had been answered" + (f" (images 0..{start - 1})" if parts else "")
            answer = self._ask(json.dumps(encode_request(batch, num_classes, maps=maps)).encode(), where, done, ends)
            try:
                probs = _probabilities(answer, where)
            except FoundationModelError as err:  # it quotes the body, which may echo the request
                raise FoundationModelError(self._clean(str(err))) from None
            if maps:
                parts.append(check_probability_maps(probs, n=len(batch), num_classes=num_classes, size=(int(images.shape[2]), int(images.shape[3])), source=where))
            else:
                parts.append(check_probabilities(probs, n=len(batch), num_classes=num_classes, source=where))
        console.report(f"asking {self.label}, images", len(images), len(images))
        return np.concatenate(parts)

    def _ask(self, body: bytes, where: str, done: str, ends: float | None) -> bytes:
        """One batch's answer, retried with exponential backoff after a retryable failure."""
        for attempt in range(self.retries + 1):
            remaining = self._remaining(ends, where, done)
            try:
                return self._post(body, min(self.timeout, remaining), ends, where, done)
            except _Retryable as err:
                failure = str(err)
                wait = min(self.retry_delay * 2**attempt, MAX_WAIT)
                if err.retry_after is not None:
                    wait = max(wait, min(err.retry_after, MAX_WAIT))
            if ends is not None and time.monotonic() >= ends:
                raise FoundationModelError(f"{where}: {failure}; the deadline of {self.deadline:g} s for all batches passed (option deadline); {done}")
            if attempt == self.retries:
                break
            if ends is not None and time.monotonic() + wait >= ends:
                raise FoundationModelError(f"{where}: {failure}; no time left to wait {wait:.3g} s and retry within the deadline of {self.deadline:g} s (option deadline); {done}")
            log.warning("%s: %s; trying again in %.3g s (retry %d of %d)", where, failure, wait, attempt + 1, self.retries)
            time.sleep(wait)
        raise FoundationModelError(f"{where}: {failure}; gave up after {self.retries + 1} tries (option retries={self.retries}); {done}")

    def _remaining(self, ends: float | None, where: str, done: str) -> float:
        if ends is None:
            return float("inf")
        remaining = ends - time.monotonic()
        if remaining <= 0:
            raise FoundationModelError(f"{where}: the deadline of {self.deadline:g} s for all batches passed (option deadline); {done}")
        return remaining

    def _post(self, body: bytes, timeout: float, ends: float | None, where: str, done: str) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.auth_env is not None:
            headers["Authorization"] = self._authorization()
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        # Every error is raised `from None` after its text is cleaned: a chained exception's
        # text (urllib's for a bad url) could show what the message hides.
        try:
            with _opener(self.url).open(request, timeout=timeout) as response:
                return self._read(response, ends, where, done)
        except urllib.error.HTTPError as err:  # before URLError: it is one
            with err:
                detail = self._clean(err.read(300).decode("utf-8", "replace").strip())
            message = f"the server answered HTTP {err.code} {err.reason}: {detail!r}"
            if err.code in RETRY_STATUSES:
                raise _Retryable(message, _retry_after(err.headers)) from None
            if 300 <= err.code < 400:
                location = err.headers.get("Location") if err.headers is not None else None
                message += f"; redirects are not followed (the Authorization header would go along): set url to the final address ({redact(location or '?')})"
            raise FoundationModelError(f"{where}: {message}; {done}") from None
        except urllib.error.URLError as err:
            reason = err.reason
            if isinstance(reason, ssl.SSLError):  # a certificate that does not verify will not verify on the next try
                hint = "; the server's certificate must verify against the system's CAs (SSL_CERT_FILE names another bundle)" if isinstance(reason, ssl.SSLCertVerificationError) else ""
                raise FoundationModelError(f"{where}: TLS failed ({self._clean(str(reason))}){hint}; {done}") from None
            if isinstance(reason, TimeoutError):
                raise _Retryable(self._timed_out(timeout)) from None
            raise _Retryable(f"cannot reach {redact(self.url)} ({self._clean(str(reason))})") from None
        except TimeoutError:
            raise _Retryable(self._timed_out(timeout)) from None
        except (OSError, http.client.HTTPException) as err:
            raise _Retryable(f"the connection to {redact(self.url)} failed ({type(err).__name__}: {self._clean(str(err))})") from None

    def _read(self, response: Any, ends: float | None, where: str, done: str) -> bytes:
        """The body, at most max_response_mb: a larger Content-Length is refused unread, a longer
        body is cut after cap + 1 bytes. read1 returns what has arrived, so the deadline holds
        against a server that trickles its answer."""
        cap = int(self.max_response_mb * 1_000_000)
        too_big = f"over the {self.max_response_mb:g} MB cap (option max_response_mb)"
        length = (response.headers.get("Content-Length") or "").strip()
        if length.isdigit() and int(length) > cap:
            raise FoundationModelError(f"{where}: the server announced an answer of {int(length)} bytes (Content-Length), {too_big}; not read")
        chunks, size = [], 0
        while size <= cap:
            self._remaining(ends, where, done)
            chunk = response.read1(min(1 << 16, cap + 1 - size))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
        raise FoundationModelError(f"{where}: the server's answer is {too_big}; stopped reading after {size} bytes")

    def _timed_out(self, timeout: float) -> str:
        return f"no answer from {redact(self.url)} within {timeout:.3g} s (option timeout{', shortened by option deadline' if timeout < self.timeout else ''})"

    def _authorization(self) -> str:
        """The Authorization header's value, read from the environment at each use (never kept)."""
        name = self.auth_env or ""
        value = os.environ.get(name, "")
        if not value.strip():
            raise ConfigError(
                f"{self.label}: option auth_env names the environment variable {name}, which is {'empty' if name in os.environ else 'not set'} in this process (host {socket.gethostname()}); set it to the Authorization header's value, e.g. 'Bearer <token>', where the run's driver starts"
            )
        if any(c in value for c in "\r\n\x00"):
            raise ConfigError(f"{self.label}: the environment variable {name} (option auth_env) holds a line break; it must be one header value")
        return value

    def _clean(self, text: str) -> str:
        """`text` (a server's error body, an exception's message) without the url's secrets or the
        Authorization value: servers that echo the request must not print them."""
        secrets = []
        if self.auth_env and os.environ.get(self.auth_env, "").strip():
            value = os.environ[self.auth_env]
            secrets += [value, value.partition(" ")[2]]  # "Bearer abc": also "abc" alone
        for key, value in re.findall(r"[?&;#]([^=&;#]*)=([^&;#]*)", self.url):
            if SECRET_PARAM.search(urllib.parse.unquote_plus(key)):
                secrets += [value, urllib.parse.unquote_plus(value)]
        text = text.replace(self.url, redact(self.url))
        for secret in sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True):
            text = text.replace(secret, REDACTED)
        return text


_OPENER = urllib.request.build_opener(_NoRedirect)  # https: the proxy variables apply (a CONNECT tunnel, TLS end to end)
# Loopback never goes through a proxy: http_proxy would otherwise get the images and the
# Authorization header in clear text (urllib proxies 127.0.0.1 too unless no_proxy names it).
_DIRECT = urllib.request.build_opener(_NoRedirect, urllib.request.ProxyHandler({}))


def _opener(url: str) -> urllib.request.OpenerDirector:
    """The opener for `url`: direct to a loopback host, else through the environment's proxies."""
    parts = _split_url(url)
    return _DIRECT if parts is not None and is_loopback(parts.hostname) else _OPENER


def _split_url(url: Any) -> urllib.parse.SplitResult | None:
    """The parts of an absolute url without whitespace or control characters; None otherwise."""
    if not isinstance(url, str) or re.search(r"[\s\x00-\x1f\x7f]", url):
        return None
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # a port that is not a number raises here, not at the first request
    except ValueError:
        return None
    return parts


def _check_count(label: str, key: str, value: Any, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{label}: option {key} must be an integer >= {minimum}, got {value!r}")


def encode_request(images: np.ndarray, num_classes: int, *, maps: bool = False) -> dict[str, Any]:
    """The JSON body of one HTTP request (see the module docstring); `maps`: a segmentation run's."""
    data = base64.b64encode(np.ascontiguousarray(images).tobytes()).decode("ascii")
    request = {"shape": list(images.shape), "dtype": "uint8", "data": data, "num_classes": num_classes}
    return {**request, "output": "maps"} if maps else request


def _probabilities(raw: bytes, where: str) -> Any:
    try:
        answer = json.loads(raw)
    except ValueError as err:
        raise FoundationModelError(f"{where} answered with invalid JSON ({err}): {raw[:200]!r}") from err
    if not isinstance(answer, dict) or "probabilities" not in answer:
        got = f"keys {sorted(answer)}" if isinstance(answer, dict) else type(answer).__name__
        raise FoundationModelError(f'{where} answered {got}; expected a JSON object {{"probabilities": [[...], ...]}}')
    return answer["probabilities"]
