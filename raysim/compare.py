"""`python -m raysim.compare RUN_OR_STUDY... [--by KEY...] [--out DIR] [--baseline NAME]`: the
comparison table of runs pooled over seeds, or a Tune study's report (`raysim.reports.compare`
says what is pooled and refused, `raysim.reports.compare_plots` what `--out` writes,
`raysim.reports.study` what a study report holds)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raysim import cli
from raysim.outputs.runs import RunReadError
from raysim.reports import compare as comparisons
from raysim.reports import compare_plots

EXIT_BAD_INPUT = cli.EXIT_BAD_INPUT


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m raysim.compare", description=comparisons.__doc__.splitlines()[0].split("`): ", 1)[-1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, metavar="RUN_OR_STUDY", help="run directories, directories holding runs, or one Tune study directory")
    parser.add_argument("--by", nargs="+", default=list(comparisons.DEFAULT_BY), metavar="KEY", help="config keys that name a group (default: algorithm, the whole section)")
    parser.add_argument("--out", type=Path, help="also write table.md, table.csv, per_run.csv, clients.csv and compare.html here")
    parser.add_argument("--baseline", help="the group the per-client differences are taken against (default: fedavg when present, else the first)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return cli.guard(lambda: _main(args), (comparisons.CompareError, RunReadError), outs=[args.out])


def _main(args: argparse.Namespace) -> int:
    cli.check_out_dir(args.out)  # before anything is read or written
    studies = [p for p in args.inputs if comparisons.is_study_dir(p)]
    if studies:
        if len(args.inputs) > 1:
            raise comparisons.CompareError(f"{studies[0]} is a Tune study: report one study on its own (python -m raysim.compare STUDY_DIR)")
        from raysim.reports import study as study_report

        print(study_report.write(studies[0], out=args.out))
        return 0
    comparison = comparisons.compare(args.inputs, args.by, args.baseline)
    print(comparison.markdown())
    if args.out:
        compare_plots.write(comparison, args.out)
        print(f"wrote table.md, table.csv, per_run.csv, clients.csv and compare.html in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
