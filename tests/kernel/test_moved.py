"""raysim 0.6's module paths still import, for one release, with a DeprecationWarning naming the
new path (issue 28: the package regrouped into layers)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from raysim import moved


@pytest.mark.slow  # a fresh interpreter in a subprocess
def test_every_old_module_path_gives_the_new_module_with_a_warning() -> None:
    """One interpreter for all of them (each import loads torch): every old path warns once,
    naming its new path, and is the new module itself."""
    code = """
import importlib, json, sys, warnings
from raysim import moved
seen = {}
for old, new in sorted(moved.MOVED.items()):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        module = importlib.import_module(old)
    seen[old] = [[str(w.message) for w in caught if w.category is DeprecationWarning], module is importlib.import_module(new)]
print(json.dumps(seen))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert set(seen) == set(moved.MOVED) and len(seen) >= 13
    for old, (messages, same) in seen.items():
        assert messages == [f"{old} moved to {moved.MOVED[old]} in raysim 0.7; the old path goes in 0.8"], old
        assert same, old


@pytest.mark.slow  # a fresh interpreter in a subprocess
def test_the_readme_names_that_moved_still_resolve() -> None:
    """What README.md and plugins named in 0.6 (`raysim.tasks.decode_mask`, `raysim.runs.holdout_values`,
    `from raysim.models import build_model`, `from raysim.client import Client`, `raysim.metrics.auc`)."""
    code = """
import warnings
warnings.simplefilter("ignore", DeprecationWarning)
from raysim.tasks import decode_mask
from raysim.runs import holdout_values
from raysim.models import build_model, normalization, model_task
from raysim.client import Client
from raysim.metrics import auc, UndefinedMetricWarning
from raysim.training import Batch, forward
from raysim.client.tasks import decode_mask as new_decode
assert decode_mask is new_decode
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
