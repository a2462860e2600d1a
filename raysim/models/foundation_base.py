"""What a foundation-model backend is and what its answer must be: the `FoundationModel` base
class, the `FOUNDATION_MODELS` registry and its decorator, and the checks every answer passes
(`predict_probabilities`, `predict_probability_maps`).

Apart from `raysim.models.foundation` (the public face, which imports every built-in backend)
so that the backends (`foundation_local`, `foundation_http`) and the soft-target store
(`soft_targets`) can import the contract without importing each other or the public module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from raysim.config import ConfigError
from raysim.registry import Registry

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


# --- options shared by the backends ---------------------------------------------------------


def check_positive(label: str, key: str, value: Any) -> None:
    """A ConfigError unless option `key` is a finite number > 0 (timm and http share this rule)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):  # NaN fails too
        raise ConfigError(f"{label}: option {key} must be a positive number, got {value!r}")
