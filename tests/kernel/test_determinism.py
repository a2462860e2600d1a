"""Deterministic torch settings, set in every process that computes (no Ray needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow  # a fresh interpreter in a subprocess
def test_deterministic_torch_sets_every_backend_before_cuda_starts() -> None:
    # A fresh process: the settings are global, and CUBLAS_WORKSPACE_CONFIG only counts before CUDA starts.
    code = (
        "import json\n"
        "from raysim.determinism import deterministic_torch, settings\n"
        "deterministic_torch(3)\n"
        "print(json.dumps(settings()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True).stdout
    found = json.loads(out)
    assert found == {
        "torch_threads": 3,
        "cudnn_deterministic": True,
        "cudnn_benchmark": False,
        "deterministic_algorithms": True,
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    }
