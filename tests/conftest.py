"""Shared fixtures: one local Ray per test session and small generated data sets."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Generated sets and decoded shards go to a private cache, never the user's ~/.cache/raysim
# (set before Ray starts so its workers inherit it).
os.environ["RAYSIM_CACHE"] = tempfile.mkdtemp(prefix="raysim-test-cache-")

TINY = {"patients": 120, "seed": 3, "fundus_size": 32, "oct_shape": (4, 8, 8)}


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def oph_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic FairFedMed-Oph directory, generated once (treat as read-only)."""
    from raysim.datasets.synthetic import generate

    root = tmp_path_factory.mktemp("oph")
    generate(root, **TINY)
    return root


@pytest.fixture
def oph_copy(oph_root: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny set that a test may break."""
    import shutil

    target = tmp_path / "oph"
    shutil.copytree(oph_root, target)
    return target


def tiny_overrides(root: Path, **extra: object) -> list[str]:
    """Config overrides for a fast run on the tiny set: test_resnet at 16 px, 2 rounds."""
    values = {
        "data.name": "fairfedmed_oph",
        "data.root": str(root),
        "model.name": "test_resnet",
        "model.img_size": 16,
        "federation.rounds": 2,
        "federation.batch_size": 16,
        "eval.every": 1,
        "eval.bootstrap": 20,
        "resources.num_cpus": 0.25,
        "report.html": False,  # the report tests (tests/test_report.py) turn it on
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]
