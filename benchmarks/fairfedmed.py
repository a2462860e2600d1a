"""FairFedMed's Table 1 protocol (2D fundus; race and gender; AUC, ES-AUC, group AUCs, EOD, SPD;
3 seeds) for FedAvg, FedHEAL, PromptFL, FedOTP, the adapter, FedLoRA and FairLoRA.

    python benchmarks/fairfedmed.py budget [--max-rounds 30] [--out DIR]       # seed 0, race: curves
    python benchmarks/fairfedmed.py table --rounds R [--seeds 0 1 2] [--attributes race gender] [--out DIR]
    python benchmarks/fairfedmed.py table --report-only [--out DIR]            # tabulate what finished
    python benchmarks/fairfedmed.py paper --data /data/FairFedMed-Oph --weights ViT-B-16.pt [--out DIR]

Every run is `--config fairfedmed_clip` (the synthetic twin, the small CLIP `clip:RaySim-Tiny-ViT`
at 64 px, FairFedMed's federation: 2 of 3 sites per round, 1 local epoch, SGD lr 1e-3 momentum
0.9 weight decay 5e-4, batch 32) with the method's section replaced, each method at FairFedMed's
settings for it (`METHODS`). `budget` runs seed 0 on race for `--max-rounds` and prints each
method's validation AUC per round: the round budget of `table` is read off it (the methods
table's procedure). `table` runs methods x attributes x seeds and prints, per attribute,
raysim.compare's table (each run at its best mean validation AUC round; test metrics, mean ± std
over seeds) and the paper's numbers beside it. `paper` is the same protocol on FairFedMed-Oph
with a CLIP ViT-B/16 checkpoint and the paper's 50 rounds (224 px; it needs a GPU:
`--set resources.num_gpus=...`). Runs finished under --out are read, not rerun (a `DONE` file), so
an interrupted benchmark continues where it stopped. Not part of CI.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import pandas as pd

from raysim import config
from raysim.engine.driver import finished_run
from raysim.engine.engine import Engine
from raysim.outputs.runs import RunReadError, natural_key
from raysim.reports import compare

PRESET = "fairfedmed_clip"
# Each method as FairFedMed ran it (its scripts; specs/fairfedmed.md): the `algorithm` section.
METHODS: dict[str, dict[str, object]] = {
    "fedavg": {},  # full fine-tuning of the image tower, CLIP's fixed text head
    "fedheal": {},
    "promptfl": {"n_ctx": 4, "ot": "mean"},  # GLP_OT with OT=None, one prompt
    "fedotp": {"n_ctx": 4, "ot_eps": 0.1},  # COT, top 0.8, 2 prompts, one shared
    "adapter": {},  # raysim's stand-in for the paper's ViT-Adapter row
    "fedlora": {"rank": 12, "alpha": 2},
    "fairlora": {"rank": 12, "alpha": 2},  # the preset's method
}
# FairFedMed (IEEE TMI 2025), Table 1, 2D SLO fundus, ViT-B/16: AUC / ES-AUC (x100).
PAPER = {
    "race": {"fairlora": (79.0, 72.2), "fedheal": (75.9, 67.8), "adapter": (74.8, 68.0), "fedavg": (74.8, 67.7), "fedotp": (73.3, 69.7), "promptfl": (73.0, 68.9)},
    "gender": {"fairlora": (79.5, 76.6), "fedheal": (76.2, 74.4), "adapter": (74.5, 72.2), "fedavg": (74.4, 71.8), "promptfl": (73.2, 70.7), "fedotp": (72.6, 70.3)},
}


def method_config(method: str, *, seed: int, attribute: str, rounds: int, extra: list[str]) -> config.ExperimentConfig:
    raw = config.read_yaml(PRESET)
    raw["algorithm"] = {"name": method, **METHODS[method]}
    raw = config.merge(raw, config.parse_overrides([f"seed={seed}", f"data.attribute={attribute}", f"federation.rounds={rounds}", "eval.every=2", "eval.bootstrap=0", "report.html=false", *extra]))
    return config.from_dict(raw)


def run(out: Path, method: str, seed: int, attribute: str, rounds: int, extra: list[str]) -> Path:
    run_dir = out / f"{attribute}" / f"{method}-s{seed}"
    started = time.perf_counter()
    done = (run_dir / "DONE").exists()
    finished_run(method_config(method, seed=seed, attribute=attribute, rounds=rounds, extra=extra), run_dir)
    if not done:
        print(f"{attribute:<6} {method:<9} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    return run_dir


def validation_curves(run_dirs: dict[str, Path]) -> str:
    """Mean validation AUC over clients per method and round (x100), one column per method."""
    columns = {}
    for method, run_dir in run_dirs.items():
        m = pd.read_parquet(run_dir / "metrics.parquet")
        m = m[(m["client"] == "mean") & (m["split"] == "val") & (m["metric"] == "auc") & (m["attribute"] == "")]
        columns[method] = m.set_index("round")["value"] * 100
    frame = pd.DataFrame(columns)
    best = {method: int(frame[method].idxmax()) for method in frame}
    lines = ["| round | " + " | ".join(frame.columns) + " |", "|---|" + "---|" * len(frame.columns)]
    lines += [f"| {r} | " + " | ".join(f"{v:.1f}" for v in row) + " |" for r, row in frame.iterrows()]
    lines.append("| best round | " + " | ".join(str(best[m]) for m in frame.columns) + " |")
    return "\n".join(lines)


def table(args: argparse.Namespace) -> None:
    for attribute in args.attributes:
        run_dirs = []
        for seed in args.seeds:  # seed-major: an interrupted benchmark has every method for the first seeds
            for method in args.methods:
                run_dir = args.out / attribute / f"{method}-s{seed}"
                if args.report_only and not (run_dir / "DONE").exists():
                    continue
                run_dirs.append(run_dir if args.report_only else run(args.out, method, seed, attribute, args.rounds, args.set))
        if not run_dirs:
            print(f"{attribute}: no finished run under {args.out / attribute}")
            continue
        try:
            comparison = compare.compare(sorted(run_dirs, key=lambda p: natural_key(p.name)), by=["algorithm"])
        except (compare.CompareError, RunReadError) as err:
            raise SystemExit(f"error: {err}") from None
        seeds = sorted({int(p.name.rsplit("-s", 1)[1]) for p in run_dirs})
        print(f"\n{time.strftime('%Y-%m-%d')}, {platform.node()}, {attribute}, seeds {seeds}, {len(run_dirs)} runs")
        print(comparison.markdown())
        print("\nFairFedMed's published numbers (ViT-B/16 on FairFedMed-Oph 2D, 50 rounds):")
        print("\n".join(f"| {m} | {a:.1f} / {e:.1f} |" for m, (a, e) in PAPER[attribute].items()))


def budget(args: argparse.Namespace) -> None:
    dirs = {method: run(args.out / "budget", method, 0, "race", args.max_rounds, args.set) for method in args.methods}
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.node()}: seed 0, race, validation AUC (mean over clients) per round")
    print(validation_curves(dirs))


def paper(args: argparse.Namespace) -> None:
    host = ["data.name=fairfedmed_oph", f"data.root={args.data}", "model.name=clip:ViT-B-16", f"model.weights={args.weights}", "model.img_size=224"]
    args.set = host + args.set
    args.rounds = 50
    table(args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("budget", "table", "paper"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--attributes", nargs="+", default=["race", "gender"], choices=("race", "gender"))
    parser.add_argument("--rounds", type=int, help="table: the round budget read off `budget`'s curves")
    parser.add_argument("--max-rounds", type=int, default=30, help="budget: rounds of the seed-0 curves")
    parser.add_argument("--data", type=Path, help="paper: the FairFedMed-Oph directory")
    parser.add_argument("--weights", type=Path, help="paper: an open_clip ViT-B/16 checkpoint file")
    parser.add_argument("--out", type=Path, default=Path("benchmark-runs/fairfedmed"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    parser.add_argument("--report-only", action="store_true", help="tabulate finished runs; train nothing")
    args = parser.parse_args(argv)
    if args.mode == "table" and not args.report_only and args.rounds is None:
        parser.error("table needs --rounds (read it off `budget`'s validation curves) or --report-only")
    if args.mode == "paper" and (args.data is None or args.weights is None):
        parser.error("paper needs --data DIR and --weights FILE")
    if not args.report_only:
        Engine().open()  # Ray and one warm pool of client actors for every run below
    {"budget": budget, "table": table, "paper": paper}[args.mode](args)


if __name__ == "__main__":
    main()
