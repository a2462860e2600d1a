"""Image helpers every data source shares: decode, to channels-first uint8, resize once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from raysim.datasets.base import DataError


def resize_chw(image: np.ndarray, size: int, channels: int) -> np.ndarray:
    """(H, W) or (H, W, C) uint8 -> (channels, size, size) uint8, bilinear with antialiasing.

    Grayscale is repeated to `channels`; colour is averaged when one channel is wanted.
    """
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise ValueError(f"expected a 2D image (H, W) or (H, W, C), got shape {image.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(image)).to(torch.float32).permute(2, 0, 1)[None]
    if tensor.shape[1] != channels:
        tensor = tensor.mean(dim=1, keepdim=True).expand(-1, channels, -1, -1) if channels == 1 or tensor.shape[1] == 1 else tensor[:, :channels]
    if tensor.shape[-2:] != (size, size):
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return tensor[0].round().clamp(0, 255).to(torch.uint8).numpy()


def read_image(path: Path, *, grayscale: bool) -> np.ndarray:
    """Decode a JPEG/PNG file to uint8 (H, W) or (H, W, 3); a clear DataError when it cannot."""
    from PIL import Image, UnidentifiedImageError  # pillow comes with torchvision

    if not path.is_file():
        raise DataError(f"{path}: image file missing")
    try:
        with Image.open(path) as img:
            return np.array(img.convert("L" if grayscale else "RGB"))  # a writable copy for torch
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path}: not a readable image ({err})") from err
