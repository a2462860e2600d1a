"""Shared fixtures: one local Ray per test session and small generated data sets."""

from __future__ import annotations

import contextlib
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


@pytest.fixture(scope="session")
def small_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small synthetic CLIP (`python -m raysim.pretrain --clip`) at 32 px, trained for one
    epoch on a 60-patient public pool (seconds): the registry loops' CLIP host."""
    from raysim.client.clip_pretraining import ClipPretrainSettings, pretrain

    path = tmp_path_factory.mktemp("small_clip") / "small_clip.pt"
    pretrain(ClipPretrainSettings(img_size=32, patients=60, epochs=1, batch_size=16), path, echo=lambda _: None)
    return path


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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Under pytest-xdist (setup.cfg's `-n 2`) a test marked `exclusive` runs while no other worker
    runs a test: the ones that time a deadline or a wait, which a second worker on the same cores
    would slow past its bound. The others share. A waiting exclusive test goes first: new shared
    tests queue behind it (a turnstile), so it is not starved by a worker that never pauses."""
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run_id is None:
        yield
        return
    with _exclusive_lock(run_id, exclusive=item.get_closest_marker("exclusive") is not None):
        yield


@contextlib.contextmanager
def _exclusive_lock(run_id: str, *, exclusive: bool):
    import fcntl

    base = Path(tempfile.gettempdir()) / f"raysim-tests-{run_id}"
    with open(f"{base}.turnstile", "a") as turnstile, open(f"{base}.lock", "a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
