"""`python -m raysim.run`: one federated experiment, locally or inside a Ray cluster.

    python -m raysim.run                                  # the embedded default
    python -m raysim.run --config my.yaml federation.rounds=20 algorithm.name=fedavg
    python -m raysim.run --resume runs/20261122-101500-fedavg-s0

Prints progress per round, a metrics table at each evaluation, and the run directory last.
The rounds run in a driver actor (`ray::DriverActor`, `resources.driver_cpus` /
`driver_gpus`) on this node; this process streams its console lines.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from pathlib import Path

import yaml

from raysim import config as config_mod
from raysim.config import ConfigError, ExperimentConfig
from raysim.datasets import DataError
from raysim.engine import driver_actor
from raysim.engine.driver import Driver, connect_ray, latest_checkpoint

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m raysim.run",
        description="Run one federated-learning experiment (writes a run directory; prints its path last).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"presets: {', '.join(config_mod.preset_names())}\n\nconfig keys (key=value overrides) and defaults:\n{config_mod.describe_keys()}",
    )
    parser.add_argument("--config", help="YAML config file or preset name (default: the embedded default preset)")
    parser.add_argument("--out", type=Path, help="run directory to create (default: runs/<time>-<algorithm>-s<seed>)")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run from its last checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. federation.rounds=5")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg, run_dir, resume = prepare(args)
        Driver(cfg, run_dir)  # reads the data source's metadata: bad input fails here, before Ray starts
        connect_ray()
        for event in driver_actor.stream(driver_actor.start(cfg, run_dir), resume=resume):
            for line in event.lines:
                print(line, flush=True)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print("wrote config.yaml, provenance.json, metrics.parquet, predictions.parquet, checkpoints/, tensorboard/ in:")
    print(run_dir)
    return 0


def prepare(args: argparse.Namespace) -> tuple[ExperimentConfig, Path, bool]:
    """Resolve the config and the run directory; nothing is trained yet."""
    if args.resume:
        run_dir = args.resume
        if args.config or args.overrides or args.out:
            raise ConfigError("--resume continues a run with its saved config: drop --config, --out and overrides")
        if not (run_dir / "config.yaml").exists():
            raise ConfigError(f"--resume {run_dir}: no config.yaml there (not a raysim run directory)")
        if latest_checkpoint(run_dir) is None:
            raise ConfigError(f"--resume {run_dir}: no complete checkpoint to resume from")
        return config_mod.load(run_dir / "config.yaml"), run_dir, True
    cfg = config_mod.load(args.config, args.overrides)
    run_dir = args.out or default_run_dir(cfg)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"--out {run_dir} is not empty; choose a new directory or continue it with --resume {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return cfg, run_dir, False


def default_run_dir(cfg: ExperimentConfig) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.algorithm['name']}-s{cfg.seed}"


if __name__ == "__main__":
    raise SystemExit(main())
