"""FL-MedSegBench's protocols on the synthetic twin: optic disc / cup segmentation (issue 17).

    python benchmarks/segmentation.py [--methods fedavg fedbn ditto fedrdn silobn fedper local]
        [--seeds 0 1 2] [--rounds 8] [--img-size 32] [--patients 900] [--holdout site3]
        [--freq fedavg fedbn] [--epochs 1 2 4] [--out DIR] [--set KEY=VALUE ...] [--report-only]

Every (protocol, method, seed) is one run of `--config segmentation` (a U-Net on a timm resnet18
encoder from scratch, Adam lr 1e-3, batch 32, the twin's 3 sites, target attribute race) with
the same image size, data and evaluation (after every 2 local epochs of compute: every second
round at 1 epoch per round; test metrics at the evaluated round with the best mean validation
Dice, `runs.select_round`). Three protocols:

1. **Accuracy and fairness** (`OUT/main`): each method for `--rounds` rounds of 1 local epoch.
   The table is `raysim.compare`'s cells, mean ± sample std over seeds: Dice disc / cup, Dice
   (their mean), ES-Dice and the Dice gap over race, the worst client's Dice and the std of Dice
   over clients (FL-MedSegBench's client fairness); then each method against FedAvg and local
   training of the same benchmark (differences of the seed means).
2. **Unseen site** (`OUT/holdout-<site>`): each method but local (which has no model for a site
   that never trained, and refuses) with `eval.holdout_site=<site>`: the other sites train, the
   held-out one is scored with the method's `newcomer` model (`raysim.algorithms.base`); its
   test Dice at the participants' selected round, next to the participants' mean and to the same
   site's Dice when it participates (protocol 1).
3. **Communication frequency** (`OUT/freq`): `--freq` methods with E local epochs per round and
   R/E rounds for E in `--epochs` (equal local compute: R epochs in all; E = 1 is protocol 1's run).

Runs already finished under --out are read, not rerun (an interrupted benchmark continues);
`--report-only` tabulates what is there. Not part of CI. The joint fundus + OCT comparison
against each modality alone is `benchmarks/fundus_oct.py`.
"""

from __future__ import annotations

import argparse
import math
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from raysim import config
from raysim.outputs.runs import holdout_values, natural_key, read_run
from raysim.reports import compare, compare_plots

METHODS = ["fedavg", "fedbn", "ditto", "fedrdn", "silobn", "fedper", "local"]
REFERENCES = ("fedavg", "local")


# --- runs -----------------------------------------------------------------------------------


def overrides(args: argparse.Namespace, method: str, seed: int, *, epochs: int = 1, holdout: str | None = None) -> list[str]:
    """The run's config overrides on `--config segmentation`: the same data, size and evaluation for every protocol."""
    name, *params = method.split("+")
    out = [
        f"algorithm.name={name}",
        *(f"algorithm.{p}" for p in params),
        f"seed={seed}",
        f"model.img_size={args.img_size}",
        f"data.patients={args.patients}",
        "data.attribute=race",
        f"federation.rounds={args.rounds // epochs}",
        f"federation.local_epochs={epochs}",
        f"eval.every={max(1, 2 // epochs)}",  # every 2 local epochs of compute, in every protocol
        "eval.bootstrap=0",  # intervals are not reported here; ES-Dice and the gaps need none
        "eval.predictions=none",
        f"checkpoint.every={args.rounds // epochs}",  # the last round only: a U-Net per client per round is IO
        "report.html=false",
        *args.set,
    ]
    return out + ([f"eval.holdout_site={holdout}"] if holdout else [])


def run_once(run_dir: Path, overrides_: list[str]) -> Path:
    """One run, or the finished one already in `run_dir` (its DONE file holds its seconds)."""
    from raysim.engine.driver import finished_run  # Ray loads only when something trains

    return finished_run(config.load("segmentation", overrides_), run_dir)


def plan(args: argparse.Namespace) -> list[tuple[str, str, int, Path, list[str]]]:
    """(protocol, method, seed, run directory, overrides) of every run, seed-major: an interrupted
    benchmark has every protocol of the first seeds."""
    runs = []
    for seed in args.seeds:
        for method in args.methods:
            runs.append(("main", method, seed, args.out / "main" / f"{method}-s{seed}", overrides(args, method, seed)))
        for method in args.methods:
            if args.holdout and method.split("+")[0] != "local":
                runs.append(("holdout", method, seed, args.out / f"holdout-{args.holdout}" / f"{method}-s{seed}", overrides(args, method, seed, holdout=args.holdout)))
        for method in args.freq:
            for epochs in args.epochs:
                if epochs > 1:  # E = 1 is protocol 1's run
                    runs.append(("freq", method, seed, args.out / "freq" / f"{method}-e{epochs}-s{seed}", overrides(args, method, seed, epochs=epochs)))
    return runs


# --- tables ---------------------------------------------------------------------------------


def pct(values: Sequence[float]) -> str:
    """`mean ± sample std` x100 over seeds (raysim.compare's cell)."""
    return compare.pct_cell(pd.Series(list(values), dtype=float))


def main_tables(comparison: compare.Comparison, methods: list[str]) -> str:
    """Per method: Dice disc / rim / cup / Dice, ES-Dice (and its rim form), the Dice gap, worst
    client and client std; then the references. The rim (FairSeg's pair is rim and cup) only
    for runs that wrote its rows (raysim >= 0.6)."""
    per_run = comparison.per_run
    rim = comparison.has_rim
    keys = [
        ("dice_disc", "Dice disc"),
        *([("dice_rim", "Dice rim")] if rim else []),
        ("dice_cup", "Dice cup"),
        ("dice", "Dice"),
        ("es_dice", "ES-Dice"),
        *([("es_dice_rim", "ES-Dice rim")] if rim else []),
        ("dice_gap", "Dice gap (race)"),
        ("worst_dice", "worst client Dice"),
        ("client_std", "client std"),
    ]
    lines = ["| method | " + " | ".join(h for _, h in keys) + " | worst client (per seed) |", "|---|" + "---|" * (len(keys) + 1)]
    for method in methods:
        rows = per_run[per_run["label"] == method]
        if len(rows):
            lines.append(f"| {method} | " + " | ".join(pct(rows[k]) for k, _ in keys) + f" | {'/'.join(rows['worst_client'])} |")
    means = per_run.groupby("label")[["dice", "worst_dice", "es_dice", "client_std"]].mean()
    refs = [r for r in REFERENCES if r in means.index]
    if refs:
        lines += ["", "Against the references of the same benchmark (differences of the seed means, x100; positive: better than the reference, except client std):", ""]
        head = [f"{what} − {ref}" for ref in refs for what in ("Dice", "worst client Dice", "ES-Dice")]
        lines += ["| method | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
        for method in methods:
            if method in means.index:
                cells = [f"{100 * (means.loc[method, k] - means.loc[ref, k]):+.1f}" for ref in refs for k in ("dice", "worst_dice", "es_dice")]
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def holdout_table(holdout_dirs: dict[str, list[Path]], main: compare.Comparison | None, site: str) -> str:
    """Per method: the held-out site's test Dice (disc, cup, mean), the participants' mean Dice,
    and the site's Dice when it participates (protocol 1, same seeds)."""
    lines = [
        f"| method | {site} unseen: Dice disc | Dice cup | Dice | participants' Dice | {site} as a participant: Dice | unseen − participant |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, dirs in holdout_dirs.items():
        unseen: dict[str, list[float]] = {"dice_disc": [], "dice_cup": [], "dice": [], "participants": []}
        for run_dir in dirs:
            run = read_run(run_dir)
            selection = run.selection()
            values = holdout_values(run.metrics, selection.round)[site]
            for key in ("dice_disc", "dice_cup", "dice"):
                unseen[key].append(values.get(key, math.nan))
            unseen["participants"].append(compare.run_row(run, run.attribute)["dice"])
        joined = []
        if main is not None and f"client:{site}" in main.per_run:
            joined = list(main.per_run[main.per_run["label"] == method][f"client:{site}"])
        gap = f"{100 * (pd.Series(unseen['dice']).mean() - pd.Series(joined).mean()):+.1f}" if joined else "-"
        lines.append(f"| {method} | {pct(unseen['dice_disc'])} | {pct(unseen['dice_cup'])} | {pct(unseen['dice'])} | {pct(unseen['participants'])} | {pct(joined) if joined else '-'} | {gap} |")
    return "\n".join(lines)


def freq_table(freq_dirs: dict[tuple[str, int], list[Path]], rounds: int) -> str:
    """Per (method, E): Dice, worst client Dice, client std, and the Dice relative to E = 1."""
    rows = {key: pd.DataFrame([compare.run_row(read_run(d), "race") for d in dirs]) for key, dirs in freq_dirs.items() if dirs}
    lines = ["| method | local epochs E | rounds | Dice | worst client Dice | client std | Dice / Dice at E = 1 | MB up / client (whole run) |", "|---|---|---|---|---|---|---|---|"]
    for (method, epochs), frame in rows.items():
        base = rows.get((method, 1))
        ratio = f"{frame['dice'].mean() / base['dice'].mean():.3f}" if base is not None else "-"
        traffic = f"{frame['mb_up'].mean() * (rounds // epochs):.0f}"
        lines.append(f"| {method} | {epochs} | {rounds // epochs} | {pct(frame['dice'])} | {pct(frame['worst_dice'])} | {pct(frame['client_std'])} | {ratio} | {traffic} |")
    return "\n".join(lines)


def bn_control(main_dirs: dict[str, list[Path]], holdout_dirs: dict[str, list[Path]], methods: Sequence[str]) -> str:
    """Each client's test Dice at the last round as scored, and with its BatchNorm statistics
    re-estimated on its own training images (`refit_norm_statistics`, what FedBN's and SiloBN's
    newcomer rules do): how much of a number is the running statistics' lag. In-process, from
    the runs' last checkpoints (`checkpoint.every` = rounds); `--bn-control` adds it."""
    import dataclasses

    import numpy as np

    from raysim.algorithms.base import HOLDOUT
    from raysim.algorithms.fedbn import own_image_batches, refit_norm_statistics
    from raysim.datasets import DATASETS
    from raysim.engine import checkpoints
    from raysim.engine.client_actor import ClientHost

    def test_dice(predictions: list[Any]) -> float:
        values = next(p for p in predictions if p.split == "test").values
        return float((np.nanmean(values["dice_disc"]) + np.nanmean(values["dice_cup"])) / 2)

    rows = []
    for protocol, dirs in (("participant", main_dirs), ("unseen", holdout_dirs)):
        for method in methods:
            for run_dir in dirs.get(method, []):
                cfg = config.load(run_dir / "config.yaml", [])
                specs = DATASETS.get(cfg.data.name)(cfg.data, img_size=cfg.model.img_size, seed=cfg.seed).client_specs()
                host = ClientHost(cfg, [dataclasses.replace(s, role=HOLDOUT) if s.id == cfg.eval.holdout_site else s for s in specs])
                last = checkpoints.folder(run_dir, cfg.federation.rounds)
                state, _ = checkpoints.load_server(last)
                for cid, name in checkpoints.load_manifest(last).get("clients", {}).items():
                    host.clients[cid].set_state(checkpoints.load(last.parent / name, "cpu", name=name)[cid])
                payload = host.algorithm.payload(state, cfg.federation.rounds)
                for cid, client in host.clients.items():
                    if protocol == "unseen" and cid != cfg.eval.holdout_site:
                        continue
                    scored = test_dice(client.predict_splits(["test"], host.algorithm.scoring_model(client, payload)))
                    model = refit_norm_statistics(host.algorithm.scoring_model(client, payload), own_image_batches(client, cfg.federation.batch_size))
                    rows.append({"method": method, "client": f"{cid} ({protocol})", "scored": scored, "refit": test_dice(client.predict_splits(["test"], model))})
    frame = pd.DataFrame(rows)
    lines = ["| method | client | test Dice as scored | with BatchNorm statistics re-estimated |", "|---|---|---|---|"]
    for (method, client), group in frame.groupby(["method", "client"], sort=False):
        lines.append(f"| {method} | {client} | {pct(group['scored'])} | {pct(group['refit'])} |")
    return "\n".join(lines)


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes" if dirty else "")


# --- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=8, help="rounds at 1 local epoch (protocol 3: R / E rounds of E epochs)")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patients", type=int, default=900, help="data.patients of the synthetic twin (its default is 2100)")
    parser.add_argument("--holdout", default="site3", help="the unseen site of protocol 2 ('' skips the protocol)")
    parser.add_argument("--freq", nargs="*", default=["fedavg", "fedbn"], help="methods of protocol 3 (none skips it)")
    parser.add_argument("--epochs", nargs="+", type=int, default=[1, 2, 4], help="local epochs per round of protocol 3, each dividing --rounds")
    parser.add_argument("--out", type=Path, default=Path("benchmark-runs/segmentation"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    parser.add_argument("--report-only", action="store_true", help="tabulate the finished runs under --out; train nothing")
    parser.add_argument("--bn-control", nargs="*", metavar="METHOD", help="also the BatchNorm-statistics control of these methods (default with the flag: fedavg fedbn)")
    args = parser.parse_args(argv)
    if bad := [e for e in args.epochs if e < 1 or args.rounds % e]:
        parser.error(f"--epochs {bad}: each must divide --rounds {args.rounds} (equal compute: R / E rounds of E epochs)")
    if not args.report_only:
        from raysim.engine.engine import Engine  # Ray loads only when something trains

        Engine().open()  # Ray, and one warm pool of client actors for every run below (raysim.engine.warm)
    done: dict[str, dict[Any, list[Path]]] = {"main": {}, "holdout": {}, "freq": {}}
    for protocol, method, seed, run_dir, overrides_ in plan(args):
        if args.report_only and not (run_dir / "DONE").exists():
            continue
        run_once(run_dir, overrides_)
        key = (method, int(run_dir.name.split("-e")[1].split("-")[0])) if protocol == "freq" else method
        done[protocol].setdefault(key, []).append(run_dir)
        print(f"{protocol:<8} {method:<8} seed {seed}: {float((run_dir / 'DONE').read_text()):.0f} s", flush=True)
    if not done["main"]:
        raise SystemExit(f"error: no finished run under {args.out / 'main'}")
    main_dirs = [d for dirs in done["main"].values() for d in dirs]
    comparison = compare.compare(sorted(main_dirs, key=lambda p: natural_key(p.name)), by=["algorithm"])
    compare_plots.write(comparison, args.out / "compare")
    seconds = [float((d / "DONE").read_text()) for dirs in done.values() for group in dirs.values() for d in group]
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.node()}, commit {commit()}; {args.rounds} rounds, {args.img_size} px, {args.patients} patients, seeds {args.seeds}")
    print(f"{len(seconds)} runs, {sum(seconds) / 60:.1f} min of runs, {sum(seconds) / len(seconds):.0f} s per run on average\n")
    print("## 1. accuracy and fairness (raysim.compare)\n")
    print(comparison.markdown())
    print()
    print(main_tables(comparison, args.methods))
    if done["holdout"]:
        print(f"\n## 2. unseen site: {args.holdout} held out\n")
        print(holdout_table(done["holdout"], comparison, args.holdout))
    if done["freq"]:
        freq = {(m, 1): done["main"].get(m, []) for m in args.freq} | done["freq"]
        freq = dict(sorted(freq.items(), key=lambda kv: (args.freq.index(kv[0][0]), kv[0][1])))
        print("\n## 3. communication frequency (equal local compute)\n")
        print(freq_table(freq, args.rounds))
    if args.bn_control is not None:
        print(f"\n## control: BatchNorm statistics at round {args.rounds} (last checkpoint, not the selected round)\n")
        print(bn_control(done["main"], done["holdout"], args.bn_control or ["fedavg", "fedbn"]))


if __name__ == "__main__":
    main()
