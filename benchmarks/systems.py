"""Simulated systems (issue 33): who gets served under correlated availability, FedBuff against
synchronous FedAvg with stragglers, and what simulating costs.

    python benchmarks/systems.py fairness [--seeds 0 1 2] [--out DIR]   # uniform vs correlated availability
    python benchmarks/systems.py async [--seeds 0 1 2] [--out DIR]      # FedBuff vs FedAvg, stragglers
    python benchmarks/systems.py overhead [--repeats 3] [--out DIR]     # wall time with / without the clock
    python benchmarks/systems.py report [--out DIR]                     # tabulate what finished

`fairness`: FedAvg on `--config availability` (the embedded default's 3 sites; each offline in
a round with probability 0.3 on average) with `system.offline_ratio=3` (the site with the most
Black patients offline 3 times as often as the one with the fewest) against
`system.offline_ratio=1` (the same mean, uniform), per seed; it reports each group's cumulative
participation and test AUC, the race gap (max − min group AUC) and ES-AUC at the last round.
`async`: on the same sites with stragglers (speed log-normal σ 1, so the slowest site is several
times slower), synchronous FedAvg for 10 rounds against FedBuff (K = 1 of 3 training at once,
η_g 1, the paper's staleness weight) for 30 server steps (the same 30 client updates); it reports
the simulated time each takes to reach a mean validation AUC of 0.80 / 0.85 / 0.90.
`overhead`: the default preset at 3 rounds in one warm Engine, alternately without a `system`
section and with an always-available one without deadlines, `--repeats` times each: the ratio of
the median wall times (target ≤ 1.05). Runs finished under --out are read, not rerun (a `DONE`
file). Not part of CI.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd

from raysim import config
from raysim.engine.driver import finished_run
from raysim.engine.engine import Engine

TARGETS = (0.80, 0.85, 0.90)
FAIRNESS = {"uniform": ["system.offline_ratio=1"], "correlated": ["system.offline_ratio=3"]}
STRAGGLERS = ["system.speed_spread=1.0", "system.availability=always", "system.p_offline=0", "system.correlate=null", "system.offline_ratio=1"]
ASYNC = {
    "fedavg": ["federation.rounds=10", "eval.every=1"],
    "fedbuff": ["algorithm.name=fedbuff", "algorithm.buffer_size=1", "system.concurrency=3", "federation.rounds=30", "eval.every=3"],
}


def build(seed: int, overrides: list[str], preset: str = "availability") -> config.ExperimentConfig:
    return config.load(preset, [f"seed={seed}", "eval.bootstrap=0", "report.html=false", *overrides])


def run(out: Path, name: str, seed: int, overrides: list[str]) -> Path:
    run_dir = out / f"{name}-s{seed}"
    started, done = time.perf_counter(), (run_dir / "DONE").exists()
    finished_run(build(seed, overrides), run_dir)
    if not done:
        print(f"{name} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    return run_dir


def read(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "metrics.parquet")


def fairness_row(run_dir: Path) -> dict[str, float]:
    m = read(run_dir)
    last = int(m["round"].max())
    at = m[(m["round"] == last) & (m["client"].isin(["mean", "server"]))]
    row: dict[str, float] = {}
    for group, rate in at[(at["metric"] == "participation_rate_cum") & (at["attribute"] == "race")].set_index("group")["value"].items():
        row[f"served {group}"] = rate
    test = at[(at["split"] == "test") & (at["client"] == "mean")]
    groups = test[(test["metric"] == "auc") & (test["attribute"] == "race") & (test["group"] != "")].set_index("group")["value"]
    for group, auc in groups.items():
        row[f"AUC {group}"] = auc
    row["race gap"] = float(groups.max() - groups.min())
    row["AUC"] = float(test[(test["metric"] == "auc") & (test["attribute"] == "")]["value"].iloc[0])
    row["ES-AUC"] = float(test[(test["metric"] == "es_auc") & (test["attribute"] == "race") & (test["group"] == "")]["value"].iloc[0])
    return row


def time_to_targets(run_dir: Path) -> dict[str, float]:
    m = read(run_dir)
    times = m[(m["metric"] == "sim_time") & (m["client"] == "server")].groupby("round")["value"].first()
    auc = m[(m["split"] == "val") & (m["client"] == "mean") & (m["metric"] == "auc") & (m["attribute"] == "")].groupby("round")["value"].first()
    out = {}
    for target in TARGETS:
        reached = auc[auc >= target]
        out[f"≥ {target:.2f} (min)"] = float(times[reached.index.min()]) / 60 if not reached.empty else float("nan")
    out["end (min)"] = float(times.iloc[-1]) / 60
    out["best val AUC"] = float(auc.max())
    return out


def pooled(rows: dict[str, list[dict[str, float]]], scale: dict[str, float]) -> str:
    """Mean ± std over seeds per setting, one column per key."""
    keys = list(dict.fromkeys(k for runs in rows.values() for r in runs for k in r))
    lines = ["| setting | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, runs in rows.items():
        cells = []
        for key in keys:
            values = np.array([r.get(key, np.nan) for r in runs], dtype=float) * scale.get(key, 100.0)
            finite = values[np.isfinite(values)]
            cell = "not reached" if not len(finite) else f"{finite.mean():.1f} ± {finite.std(ddof=1) if len(finite) > 1 else 0:.1f}"
            cells.append(cell + (f" ({len(finite)}/{len(values)})" if 0 < len(finite) < len(values) else ""))
        lines.append(f"| {name} (n={len(runs)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fairness(args: argparse.Namespace, train: bool = True) -> None:
    rows = {name: [fairness_row(d) for d in dirs] for name, dirs in _dirs(args, "fairness", FAIRNESS, [], train).items()}
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.node()}: FedAvg, --config availability, last round (x100)")
    print(pooled(rows, {}))


def asynchronous(args: argparse.Namespace, train: bool = True) -> None:
    rows = {name: [time_to_targets(d) for d in dirs] for name, dirs in _dirs(args, "async", ASYNC, STRAGGLERS, train).items()}
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.node()}: stragglers (speed σ 1), simulated minutes to a mean validation AUC")
    print(pooled(rows, {"best val AUC": 100.0, **{k: 1.0 for r in rows.values() for x in r for k in x if k != "best val AUC"}}))


def _dirs(args: argparse.Namespace, part: str, settings: dict[str, list[str]], common: list[str], train: bool) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {name: [] for name in settings}
    for seed in args.seeds:  # seed-major: an interrupted benchmark has both settings for the first seeds
        for name, overrides in settings.items():
            run_dir = args.out / part / f"{name}-s{seed}"
            if train:
                run(args.out / part, name, seed, [*common, *overrides])
            if (run_dir / "DONE").exists():
                out[name].append(run_dir)
    return out


def overhead(args: argparse.Namespace) -> None:
    base = ["federation.rounds=3", "eval.every=3", "report.html=false", "checkpoint.every=1"]
    settings = {"without system": base, "with system (always, no deadline)": [*base, "system.simulate=true"]}
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    with Engine() as engine:
        engine.run(config.load("default", base), args.out / "overhead" / "warmup")  # start-up and caches out of the timings
        for i in range(args.repeats):
            for name, overrides in settings.items():  # interleaved: drift hits both alike
                started = time.perf_counter()
                engine.run(config.load("default", overrides), args.out / "overhead" / f"{i}-{name.split()[0]}")
                seconds[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.node()}: default preset, 3 rounds, warm Engine, {args.repeats} runs each")
    for name, values in seconds.items():
        print(f"| {name} | median {medians[name]:.1f} s | runs {', '.join(f'{v:.1f}' for v in values)} |")
    ratio = medians["with system (always, no deadline)"] / medians["without system"]
    print(f"ratio with / without: {ratio:.3f} (target <= 1.05)")
    print(clock_cost())


def clock_cost(rounds: int = 2000) -> str:
    """The clock's own work per synchronous round, timed alone (no Ray, no training): who is
    online, the plan, and the participation rates it records, on the default preset's clients."""
    from types import SimpleNamespace

    from raysim.datasets import DATASETS
    from raysim.engine import simulated
    from raysim.systems import simulated_clock

    cfg = config.load("availability")
    source = DATASETS.get(cfg.data.name)(cfg.data, img_size=cfg.model.img_size, seed=cfg.seed)
    specs = source.client_specs()
    clock = simulated_clock(cfg, specs, source.group_names, None)
    driver = SimpleNamespace(specs={s.id: s for s in specs}, attributes=list(source.group_names), source=source, clock=clock)
    ids = sorted(driver.specs)
    started = time.perf_counter()
    for round_ in range(1, rounds + 1):
        online = clock.available(round_, 100.0 * round_, ids)
        plan = clock.plan(100.0 * round_, online, online, len(ids), 44_000_000, 44_000_000)
        simulated.participation_rates(driver, plan.trained)
    per_round = (time.perf_counter() - started) / rounds
    return f"the clock's own work: {per_round * 1e3:.2f} ms per round ({len(ids)} clients, {len(driver.attributes)} attributes; availability, plan, participation rates)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("fairness", "async", "overhead", "report"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmark-runs/systems"))
    args = parser.parse_args(argv)
    if args.mode == "report":
        fairness(args, train=False)
        asynchronous(args, train=False)
        return
    if args.mode != "overhead":
        Engine().open()  # one warm pool for every run below
    {"fairness": fairness, "async": asynchronous, "overhead": overhead}[args.mode](args)


if __name__ == "__main__":
    main()
