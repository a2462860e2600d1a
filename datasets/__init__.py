"""Data sources, one module each, registered by name.

Built-in sources are listed as `raysim.datasets` entry points in setup.cfg, exactly like a
third-party plugin, so importing this package stays light and `python -m
raysim.datasets.synthetic` does not import itself twice.
"""

from raysim.datasets.base import DATASETS, ClientSpec, DataError, DataSource, SampleTable, Shard, register_dataset

__all__ = ["DATASETS", "ClientSpec", "DataError", "DataSource", "SampleTable", "Shard", "register_dataset"]
