"""`python -m raysim.pretrain [--clip] [--model NAME] [--img-size PX] [--out FILE] ...`: train the
backbone adapter methods start from, once, on the synthetic public pool (`raysim.client.pretraining`
says how, and where runs find it); with `--clip`, the small CLIP that stands in for CLIP on
`clip:RaySim-Tiny-ViT` hosts (`raysim.client.clip_pretraining`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from raysim import cli
from raysim.client import clip_pretraining, pretraining
from raysim.config import ConfigError

TRAINING_FLAGS = ("patients", "epochs", "seed", "lr", "batch_size", "threads")


def build_parser() -> argparse.ArgumentParser:
    d, c = pretraining.PretrainSettings(), clip_pretraining.ClipPretrainSettings()
    epilog = "\n".join(pretraining.__doc__.splitlines()[1:]) + "\n\n--clip:" + "\n".join(clip_pretraining.__doc__.splitlines()[1:])
    parser = cli.ArgumentParser(prog="python -m raysim.pretrain", description=pretraining.__doc__.splitlines()[0].strip("`: "), formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
    parser.add_argument("--clip", action="store_true", help=f"train the small CLIP ({c.arch}, contrastively on captioned pool images) instead of a timm backbone")
    parser.add_argument("--model", help=f"timm model name (default {d.model}); with --clip an open_clip ViT architecture (default {c.arch})")
    parser.add_argument("--img-size", type=int, default=d.img_size, help=f"image size in pixels (default {d.img_size})")
    parser.add_argument("--patients", type=int, help=f"public pool size (default 1500; 600 at <= 32 px; --clip {c.patients})")
    parser.add_argument("--epochs", type=int, help=f"training epochs (default 4; 6 at <= 32 px; --clip {c.epochs})")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"seed of the pool, initialisation and data order (default {d.seed})")
    parser.add_argument("--lr", type=float, help=f"learning rate (default {d.lr:g}, Adam; --clip {c.lr:g}, AdamW)")
    parser.add_argument("--batch-size", type=int, help=f"batch size (default {d.batch_size}; --clip {c.batch_size})")
    parser.add_argument("--threads", type=int, help=f"torch threads, fixed for a deterministic result (default 2; 1 at <= 32 px; --clip {c.threads})")
    parser.add_argument("--out", type=Path, help="checkpoint file to write (default: the cache entry runs use, under $RAYSIM_CACHE/pretrained)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return cli.guard(lambda: _main(args), (ConfigError, ValueError), outs=[args.out])


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The training flags given on the command line (the others keep each trainer's defaults)."""
    return {key: getattr(args, key) for key in TRAINING_FLAGS if getattr(args, key) is not None}


def _main(args: argparse.Namespace) -> int:
    if args.clip:
        settings: Any = clip_pretraining.ClipPretrainSettings(arch=args.model or clip_pretraining.TINY_ARCH, img_size=args.img_size, **_given(args))
    else:
        settings = pretraining.PretrainSettings(model=args.model or pretraining.PretrainSettings.model, img_size=args.img_size, **_given(args))
    settings.validate()
    if args.out is not None:  # before the pool is generated or a model built
        if args.out.is_dir():
            raise cli.InputError(f"--out {args.out} is a directory; give the checkpoint file to write")
        cli.check_out_dir(args.out.parent, flag=f"--out {args.out}: folder")
    out = args.out or settings.cache_path()
    if args.clip:
        meta = clip_pretraining.pretrain(settings, out)
        print(f"wrote {out} and {out.name}.json ({meta['seconds']} s; held-out zero-shot AUC {100 * meta['final']['zero_shot_auc']:.1f}); use it with model.name={meta['model']} model.weights={out}")
        return 0
    meta = pretraining.pretrain(settings, out)
    print(f"wrote {out} and {out.name}.json ({meta['seconds']} s; held-out pool AUC {100 * meta['final']['pool_auc']:.1f}); use it with model.weights={out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
