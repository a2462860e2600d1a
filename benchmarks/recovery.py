"""The cost of a recovery: the embedded default uninterrupted, then with a client actor killed.

    python benchmarks/recovery.py [--rounds 6] [--kill-after 3] [--out DIR]

Runs `python -m raysim.run` (the embedded default) twice from --out: once uninterrupted, once
with the process of the client actor hosting site1 killed (SIGKILL) as soon as round
`--kill-after`'s line is printed, so the kill lands in the next round. Prints both wall times,
the time lost, and whether the final metrics are identical (they must be: the lost actor is
replaced and the rounds since the last checkpoint replayed). Not part of CI.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd


def client_actor_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "ray::ClientActor"], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def run(out: Path, name: str, rounds: int, kill_after: int | None) -> tuple[float, list[str]]:
    run_dir = out / name
    command = [sys.executable, "-m", "raysim.run", "--out", str(run_dir), f"federation.rounds={rounds}"]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=out)
    lines = []
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line.rstrip())
        if kill_after is not None and line.startswith(f"round {kill_after:>3}/"):
            pids = client_actor_pids()
            os.kill(min(pids), signal.SIGKILL)  # one of the client actors, mid-way into the next round
            kill_after = None
    if proc.wait() != 0:
        raise SystemExit("\n".join(lines[-20:]))
    return time.perf_counter() - start, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--kill-after", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmark-runs/recovery"))
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    plain, _ = run(out, f"uninterrupted-{time.time_ns()}", args.rounds, None)
    killed, lines = run(out, f"killed-{time.time_ns()}", args.rounds, args.kill_after)
    a = pd.read_parquet(sorted(out.glob("uninterrupted-*"))[-1] / "metrics.parquet")
    b = pd.read_parquet(sorted(out.glob("killed-*"))[-1] / "metrics.parquet")
    identical = a.equals(b)
    recovery = [line for line in lines if "started new actors" in line]
    print(f"uninterrupted: {plain:.1f} s; one client actor killed after round {args.kill_after}: {killed:.1f} s; lost {killed - plain:.1f} s ({killed / plain:.2f}x)")
    print(f"metrics identical: {identical}; recovery: {recovery[0] if recovery else 'none seen'}")


if __name__ == "__main__":
    main()
