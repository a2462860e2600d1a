"""Seeds derived from (seed, round, client id, ...) so no result depends on scheduling."""

from __future__ import annotations

import zlib

import numpy as np


def derive_seed(seed: int, *parts: int | str) -> int:
    """A 63-bit seed that depends only on `seed` and `parts` (strings hashed stably)."""
    words = [seed] + [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


def rng(seed: int, *parts: int | str) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *parts))
