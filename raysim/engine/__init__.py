"""The Ray-facing engine: the driver, the client actor pool, the placement plan, checkpoints.

The only package (besides the entry points `raysim.run` and `raysim.tune`) that imports Ray;
algorithms, datasets, models and metrics are plain Python and never import this package
(tests/test_lint.py checks both rules).
"""
