"""Run by tests/engine/test_faults.py in a subprocess (it needs its own Ray): a local 3-node cluster (a head
with no CPUs, two 2-CPU workers); a run that loses the worker node hosting some client actors
after round 2's training. The test compares its OUT/cut/metrics.parquet with the uninterrupted
run's (its module's, on one node: results never depend on placement)."""
import json
import sys
from pathlib import Path

import pandas as pd
import ray
from ray.cluster_utils import Cluster

from raysim import config
from raysim.engine.driver import Driver

root, out, overrides = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
# The GCS declares a node dead after health_check_failure_threshold (5) failed checks, one every
# health_check_period_ms: Ray's 3 s made the run wait 15 s for the removed node; 1 s, 5 s. A check
# fails when the node does not answer (it is gone), not when it answers slowly.
health = {"health_check_period_ms": 1000}
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 100 * 1024**2, "_system_config": health})
workers = [cluster.add_node(num_cpus=2, object_store_memory=100 * 1024**2) for _ in range(2)]
ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
cluster.wait_for_nodes()


def run(run_dir: Path, lose_node: bool) -> tuple[pd.DataFrame, list[str]]:
    cfg = config.load(None, overrides)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config.dump(cfg))
    lines: list[str] = []
    driver = Driver(cfg, run_dir, echo=lines.append)
    try:
        driver.start()
        nodes = {}
        if lose_node:
            for cid in driver.specs:
                nodes[cid] = ray.get(driver.pool.actor_of(cid).node_id.remote())
        for round_, part in driver.advance(cfg.federation.rounds):
            # At a fixed point, synchronously (a timer raced rounds of 0.2 s): round 2's training
            # is folded, its evaluation and checkpoint call the lost node's actors next.
            if lose_node and (round_, part) == (2, "round"):
                victim = next(w for w in workers if w.node_id in nodes.values())
                lines.append(f"removing node hosting {[c for c, n in nodes.items() if n == victim.node_id]}")
                cluster.remove_node(victim, allow_graceful=False)
                lose_node = False
    finally:
        driver.shutdown()
    return driver.recorder.metrics, lines


try:
    _, lines = run(out / "cut", True)
finally:
    ray.shutdown()
    cluster.shutdown()
print("\n".join(lines))
