"""Joint fundus + OCT against each modality alone (issue 17): the table in RESULTS.md.

    python benchmarks/fundus_oct.py [--arms fundus+oct fundus oct fundus-grade] [--seeds 0 1 2]
                                    [--out DIR] [--rounds 6] [--img-size 32] [--report-only]

Every arm is the `--config fundus_oct` recipe on the synthetic twin (FedAvg, 3 clients,
resnet10t encoders, Adam) with the same rounds, image size and seeds; only the input and the
model differ:

- `fundus+oct`: `joint:resnet10t` on `slo_fundus+oct_onh_bscans` (two branches, mid-level
  fusion): segments and grades;
- `fundus`: `joint:resnet10t` on `slo_fundus` alone: segments and grades;
- `oct`: a resnet10t classifier on the ONH cube `oct_onh_bscans` alone (SliceFold): grades;
- `fundus-grade`: a resnet10t classifier on `slo_fundus` alone, no masks: grades (what the
  segmentation supervision adds to grading).

Each run is reported at `runs.select_round`'s round (best mean validation AUC: every arm
grades), test split, mean over clients; the table gives mean ± sample std over seeds.
Finished runs under --out are read, not rerun. Not part of CI.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd

from raysim import config
from raysim.engine.driver import finished_run
from raysim.engine.engine import Engine
from raysim.outputs import runs

ARMS: dict[str, list[str]] = {
    "fundus+oct": [],
    "fundus": ["data.modality=slo_fundus"],
    "oct": ["data.modality=oct_onh_bscans", "model.name=resnet10t"],
    "fundus-grade": ["data.modality=slo_fundus", "model.name=resnet10t"],
}
# (column, metric, attribute): grading, then segmentation (NaN for the grading-only arms)
COLUMNS = [
    ("AUC", "auc", ""), ("ES-AUC", "es_auc", "race"), ("EOD", "eod", "race"),
    ("Dice disc", "dice_disc", ""), ("Dice cup", "dice_cup", ""), ("ES-Dice", "es_dice", "race"), ("CDR err", "cdr_error", ""),
]


def run_once(arm: str, seed: int, args: argparse.Namespace) -> Path:
    run_dir = args.out / f"{arm}-s{seed}"
    if (run_dir / "DONE").exists():
        return run_dir
    overrides = [*ARMS[arm], f"seed={seed}", f"model.img_size={args.img_size}", f"federation.rounds={args.rounds}", "eval.bootstrap=0", "eval.predictions=none", "report.html=false"]
    return finished_run(config.load("fundus_oct", overrides), run_dir)


def selected_row(run_dir: Path) -> dict[str, float]:
    """Test metrics (mean over clients) at the run's selected round, and its seconds."""
    run = runs.read_run(run_dir)
    chosen = run.selection()
    row = {name: runs.value(run.metrics, round_=chosen.round, split="test", metric=metric, attribute=attr) for name, metric, attr in COLUMNS}
    return row | {"round": chosen.round, "seconds": float((run_dir / "DONE").read_text())}


def table(frame: pd.DataFrame, arms: list[str]) -> str:
    lines = ["| arm | seeds | " + " | ".join(name for name, _, _ in COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for arm in arms:
        rows = frame[frame["arm"] == arm]
        if rows.empty:
            continue
        cells = []
        for name, _, _ in COLUMNS:
            values = 100 * rows[name].dropna()
            cells.append("–" if values.empty else f"{values.mean():.1f} ± {values.std(ddof=1) if len(values) > 1 else 0:.1f}")
        lines.append(f"| {arm} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmark-runs/fundus_oct"))
    parser.add_argument("--report-only", action="store_true", help="tabulate the finished runs under --out; train nothing")
    args = parser.parse_args(argv)
    if not args.report_only:
        Engine().open()  # Ray, and one warm pool of client actors for every run below (raysim.engine.warm)
    rows = []
    for seed in args.seeds:  # seed-major: an interrupted benchmark has every arm for the first seeds
        for arm in args.arms:
            if args.report_only and not (args.out / f"{arm}-s{seed}" / "DONE").exists():
                continue
            row = selected_row(run_once(arm, seed, args))
            rows.append({"arm": arm, "seed": seed, **row})
            print(f"{arm:<12} seed {seed}: test AUC {100 * row['AUC']:.1f}, Dice disc {100 * row['Dice disc']:.1f}, cup {100 * row['Dice cup']:.1f} (round {row['round']}, {row['seconds']:.0f} s)", flush=True)
    if not rows:
        raise SystemExit(f"error: no finished run under {args.out}")
    frame = pd.DataFrame(rows)
    frame.to_csv(args.out / "fundus_oct.csv", index=False)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.node()}, commit {commit}, {args.rounds} rounds, {args.img_size} px, seeds {args.seeds}")
    print("test split at each run's selected round (best mean validation AUC), mean over clients, x100, mean ± sample std over seeds")
    print(table(frame, args.arms))
    print(f"wall per run: {np.mean(frame['seconds']):.0f} s mean")


if __name__ == "__main__":
    main()
