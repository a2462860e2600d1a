"""A stand-in segmentation foundation model for the FedHelp segmentation tests (`callable` backend):
per-pixel class maps (N, K, H, W) from the pixel's brightness (bright pixels lean to the cup,
dark ones to the background), as the optic nerve head is the fundus image's brightest part.

It appends to the file named by RAYSIM_TEST_FM_LOG on every call, so a test can count calls.
"""

from __future__ import annotations

import os

import numpy as np


def brightness_maps(images: np.ndarray, num_classes: int) -> np.ndarray:
    log = os.environ.get("RAYSIM_TEST_FM_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{len(images)}\n")
    v = images.astype(np.float64).mean(axis=1) / 255.0  # (N, H, W)
    logits = np.stack([6.0 * (k / (num_classes - 1) - 0.5) * (2 * v - 1) for k in range(num_classes)], axis=1)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
