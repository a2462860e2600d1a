"""Run by tests/test_faults.py in a subprocess (it needs its own Ray): a local 3-node cluster (a head
with no CPUs, two 2-CPU workers); the same run twice, the second losing the worker node that
hosts some client actors after round 2's training. Prints IDENTICAL when both end with the same metrics."""
import json
import sys
from pathlib import Path

import pandas as pd
import ray
from ray.cluster_utils import Cluster

from raysim import config
from raysim.engine.driver import Driver

root, out, overrides = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 100 * 1024**2})
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
    full, _ = run(out / "full", False)
    cut, lines = run(out / "cut", True)
finally:
    ray.shutdown()
    cluster.shutdown()
print("\n".join(lines))
pd.testing.assert_frame_equal(full, cut, check_exact=True)
print("IDENTICAL")
