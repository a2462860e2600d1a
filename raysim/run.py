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
import contextlib
import logging
import sys
from pathlib import Path

from ray.exceptions import RayError

from raysim import algorithms, cli, console
from raysim import config as config_mod
from raysim.config import ConfigError, ExperimentConfig
from raysim.datasets import DataError
from raysim.engine.driver import Driver, RunFailed
from raysim.engine.engine import Engine, active, latest_name
from raysim.outputs import resume_check, storage

EXIT_BAD_INPUT = cli.EXIT_BAD_INPUT
EXIT_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m raysim.run",
        description="Run one federated-learning experiment (writes a run directory; prints its path last).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"presets: {', '.join(config_mod.preset_names())}\n\nconfig keys (key=value overrides) and defaults:\n{config_mod.describe_keys()}",
    )
    parser.add_argument("--config", help="YAML config file or preset name (default: the embedded default preset)")
    parser.add_argument("--out", help="run directory to create: a path, or a pyarrow.fs URI such as s3://bucket/runs/x (default: runs/<time>-<algorithm>-s<seed>)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a run (a path or a URI) from its last checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. federation.rounds=5")
    return parser


def main(argv: list[str] | None = None) -> int:
    command = list(sys.argv) if argv is None else ["raysim.run", *argv]  # what the user typed: provenance records it
    argv = command[1:]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_dir = None
    created = not args.resume and (not args.out or (not storage.is_uri(args.out) and not Path(args.out).exists()))
    try:
        cfg, run_dir, resume = prepare(args)
        Driver(cfg, run_dir)  # reads the data source's metadata: bad input fails here, before Ray starts
        if resume:  # a config.yaml edited since the start: refused here, before Ray starts
            resume_check.check(resume_check.saved_record(run_dir), cfg, run_dir)
        open_engine = active()  # main() called inside an open Engine (a notebook, a test session): its warm actors
        with contextlib.nullcontext(open_engine) if open_engine else Engine(object_store_gb=cfg.resources.object_store_gb) as engine:  # else one Engine, one run
            engine.drive(cfg, run_dir, resume, command, console.Printer(sys.stdout, sys.stderr))  # progress bars on a terminal only
    except (ConfigError, DataError) as err:
        if run_dir is not None and not args.resume:
            _forget_unstarted(run_dir, remove_dir=created)  # the same command can simply run again
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except RayError as err:  # e.g. ObjectStoreFullError, a timeout restoring clients: a runtime failure, not bad input
        newest = latest(run_dir) if run_dir is not None else None
        where = f"--resume {run_dir} continues from {newest}" if newest else "no checkpoint was complete yet"
        print(f"error: the run failed in Ray ({type(err).__name__}: {_one_line(err)[:300]}); {where}", file=sys.stderr)
        return EXIT_FAILED
    predictions = "" if cfg.eval.predictions == "none" else " predictions.parquet,"
    report = ", report.html" if cfg.report.html and (storage.is_uri(run_dir) or (Path(run_dir) / "report.html").exists()) else ""
    print(f"wrote config.yaml, provenance.json, metrics.parquet,{predictions} checkpoints/, tensorboard/{report} in:")
    print(run_dir)
    return 0


def _one_line(err: Exception) -> str:
    return cli.one_line(err)  # the contract every command shares (raysim.cli)


def _forget_unstarted(run_dir: str, *, remove_dir: bool) -> None:
    """A fresh run refused before its first checkpoint leaves no trace: the files raysim wrote
    (config.yaml, provenance.json, the lock) go, and the directory if raysim made it."""
    if storage.is_uri(run_dir):
        return
    path, ours = Path(run_dir), {"config.yaml", "provenance.json", storage.LOCK}
    if not path.is_dir() or not {item.name for item in path.iterdir()} <= ours:
        return  # it got further (metrics, checkpoints): keep everything
    for name in ours:
        (path / name).unlink(missing_ok=True)
    if remove_dir:
        path.rmdir()


def prepare(args: argparse.Namespace) -> tuple[ExperimentConfig, str, bool]:
    """Resolve the config and the run directory (an absolute path or a URI); nothing is trained yet."""
    if args.resume:
        if args.config or args.overrides or args.out:
            raise ConfigError("--resume continues a run with its saved config: drop --config, --out and overrides")
        run_dir = storage.resolve_out(args.resume)
        saved = _read_config(run_dir)
        if saved is None:
            raise ConfigError(f"--resume {run_dir}: no config.yaml there (not a raysim run directory)")
        if latest(run_dir) is None:
            raise ConfigError(f"--resume {run_dir}: no complete checkpoint to resume from")
        if not storage.is_uri(run_dir):
            storage.check_unlocked(Path(run_dir))
        try:
            cfg = config_mod.from_dict(config_mod.parse_yaml(saved, f"{run_dir}/config.yaml"))
            algorithms.check(cfg)
            return cfg, run_dir, True
        except ConfigError as err:
            name = f"{run_dir}/config.yaml"
            raise ConfigError(str(err) if str(err).startswith(name) else f"{name}: {err}") from None
    cfg = config_mod.load(args.config, args.overrides)
    algorithms.check(cfg)  # the registered names: the method and its keys, the data source
    return cfg, storage.create_run_dir(cfg, args.out), False


def _read_config(run_dir: str) -> str | None:
    if storage.is_uri(run_dir):
        return storage.RunMirror(run_dir).read_text("config.yaml")
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None


latest = latest_name  # the newest complete checkpoint's name in a run directory (a path or a URI)


new_default_run_dir = storage.new_default_run_dir  # where it lived before 0.8


if __name__ == "__main__":
    raise SystemExit(main())
