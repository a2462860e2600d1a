"""Module paths of raysim 0.6 that moved in 0.7 (the package regrouped into layers): importing an
old path gives the new module, with a DeprecationWarning naming it. The old paths go in 0.8.

A finder, not one stub file per old path: a stub would import its new module upward from the
top of the package and break the layer order that `tests/test_lint.py` holds the code to.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

MOVED = {
    "raysim.adapters": "raysim.models.adapters",
    "raysim.compare_plots": "raysim.reports.compare_plots",
    "raysim.figures": "raysim.reports.figures",
    "raysim.foundation": "raysim.models.foundation",
    "raysim.jointmodels": "raysim.models.joint",
    "raysim.reporting": "raysim.outputs.recorder",
    "raysim.resume_check": "raysim.outputs.resume_check",
    "raysim.runs": "raysim.outputs.runs",
    "raysim.segmetrics": "raysim.metrics.segmentation",
    "raysim.segmodels": "raysim.models.segmentation",
    "raysim.storage": "raysim.outputs.storage",
    "raysim.study_report": "raysim.reports.study",
    "raysim.tasks": "raysim.client.tasks",
    "raysim.training": "raysim.client.training",
}
# raysim.metrics, raysim.models and raysim.client are packages now, under their old names: they
# re-export what the 0.6 modules held that a plugin imports. raysim.pretrain, raysim.report and
# raysim.compare stay the commands; their libraries are raysim.client.pretraining,
# raysim.reports.run_report and raysim.reports.compare.


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path (`MOVED`) to its new module, once per process."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new} in raysim 0.7; the old path goes in 0.8", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """The new module ran when it was imported."""


def install() -> None:
    if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(MovedModules())
