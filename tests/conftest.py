"""Shared fixtures: one local Ray per test session and small generated data sets."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from helpers import TINY

# Generated sets and decoded shards go to a private cache, never the user's ~/.cache/raysim
# (set before Ray starts so its workers inherit it).
os.environ["RAYSIM_CACHE"] = tempfile.mkdtemp(prefix="raysim-test-cache-")


@pytest.fixture(scope="session")
def engine():
    """One local Ray and one `Engine` for the whole session: every Driver a test builds in this
    process, and every `engine.run`, reuses its warm client actors (raysim.engine.warm), as a
    notebook would; a test that needs fresh ones installs none (`warm.installed(None)`)."""
    import ray

    from raysim.engine.engine import Engine

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    with Engine() as session_engine:
        yield session_engine
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_session(engine):
    import ray

    return ray


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


SLOW_FIXTURES = {"ray_session", "engine", "end_to_end"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test on the session's Ray, or on a module's whole runs through the CLI, is `slow`:
    actors take seconds each to start."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
