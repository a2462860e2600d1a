"""A client's side of a run, plain Python: `Client` (its shards and its own state), the one local
training loop (`training`), the tasks (`tasks`: classification, segmentation, joint) and the
centrally pretrained backbone adapter methods start from (`pretraining`). `Client` stays
importable from here (`from raysim.client import Client`), as in 0.6, when this was one module.
"""

from raysim.client.client import EVAL_BATCH, Client, load_in_place

__all__ = ["EVAL_BATCH", "Client", "load_in_place"]
