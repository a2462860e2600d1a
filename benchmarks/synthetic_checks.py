"""The synthetic twin's checks (specs/synthetic.md) and the embedded default's wall time.

    python benchmarks/synthetic_checks.py [--seeds 0 1] [--out DIR]

For each seed it runs the embedded default (`python -m raysim.run seed=S`) in a fresh
process and reads the final test metrics; it also fits a site classifier on the raw
pixels, and prints the oracle numbers of truth.json beside the model's, as Markdown rows
for benchmarks/RESULTS.md. Not part of CI (several minutes per seed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from raysim import config
from raysim.datasets import DATASETS

RACES = ("Asian", "Black", "White")


def site_classifier_accuracy(source) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Test accuracy of a logistic regression telling the site from 16x16 pixels, and chance."""
    xs, ys = {"train": [], "test": []}, {"train": [], "test": []}
    for k, spec in enumerate(source.client_specs()):
        for split in ("train", "test"):
            shard = source.load(spec, split)
            small = shard.images.reshape(len(shard.images), 1, 16, 4, 16, 4).mean(axis=(3, 5))
            xs[split].append(small.reshape(len(small), -1) / 255.0)
            ys[split].append(np.full(len(small), k))
    x_train, y_train = np.concatenate(xs["train"]), np.concatenate(ys["train"])
    x_test, y_test = np.concatenate(xs["test"]), np.concatenate(ys["test"])
    clf = LogisticRegression(max_iter=2000).fit(x_train, y_train)
    chance = np.bincount(y_test).max() / len(y_test)
    return float(clf.score(x_test, y_test)), float(chance)


def run_default(seed: int, out: Path) -> dict[str, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "raysim.run", "--out", str(out), f"seed={seed}"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    metrics = pd.read_parquet(out / "metrics.parquet")
    final = metrics[(metrics["round"] == metrics["round"].max()) & (metrics["split"] == "test") & (metrics["client"] == "mean")]
    value = {(r.attribute, r.group, r.metric): r.value for r in final.itertuples()}
    groups = {g: value[("race", g, "auc")] for g in RACES}
    return {
        "seed": seed,
        "wall_s": wall,
        "auc": value[("", "", "auc")],
        "es_auc": value[("race", "", "es_auc")],
        **{f"auc_{g}": v for g, v in groups.items()},
        "race_gap": max(groups.values()) - min(groups.values()),
        "eod": value[("race", "", "eod")],
        "spd": value[("race", "", "spd")],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cfg = config.load()
    source = DATASETS.get("synthetic")(cfg.data, img_size=cfg.model.img_size, seed=cfg.seed)
    source.client_specs()  # generate (or reuse) the default set
    truth = json.loads((source.root / "truth.json").read_text())
    accuracy, chance = site_classifier_accuracy(source)
    print(f"# {time.strftime('%Y-%m-%d')} on {platform.node()} ({platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores)")
    print(f"site classifier (logistic regression, 16x16 pixels): test accuracy {accuracy:.3f} (chance {chance:.3f})")
    oracle = truth["oracle"]
    for site, entry in oracle.items():
        print(f"oracle {site}: " + ", ".join(f"{g} {entry['oracle_auc'][g]:.3f}" for g in ("all", *RACES)) + "; blind-cup FPR at White threshold: " + ", ".join(f"{g} {entry['blind_cup_fpr_at_white_threshold'][g]:.2f}" for g in RACES))
    base = args.out or Path(tempfile.mkdtemp(prefix="raysim-bench-"))
    rows = [run_default(seed, base / f"seed{seed}") for seed in args.seeds]
    print("\n| seed | wall (s) | AUC | ES-AUC | AUC Asian | AUC Black | AUC White | race gap | EOD | SPD |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['wall_s']:.0f} | " + " | ".join(f"{100 * r[k]:.1f}" for k in ("auc", "es_auc", "auc_Asian", "auc_Black", "auc_White", "race_gap", "eod", "spd")) + " |")


if __name__ == "__main__":
    main()
