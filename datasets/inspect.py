"""`python -m raysim.datasets.inspect`: validate a dataset directory and show its clients.

    python -m raysim.datasets.inspect --dataset fairfedmed_oph --attribute race /data/FairFedMed-Oph
    python -m raysim.datasets.inspect --dataset fairfedmed_oph /data/FairFedMed-Oph --json

Prints, per client, the train and test counts per group of the attribute (the table the
FairFedMed paper shows; train includes the validation share raysim carves from it) and the
label balance, after reading every image once. Every problem found is listed (file, row,
what was expected) and any problem makes the exit status non-zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

from raysim.config import ConfigError, DataConfig
from raysim.datasets import DATASETS, ClientSpec, DataError, DataSource
from raysim.datasets.base import EmptySplitError

UNKNOWN_NAME = "Unknown"
EXIT_PROBLEMS = 1


def group_counts(spec: ClientSpec, split_names: tuple[str, ...], attribute: str | None, names: Mapping[int, str]) -> dict[str, int]:
    """Samples per group name over the given splits (all under "all" without an attribute)."""
    counts: Counter[str] = Counter()
    for split in split_names:
        table = spec.splits[split]
        if attribute is None:
            counts["all"] += len(table)
            continue
        for code, n in table.group_counts(attribute).items():
            counts[names.get(code, UNKNOWN_NAME)] += n
    order = [*names.values(), UNKNOWN_NAME, "all"]
    return {name: counts[name] for name in order if counts[name]}


def label_counts(spec: ClientSpec, split_names: tuple[str, ...]) -> dict[str, int]:
    labels = np.concatenate([spec.splits[s].labels for s in split_names])
    values, counts = np.unique(labels, return_counts=True)
    return {str(int(v)): int(n) for v, n in zip(values, counts)}


def inspect(source: DataSource) -> tuple[dict[str, Any], list[str]]:
    """The per-client summary and every problem found while reading metadata and images."""
    problems: list[str] = []
    try:
        specs = source.client_specs()
    except DataError as err:
        return {"attribute": source.attribute, "clients": []}, [str(err)]
    attribute = source.attribute if source.attribute in source.group_names else None
    names = source.group_names.get(attribute, {}) if attribute else {}
    clients = []
    for spec in specs:
        dropped: Counter[str] = Counter()
        for split in spec.splits:
            try:
                dropped.update(source.load(spec, split).dropped)
            except DataError:
                problems += file_problems(source, spec, split)
        clients.append(
            {
                "id": spec.id,
                "train": group_counts(spec, ("train", "val"), attribute, names),
                "test": group_counts(spec, ("test",), attribute, names),
                "labels": {"train": label_counts(spec, ("train", "val")), "test": label_counts(spec, ("test",))},
                "skipped": dict(dropped),
            }
        )
    return {"attribute": attribute, "clients": clients}, problems


def file_problems(source: DataSource, spec: ClientSpec, split: str) -> list[str]:
    """Every sample of a split that fails to load on its own (a load stops at the first)."""
    found = []
    table = spec.splits[split]
    for i in range(len(table)):
        single = dataclasses.replace(spec, splits={split: table.take(np.array([i]))})
        try:
            source.load(single, split)
        except EmptySplitError:
            pass  # an empty array is skipped by design, not a problem
        except DataError as err:
            found.append(f"{spec.id}/{split}: {err}")
    return found or [f"{spec.id}/{split}: the split could not be loaded as a whole"]


def format_summary(summary: dict[str, Any]) -> str:
    clients = summary["clients"]
    groups = list(dict.fromkeys(g for c in clients for split in ("train", "test") for g in c[split]))
    title = f"attribute: {summary['attribute']}" if summary["attribute"] else "no sensitive attribute"
    header = ["client", *(f"{g} tr/te" for g in groups), "labels train", "labels test"]
    rows = []
    for c in clients:
        cells = [f"{c['train'].get(g, 0)}/{c['test'].get(g, 0)}" for g in groups]
        labels = [" ".join(f"{k}:{v}" for k, v in c["labels"][s].items()) for s in ("train", "test")]
        rows.append([c["id"], *cells, *labels, f"skipped: {c['skipped']}" if c["skipped"] else ""])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(f"{cell:<{w}}" if i == 0 else f"{cell:>{w}}" for i, (cell, w) in enumerate(zip(cells, widths)))  # noqa: E731
    body = [line(r[: len(header)]) + (f"  {r[-1]}" if r[-1] else "") for r in rows]
    return "\n".join([title, line(header), "-" * len(line(header)), *body])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raysim.datasets.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="the dataset directory (data.root)")
    parser.add_argument("--dataset", required=True, help=f"data source: {', '.join(DATASETS.names())}")
    parser.add_argument("--attribute", help="sensitive attribute to count by (default: the source's target attribute)")
    parser.add_argument("--flag", help="MedMNIST only: which file")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    try:
        cfg = DataConfig(name=args.dataset, root=args.path, attribute=args.attribute, flag=args.flag, keep_unknown=True)
        cfg.validate()
        source = DATASETS.get(args.dataset)(cfg, img_size=32, seed=0)
    except (ConfigError, KeyError) as err:
        print(f"error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    summary, problems = inspect(source)
    print(json.dumps({k: summary[k] for k in ("attribute", "clients")}, indent=2) if args.json else format_summary(summary))
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
    return EXIT_PROBLEMS if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
