"""The Ray-facing engine (layer 9): the driver (round loop, recovery, checkpoint streaming), the
driver actor, the client actor pool, the placement plan, checkpoints, and Ray Tune's trials
(`tune`, with the plain study-file model in `study`).

The only package that imports Ray (the entry points `raysim.run` and `raysim.tune` reach it
through this package); algorithms, datasets, models and metrics are plain Python and never
import it (tests/test_lint.py checks both rules).
"""
