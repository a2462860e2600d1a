"""raysim: a Ray-based simulation engine for fair federated learning in medical imaging."""

from raysim import moved

__version__ = "0.7.0"

moved.install()  # raysim 0.6's module paths, with a DeprecationWarning (raysim.moved)
