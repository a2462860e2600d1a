"""Deterministic torch settings for every process that computes (client actors and the driver).

Seeds alone do not make a run repeatable: cuDNN picks convolution algorithms by timing them
(`benchmark`), several CUDA kernels accumulate with atomics unless deterministic ones are
asked for, cuBLAS needs a fixed workspace for repeatable GEMMs, and the number of CPU threads
changes the order of floating-point reductions. `deterministic_torch` sets all of them.

What this does not fix: the CPU kernels torch and oneDNN / MKL choose by instruction set
(AVX-512 vs AVX2 give different rounding), so bit-identical results need the same kind of
CPU (`provenance.json` records what tells machines apart; `ATEN_CPU_CAPABILITY=default`
pins ATen's own kernels). See the README's determinism section.
"""

from __future__ import annotations

import os

import torch

# cuBLAS reads this when its first handle is created, so it must be set before CUDA starts.
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def deterministic_torch(threads: int) -> None:
    """Fix this process's torch threads and ask every backend for deterministic kernels.

    `warn_only=True`: a CUDA op with no deterministic implementation (e.g. the backward of
    adaptive average pooling) warns, naming itself, instead of stopping a run that is
    otherwise repeatable; on the CPU every op raysim uses is deterministic.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(threads)


def settings() -> dict[str, object]:
    """The current determinism settings of this process (for provenance.json)."""
    return {
        "torch_threads": torch.get_num_threads(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }
