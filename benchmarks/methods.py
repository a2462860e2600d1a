"""Every method on the embedded synthetic set, same budget, several seeds: the methods table.

    python benchmarks/methods.py [--methods fedavg fairlora fairlora+ema=0 ...] [--seeds 0 1 2]
                                 [--out DIR] [--rounds 6] [--img-size 32] [--set KEY=VALUE ...]

A method may carry hyperparameters for an ablation: `fairlora+ema=0+own_weight=1.0` runs
fairlora with `algorithm.ema=0 algorithm.own_weight=1.0`. `--set` applies config overrides to
every run (the privacy sweep: `--set data.partition=dirichlet data.num_clients=12
data.alpha=0.1`); give such a sweep its own --out. Methods that spend a privacy budget get
the ε they spent (the `epsilon` row of client `server`, last round) in the table.

Each (method, seed) is one run of the embedded default (`--config default`: synthetic set,
resnet18, 3 clients, Adam) with the same rounds, image size and local epochs, target
attribute race. The table is `raysim.compare`'s (`python -m raysim.compare OUT` prints the
same one): each run at `runs.select_round`'s round (the evaluated round with the best mean
validation AUC), its test metrics pooled over seeds (mean ± sample std, 95 % t interval), next
to the truth.json oracle of the set; OUT/compare/ gets its CSVs and compare.html. Runs
already finished under --out are read, not rerun, so an interrupted benchmark continues. Not part of CI (about a minute per run on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd

from raysim import config
from raysim.algorithms import ALGORITHMS
from raysim.datasets import DATASETS
from raysim.engine.driver import finished_run
from raysim.engine.engine import Engine
from raysim.outputs.runs import RunReadError, natural_key, read_run
from raysim.reports import compare, compare_plots


def run_once(method: str, seed: int, args: argparse.Namespace) -> Path:
    run_dir = args.out / f"{method}-s{seed}"
    if (run_dir / "DONE").exists():
        return run_dir
    name, *params = method.split("+")
    overrides = [
        f"algorithm.name={name}",
        *(f"algorithm.{p}" for p in params),
        f"seed={seed}",
        f"model.img_size={args.img_size}",
        f"federation.rounds={args.rounds}",
        "data.attribute=race",
        f"eval.every={args.eval_every}",
        "eval.bootstrap=0",
        *args.set,
    ]
    return finished_run(config.load("default", overrides), run_dir)


def selected_row(run_dir: Path) -> dict[str, float]:
    """Test metrics at runs.select_round's round (raysim.compare's per-run row) and the run's seconds."""
    run = read_run(run_dir)
    return compare.run_row(run, run.attribute) | {"seconds": float((run_dir / "DONE").read_text())}


def learning_curves(out: Path, methods: list[str], seeds: list[int], attribute: str = "race") -> str:
    """Mean validation AUC per group of `attribute` and round (mean over clients, then seeds):
    the evidence for why a method does or does not close the group gap."""
    frames = []
    for method in methods:
        for seed in seeds:
            if not (out / f"{method}-s{seed}" / "DONE").exists():
                continue
            m = pd.read_parquet(out / f"{method}-s{seed}" / "metrics.parquet")
            m = m[(m["client"] == "mean") & (m["split"] == "val") & (m["metric"] == "auc") & (m["attribute"].isin(["", attribute]))]
            frames.append(m.assign(method=method, group=m["group"].replace("", "all")))
    if not frames:
        return ""
    curves = pd.concat(frames).pivot_table(index=["method", "round"], columns="group", values="value", aggfunc="mean", sort=False)
    groups = [g for g in curves.columns if g != "all"]
    lines = ["| method | round | all | " + " | ".join(groups) + " |", "|---|---|---|" + "---|" * len(groups)]
    for (method, round_), row in curves.iterrows():
        lines.append(f"| {method} | {round_} | {100 * row['all']:.1f} | " + " | ".join(f"{100 * row[g]:.1f}" for g in groups) + " |")
    return "\n".join(lines)


def oracle_line(img_size: int, overrides: list[str]) -> str:
    """The synthetic set's truth.json oracle ("" when `--set` chose another data set)."""
    if config.load("default", [f"model.img_size={img_size}", *overrides]).data.name != "synthetic":
        return ""
    cfg = config.load("default", [f"model.img_size={img_size}"])
    source = DATASETS.get(cfg.data.name)(cfg.data, img_size=img_size, seed=0)
    source.client_specs()  # generates the set if needed
    truth = json.loads((source.root / "truth.json").read_text())
    oracle = truth["oracle_mean_over_sites"]["oracle_auc"]
    return "truth.json oracle (per-group Bayes score, mean over sites): " + ", ".join(f"{g} {100 * v:.1f}" for g, v in oracle.items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    built_in = sorted(n for n in ALGORITHMS.names() if ALGORITHMS.get(n).__module__.startswith("raysim.algorithms."))
    parser.add_argument("--methods", nargs="+", default=built_in, help=f"methods (default: all built-ins: {' '.join(built_in)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmark-runs/methods"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run (e.g. data.num_clients=12)")
    parser.add_argument("--report-only", action="store_true", help="tabulate the finished runs under --out; train nothing")
    args = parser.parse_args(argv)
    if not args.report_only:
        Engine().open()  # Ray, and one warm pool of client actors for every run below (raysim.engine.warm)
    rows, run_dirs = [], []
    for seed in args.seeds:  # seed-major: an interrupted benchmark has every method for the first seeds
        for method in args.methods:
            if args.report_only and not (args.out / f"{method}-s{seed}" / "DONE").exists():
                continue
            run_dir = run_once(method, seed, args)
            row = selected_row(run_dir)
            rows.append({"method": method, "seed": seed, **row})
            run_dirs.append(run_dir)
            print(f"{method:<11} seed {seed}: test AUC {100 * row['auc']:.1f}, ES-AUC {100 * row.get('es_auc', float('nan')):.1f} (round {row['round']}, {row['seconds']:.0f} s)", flush=True)
    if not run_dirs:
        raise SystemExit(f"error: no finished run of {' '.join(args.methods)} under {args.out}")
    frame = pd.DataFrame(rows).sort_values(["method", "seed"], key=lambda c: c.map(args.methods.index) if c.name == "method" else c, kind="stable")
    frame.to_csv(args.out / "methods.csv", index=False)
    # The table is raysim.compare's, over the runs in its order (natural, as it reads a directory), so
    # `python -m raysim.compare <--out> --by algorithm` prints the same table when --out holds just these runs.
    try:
        comparison = compare.compare(sorted(run_dirs, key=lambda p: natural_key(p.name)), by=["algorithm"])
    except (compare.CompareError, RunReadError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.node()}, {args.rounds} rounds, {args.img_size} px, seeds {args.seeds}")
    print(comparison.markdown())
    compare_plots.write(comparison, args.out / "compare")  # table.md / .csv, per_run.csv, clients.csv, compare.html
    oracle = oracle_line(args.img_size, args.set)
    if oracle:
        print(oracle)
    curve_methods = [m for m in args.methods if m.split("+")[0] in ("fedavg", "fedlora", "fairlora")]
    curves = learning_curves(args.out, curve_methods, args.seeds, comparison.attribute) if curve_methods and comparison.attribute else ""
    if curves:
        print(f"\nvalidation AUC per round and {comparison.attribute} group (mean over clients and seeds):")
        print(curves)
    print(f"wall per run: {np.mean(frame['seconds']):.0f} s mean")


if __name__ == "__main__":
    main()
