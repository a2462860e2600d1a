"""Image helpers every data source shares: decode, to channels-first uint8, resize once."""

from __future__ import annotations

import re
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from raysim.datasets.arrays import READ_ERRORS, check_size, image_pixel_limit, npz_header
from raysim.datasets.base import DataError


def resize_chw(image: np.ndarray, size: int, channels: int) -> np.ndarray:
    """(H, W) or (H, W, C) uint8 -> (channels, size, size) uint8, bilinear with antialiasing.

    Grayscale is repeated to `channels`; colour is averaged when one channel is wanted.
    """
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise ValueError(f"expected a 2D image (H, W) or (H, W, C), got shape {image.shape}")
    if image.shape == (size, size, channels) and image.dtype == np.uint8:
        return np.ascontiguousarray(image.transpose(2, 0, 1))  # nothing to resize or mix (MedMNIST at its own size): what the path below gives
    tensor = torch.from_numpy(np.ascontiguousarray(image)).to(torch.float32).permute(2, 0, 1)[None]
    if tensor.shape[1] != channels:
        tensor = tensor.mean(dim=1, keepdim=True).expand(-1, channels, -1, -1) if channels == 1 or tensor.shape[1] == 1 else tensor[:, :channels]
    if tensor.shape[-2:] != (size, size):
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return tensor[0].round().clamp(0, 255).to(torch.uint8).numpy()


def read_image(path: Path, *, grayscale: bool) -> np.ndarray:
    """Decode a JPEG/PNG file to uint8 (H, W) or (H, W, 3); a clear DataError when it cannot.

    Images over PIL's `Image.MAX_IMAGE_PIXELS` (89.5 M pixels; PIL only warns up to twice
    that) are refused before any pixel is decoded: a header declaring a huge size is a
    decompression bomb or a corrupt file, and decoding it could exhaust the actor's memory.
    """
    from PIL import Image, UnidentifiedImageError  # pillow comes with torchvision

    if not path.is_file():
        raise DataError(f"{path}: image file missing")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return np.array(img.convert("L" if grayscale else "RGB"))  # a writable copy for torch
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        found = re.search(r"\((\d+) pixels\)", str(err))  # PIL: "Image size (N pixels) exceeds limit of ..."
        size = f"{found.group(1)} pixels" if found else str(err)
        raise DataError(f"{path}: not a readable image: {size}, over the limit of {Image.MAX_IMAGE_PIXELS} (PIL's Image.MAX_IMAGE_PIXELS; a decompression bomb or a corrupt header)") from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error) as err:
        raise DataError(f"{path}: not a readable image ({err})") from err


NPZ_READ_ERRORS = READ_ERRORS


def check_npz_array_size(data: Any, key: str, path: Path) -> None:
    """Refuse an npz image array over PIL's `Image.MAX_IMAGE_PIXELS` values (or more bytes than
    its member holds) from its header, before it is decompressed (`datasets.arrays`)."""
    shape, dtype, payload = npz_header(data, key, path)
    check_size(f"{path}: {key}", shape, dtype, payload, max_values=image_pixel_limit(), corrupt=f"{path}: array {key!r}")
