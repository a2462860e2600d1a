"""Run by tests/engine/test_faults.py in a subprocess whose Ray loses the response to the first actor
call this process makes (Ray's RPC chaos hook, `RAY_testing_rpc_failure`): the actor ran it
but Ray reports it unavailable. That is the first `describe` of the run's start; it is asked
again and the run goes on with the same actors. Prints the console and then OK."""
import json
import sys
from pathlib import Path

import ray

from raysim import config
from raysim.engine.driver import Driver

root, out, overrides = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
lines: list[str] = []
try:
    cfg = config.load(None, overrides)
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(config.dump(cfg))
    metrics = Driver(cfg, out, echo=lines.append).run()
finally:
    ray.shutdown()
print("\n".join(lines))
metrics.to_parquet(out / "returned.parquet")
print("OK")
