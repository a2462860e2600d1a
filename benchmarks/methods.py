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
attribute race. The reported round of each run is the evaluated round with the best mean
validation AUC; its test metrics go into the table (mean ± std over seeds), next to the
truth.json oracle of the set. Runs already finished under --out are read, not rerun, so an
interrupted benchmark continues. Not part of CI (about a minute per run on 2 CPU cores).
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
from raysim.engine.driver import Driver, connect_ray

RACES = ("Asian", "Black", "White")
COLUMNS = ["auc", "es_auc", *(f"auc_{r}" for r in RACES), "eod", "spd"]


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
    cfg = config.load("default", overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config.dump(cfg))
    start = time.perf_counter()
    Driver(cfg, run_dir, echo=lambda _: None).run()
    (run_dir / "DONE").write_text(f"{time.perf_counter() - start:.1f}\n")
    return run_dir


def selected_row(run_dir: Path) -> dict[str, float]:
    """Test metrics at the evaluated round with the best mean validation AUC."""
    m = pd.read_parquet(run_dir / "metrics.parquet")
    mean = m[m["client"] == "mean"]
    val_auc = mean[(mean["split"] == "val") & (mean["metric"] == "auc") & (mean["attribute"] == "")].set_index("round")["value"]
    best = int(val_auc.idxmax())
    test = mean[(mean["split"] == "test") & (mean["round"] == best)]

    def value(metric: str, attribute: str = "", group: str = "") -> float:
        hit = test[(test["metric"] == metric) & (test["attribute"] == attribute) & (test["group"] == group)]["value"]
        return float(hit.iloc[0]) if len(hit) else float("nan")

    row = {"round": best, "auc": value("auc"), "es_auc": value("es_auc", "race"), "eod": value("eod", "race"), "spd": value("spd", "race")}
    row.update({f"auc_{r}": value("auc", "race", r) for r in RACES})
    server = m[(m["client"] == "server") & (m["metric"] == "epsilon")]
    row["epsilon"] = float(server.sort_values("round")["value"].iloc[-1]) if len(server) else float("nan")
    traffic = m[(m["split"] == "train") & (m["client"] != "mean") & (m["client"] != "server") & m["metric"].isin(["bytes_up", "bytes_down"])]
    per_round = traffic.groupby(["round", "metric"])["value"].mean().unstack()  # mean over the clients of a round
    row["mb_up"] = float(per_round.get("bytes_up", pd.Series([0.0])).mean()) / 1e6
    row["mb_down"] = float(per_round.get("bytes_down", pd.Series([0.0])).mean()) / 1e6
    row["seconds"] = float((run_dir / "DONE").read_text())
    return row


def table(rows: pd.DataFrame) -> str:
    private = rows["epsilon"].notna().any()
    header = "| method | AUC | ES-AUC | AUC Asian | AUC Black | AUC White | EOD | SPD | MB up / client / round | round |" + (" ε spent |" if private else "")
    lines = [header, "|" + "---|" * (11 if private else 10)]
    for method, group in rows.groupby("method", sort=False):
        cells = [f"{100 * group[c].mean():.1f} ± {100 * group[c].std(ddof=0):.1f}" for c in COLUMNS]
        rounds = "/".join(str(int(r)) for r in group["round"])
        spent = f" {group['epsilon'].max():.2f} |" if private else ""
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {group['mb_up'].mean():.3f} | {rounds} |{spent}")
    return "\n".join(lines)


def learning_curves(out: Path, methods: list[str], seeds: list[int]) -> str:
    """Mean validation AUC per race group and round (mean over clients, then seeds): the
    evidence for why a method does or does not close the group gap."""
    frames = []
    for method in methods:
        for seed in seeds:
            if not (out / f"{method}-s{seed}" / "DONE").exists():
                continue
            m = pd.read_parquet(out / f"{method}-s{seed}" / "metrics.parquet")
            m = m[(m["client"] == "mean") & (m["split"] == "val") & (m["metric"] == "auc") & (m["attribute"].isin(["", "race"]))]
            frames.append(m.assign(method=method, group=m["group"].replace("", "all")))
    curves = pd.concat(frames).pivot_table(index=["method", "round"], columns="group", values="value", aggfunc="mean", sort=False)
    lines = ["| method | round | all | " + " | ".join(RACES) + " |", "|---|---|---|" + "---|" * len(RACES)]
    for (method, round_), row in curves.iterrows():
        lines.append(f"| {method} | {round_} | {100 * row['all']:.1f} | " + " | ".join(f"{100 * row[r]:.1f}" for r in RACES) + " |")
    return "\n".join(lines)


def oracle_line(img_size: int) -> str:
    cfg = config.load("default", [f"model.img_size={img_size}"])
    source = DATASETS.get(cfg.data.name)(cfg.data, img_size=img_size, seed=0)
    source.client_specs()  # generates the set if needed
    truth = json.loads((source.root / "truth.json").read_text())
    oracle = truth["oracle_mean_over_sites"]["oracle_auc"]
    return "truth.json oracle (per-group Bayes score, mean over sites): " + ", ".join(f"{g} {100 * v:.1f}" for g, v in oracle.items())


def main() -> None:
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
    args = parser.parse_args()
    if not args.report_only:
        connect_ray()
    rows = []
    for seed in args.seeds:  # seed-major: an interrupted benchmark has every method for the first seeds
        for method in args.methods:
            if args.report_only and not (args.out / f"{method}-s{seed}" / "DONE").exists():
                continue
            row = selected_row(run_once(method, seed, args))
            rows.append({"method": method, "seed": seed, **row})
            print(f"{method:<11} seed {seed}: test AUC {100 * row['auc']:.1f}, ES-AUC {100 * row['es_auc']:.1f} (round {row['round']}, {row['seconds']:.0f} s)", flush=True)
    frame = pd.DataFrame(rows).sort_values(["method", "seed"], key=lambda c: c.map(args.methods.index) if c.name == "method" else c, kind="stable")
    frame.to_csv(args.out / "methods.csv", index=False)
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.node()}, {args.rounds} rounds, {args.img_size} px, seeds {args.seeds}")
    print(table(frame))
    print(oracle_line(args.img_size))
    curve_methods = [m for m in args.methods if m.split("+")[0] in ("fedavg", "fedlora", "fairlora")]
    if curve_methods:
        print("\nvalidation AUC per round and race group (mean over clients and seeds):")
        print(learning_curves(args.out, curve_methods, args.seeds))
    print(f"wall per run: {np.mean(frame['seconds']):.0f} s mean")


if __name__ == "__main__":
    main()
