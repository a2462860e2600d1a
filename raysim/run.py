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
from ray.exceptions import RayActorError

from raysim import config as config_mod
from raysim.config import ConfigError, ExperimentConfig
from raysim.datasets import DataError
from raysim.engine import driver_actor
from raysim.engine.driver import Driver, RunFailed, connect_ray, latest_checkpoint

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


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
        connect_ray(object_store_gb=cfg.resources.object_store_gb)
        drive(cfg, run_dir, resume)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    print("wrote config.yaml, provenance.json, metrics.parquet, predictions.parquet, checkpoints/, tensorboard/ in:")
    print(run_dir)
    return 0


def drive(cfg: ExperimentConfig, run_dir: Path, resume: bool) -> None:
    """Run the rounds in a driver actor and print its lines; a lost driver actor (its process
    killed, its node gone) is started again from the last complete checkpoint, up to
    fault.max_restarts times."""
    losses = 0
    while True:
        try:
            for event in driver_actor.stream(driver_actor.start(cfg, run_dir), resume=resume):
                for line in event.lines:
                    print(line, flush=True)
            return
        except RayActorError as err:
            losses += 1
            latest = latest_checkpoint(run_dir)
            if losses > cfg.fault.max_restarts:
                where = f"--resume {run_dir} continues from {latest.name}" if latest else "no checkpoint was complete yet"
                raise RunFailed(f"the driver actor was lost {losses} times (fault.max_restarts={cfg.fault.max_restarts}); {where}") from err
            resume = latest is not None
            print(f"driver actor lost ({str(err).splitlines()[0][:120]}); " + (f"resuming from {latest.name}" if resume else "starting the run again"), flush=True)


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
