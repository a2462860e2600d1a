"""raysim: a Ray-based simulation engine for fair federated learning in medical imaging."""

__version__ = "0.6.0"
