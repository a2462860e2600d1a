"""`python -m raysim.pretrain [--model NAME] [--img-size PX] [--out FILE] ...`: train the backbone
adapter methods start from, once, on the synthetic public pool (`raysim.client.pretraining`
says how, and where runs find it)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from raysim import cli
from raysim.client import pretraining
from raysim.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    d = pretraining.PretrainSettings()
    parser = cli.ArgumentParser(prog="python -m raysim.pretrain", description=pretraining.__doc__.splitlines()[0].strip("`: "), formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n".join(pretraining.__doc__.splitlines()[1:]))
    parser.add_argument("--model", default=d.model, help=f"timm model name (default {d.model})")
    parser.add_argument("--img-size", type=int, default=d.img_size, help=f"image size in pixels (default {d.img_size})")
    parser.add_argument("--patients", type=int, help="public pool size (default 1500; 600 at <= 32 px)")
    parser.add_argument("--epochs", type=int, help="training epochs (default 4; 6 at <= 32 px)")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"seed of the pool, initialisation and data order (default {d.seed})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr:g})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help=f"batch size (default {d.batch_size})")
    parser.add_argument("--threads", type=int, help="torch threads, fixed for a deterministic result (default 2; 1 at <= 32 px)")
    parser.add_argument("--out", type=Path, help="checkpoint file to write (default: the cache entry adapter runs use, under $RAYSIM_CACHE/pretrained)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return cli.guard(lambda: _main(args), (ConfigError, ValueError), outs=[args.out])


def _main(args: argparse.Namespace) -> int:
    settings = pretraining.PretrainSettings(model=args.model, img_size=args.img_size, patients=args.patients, epochs=args.epochs, seed=args.seed, lr=args.lr, batch_size=args.batch_size, threads=args.threads)
    settings.validate()
    if args.out is not None:  # before the pool is generated or a model built
        if args.out.is_dir():
            raise cli.InputError(f"--out {args.out} is a directory; give the checkpoint file to write")
        cli.check_out_dir(args.out.parent, flag=f"--out {args.out}: folder")
    out = args.out or settings.cache_path()
    meta = pretraining.pretrain(settings, out)
    print(f"wrote {out} and {out.name}.json ({meta['seconds']} s; held-out pool AUC {100 * meta['final']['pool_auc']:.1f}); use it with model.weights={out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
