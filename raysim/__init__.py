"""raysim: a Ray-based simulation engine for fair federated learning in medical imaging."""

from raysim import moved

__version__ = "0.7.0"

moved.install()  # raysim 0.6's module paths, with a DeprecationWarning (raysim.moved)


def __getattr__(name: str) -> object:
    """`raysim.Engine` on first use: `import raysim` stays free of Ray and torch."""
    if name == "Engine":
        import importlib

        return importlib.import_module("raysim.engine.engine").Engine
    raise AttributeError(f"module 'raysim' has no attribute {name!r}")
