"""`python -m raysim.report RUN_DIR [--out FILE]`: (re)write a run's report.html
(`raysim.reports.run_report` says what the page holds)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from raysim import cli
from raysim.outputs.runs import RunReadError
from raysim.reports import run_report


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m raysim.report", description="Write RUN_DIR/report.html: plots and tables of one run (opens from disk, no server).")
    parser.add_argument("run_dir", help="a raysim run directory (config.yaml, metrics.parquet)")
    parser.add_argument("--out", help="where to write the page (default RUN_DIR/report.html)")
    args = parser.parse_args(argv)
    return cli.guard(lambda: _main(args), (RunReadError,), outs=[args.out])


def _main(args: argparse.Namespace) -> int:
    if args.out is not None and Path(args.out).is_dir():
        raise cli.InputError(f"--out {args.out} is a directory; give the HTML file to write")
    if args.out is not None and not Path(args.out).parent.is_dir():
        raise cli.InputError(f"--out {args.out}: {Path(args.out).parent} is not a directory")
    print(run_report.write_report(args.run_dir, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
