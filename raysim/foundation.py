"""Foundation models: class probabilities for a public image set, computed once per run.

FedHelp's small clients learn from a foundation model's soft targets on a public, unlabeled
set (specs/fedhelp.md, Stage 0). The model is queried once, the answers are stored in a
Parquet file next to the run and reused every round and after a resume: `soft_targets`.

A backend maps uint8 images shaped (N, C, H, W), as raysim shards store them, and the number
of classes K to an array (N, K) of probabilities (non-negative, finite, rows summing to 1
within 1e-4). Backends live in `FOUNDATION_MODELS` (entry-point group
`raysim.foundation_models`) and are built from a plain dict of options:

- `timm`: `model` (any timm name), optional `weights` (a local state dict whose head has K
  classes), `img_size` (resize the images first), `batch_size` (64), `device` (default: cuda
  when available). Pixels are normalised with the model's mean/std, softmax on the logits.
- `callable`: `target` = "package.module:function"; the function gets the read-only uint8
  batch and K and returns an array-like (N, K) of probabilities.
- `http`: `url`, optional `timeout` (seconds, 60) and `batch_size` (64 images per request).

HTTP protocol (one POST per batch, JSON both ways)::

    request:  {"shape": [N, C, H, W], "dtype": "uint8", "num_classes": K,
               "data": "<base64 of the images' raw C-order bytes>"}
    response: {"probabilities": [[p_0, ..., p_{K-1}], ...]}   # N rows, status 200
    errors:   any non-2xx status; its body (text) is shown to the user

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
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import importlib
import json
import logging
import os
import pickle
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

from raysim.config import ConfigError, ModelConfig
from raysim.models import build_model, normalization
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

    @abstractmethod
    def predict(self, images: np.ndarray, num_classes: int) -> Any:
        """Class probabilities (N, num_classes), array-like; validated by the caller."""


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
    finite = np.isfinite(array)
    if not finite.all():
        row = int(np.argwhere(~finite)[0, 0])
        raise FoundationModelError(f"{source} returned NaN or infinite values (first in row {row}); expected probabilities")
    if (array < 0).any():
        row = int(np.argwhere(array < 0)[0, 0])
        raise FoundationModelError(f"{source} returned negative values (row {row}: min {array[row].min():.6g}); expected probabilities, not logits")
    sums = array.sum(axis=1)
    off = np.abs(sums - 1.0)
    if off.max() > SUM_TOLERANCE:
        row = int(off.argmax())
        raise FoundationModelError(f"{source} returned rows that do not sum to 1 (row {row} sums to {sums[row]:.6g}, tolerance {SUM_TOLERANCE}); expected softmax probabilities")
    return array


def predict_probabilities(model: FoundationModel, images: np.ndarray, num_classes: int) -> np.ndarray:
    """Ask `model` about all `images` (it batches internally) and validate the answer."""
    check_images(images, model.label)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"{model.label}: num_classes must be an integer >= 2, got {num_classes!r}")
    return check_probabilities(model.predict(images, num_classes), n=len(images), num_classes=num_classes, source=model.label)


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


# --- backends ------------------------------------------------------------------------------


def _check_positive(label: str, key: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
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
                x = torch.from_numpy(np.array(images[start : start + self.batch_size], dtype=np.float32)).to(device).div_(255.0)
                if self.img_size and tuple(x.shape[-2:]) != (self.img_size, self.img_size):
                    x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", antialias=True, align_corners=False)
                out.append(torch.softmax(net((x - mean) / std).double(), dim=1).cpu().numpy())
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

    def predict(self, images: np.ndarray, num_classes: int) -> Any:
        view = images.view()
        view.flags.writeable = False  # the function must not change the public set
        return self._function(view, num_classes)


@register_foundation_model("http")
@dataclass
class HttpModel(FoundationModel):
    url: str
    timeout: float = 60.0
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or urllib.parse.urlsplit(self.url).scheme not in ("http", "https") or not urllib.parse.urlsplit(self.url).netloc:
            raise ConfigError(f"foundation model 'http': url must be an http:// or https:// address, got {self.url!r}")
        _check_positive(self.label, "timeout", self.timeout)
        _check_positive(self.label, "batch_size", self.batch_size)

    @property
    def label(self) -> str:
        return f"foundation model 'http' at {self.url}"

    def predict(self, images: np.ndarray, num_classes: int) -> np.ndarray:
        parts = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            answer = self._post(encode_request(batch, num_classes))
            where = f"{self.label} (images {start}..{start + len(batch) - 1})"
            parts.append(check_probabilities(_probabilities(answer, where), n=len(batch), num_classes=num_classes, source=where))
        return np.concatenate(parts)

    def _post(self, payload: dict[str, Any]) -> bytes:
        request = urllib.request.Request(self.url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json", "Accept": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as err:  # before URLError: it is one
            detail = err.read(300).decode("utf-8", "replace").strip()
            raise FoundationModelError(f"{self.label}: the server answered HTTP {err.code} {err.reason}: {detail!r}") from err
        except urllib.error.URLError as err:
            raise FoundationModelError(f"{self.label}: cannot reach {self.url} ({err.reason})") from err
        except TimeoutError as err:
            raise FoundationModelError(f"{self.label}: no answer from {self.url} within {self.timeout} s (option timeout)") from err
        except (OSError, http.client.HTTPException) as err:
            raise FoundationModelError(f"{self.label}: the connection to {self.url} failed ({type(err).__name__}: {err})") from err


def encode_request(images: np.ndarray, num_classes: int) -> dict[str, Any]:
    """The JSON body of one HTTP request (see the module docstring)."""
    data = base64.b64encode(np.ascontiguousarray(images).tobytes()).decode("ascii")
    return {"shape": list(images.shape), "dtype": "uint8", "data": data, "num_classes": num_classes}


def _probabilities(raw: bytes, where: str) -> Any:
    try:
        answer = json.loads(raw)
    except ValueError as err:
        raise FoundationModelError(f"{where} answered with invalid JSON ({err}): {raw[:200]!r}") from err
    if not isinstance(answer, dict) or "probabilities" not in answer:
        got = f"keys {sorted(answer)}" if isinstance(answer, dict) else type(answer).__name__
        raise FoundationModelError(f'{where} answered {got}; expected a JSON object {{"probabilities": [[...], ...]}}')
    return answer["probabilities"]
