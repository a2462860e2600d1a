"""Data sources, one module each, registered by name.

Built-in sources are listed as `raysim.datasets` entry points in setup.cfg, exactly like a
third-party plugin, so importing this package stays light and `python -m
raysim.datasets.synthetic` does not import itself twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from raysim.config import ConfigError
from raysim.datasets.base import DATASETS, ClientSpec, DataError, DataSource, SampleTable, Shard, register_dataset

if TYPE_CHECKING:
    from raysim.config import ExperimentConfig

__all__ = ["DATASETS", "ClientSpec", "DataError", "DataSource", "SampleTable", "Shard", "check", "register_dataset"]


def check(cfg: ExperimentConfig) -> None:
    """`data.name` against the registry (a ConfigError listing the choices); called by
    `raysim.algorithms.check`, which every entry point runs after `config.load`."""
    if cfg.data.name not in DATASETS:
        raise ConfigError(f"data.name: {DATASETS.unknown_message(cfg.data.name)}")
