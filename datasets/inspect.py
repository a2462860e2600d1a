"""`python -m raysim.datasets.inspect`: validate a dataset directory and show its clients.

    python -m raysim.datasets.inspect --dataset fairfedmed_oph --attribute race /data/FairFedMed-Oph
    python -m raysim.datasets.inspect --dataset fairfedmed_oph /data/FairFedMed-Oph --json

Prints, per client, the train and test counts per group of the attribute (the table the
FairFedMed paper shows; train includes the validation share raysim carves from it) and the
label balance, after reading every image once. Sources with segmentation masks (FairSeg, the
synthetic twin) add a mask table per client and group over all its splits: the share of
pixels in each mask class (background, rim, cup: FairSeg's codes 0 / -1 / -2, the rim being the
disc without the cup), how many masks have no disc (rim + cup), and the mean vertical
cup-to-disc ratio (`raysim.metrics.segmentation`). Every problem found is listed (file,
row, what was expected) and any problem makes the exit status non-zero.
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

from raysim import cli
from raysim.config import ConfigError, DataConfig
from raysim.datasets import DATASETS, ClientSpec, DataError, DataSource, SampleTable
from raysim.datasets.base import EmptySplitError
from raysim.metrics import segmentation as segmetrics

UNKNOWN_NAME = "Unknown"
EXIT_PROBLEMS = 1
MASK_TABLE = ("background", "rim", "cup")  # mask classes 0 / 1 / 2 (FairSeg's 0 / -1 / -2)
MASK_SIZE = 128  # masks are measured at this size (the CDR of a ~25-pixel disc is exact to ~0.05)


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
        kept: dict[str, SampleTable] = {}
        for split in spec.splits:
            try:
                shard = source.load(spec, split)
                dropped.update(shard.dropped)
                kept[split] = shard.table
            except DataError:
                problems += file_problems(source, spec, split)
        client: dict[str, Any] = {
            "id": spec.id,
            "train": group_counts(spec, ("train", "val"), attribute, names),
            "test": group_counts(spec, ("test",), attribute, names),
        }
        if source.label_name:  # a source without a classification label has only placeholders
            client["labels"] = {"train": label_counts(spec, ("train", "val")), "test": label_counts(spec, ("test",))}
        client["skipped"] = dict(dropped)
        if source.mask_classes:
            client["masks"], found = mask_stats(source, spec, kept, attribute, names)
            problems += found
        clients.append(client)
    return {"attribute": attribute, "clients": clients}, problems


def _masks(source: DataSource, spec: ClientSpec, split: str, table: SampleTable) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The masks of a split's kept rows, the rows they belong to, and each file that fails on its own."""
    try:
        return source.load_masks(spec, split, table.sample_ids, MASK_SIZE), np.arange(len(table)), []
    except DataError:
        pass  # a load stops at the first bad file: try them one by one to list every one
    good, found = [], []
    for i in range(len(table)):
        try:
            source.load_masks(spec, split, table.sample_ids[i : i + 1], MASK_SIZE)
            good.append(i)
        except DataError as err:
            found.append(f"{spec.id}/{split}: {err}")
    index = np.asarray(good, dtype=np.int64)
    return source.load_masks(spec, split, table.sample_ids[index], MASK_SIZE), index, found


def _mask_row(masks: np.ndarray) -> dict[str, Any]:
    """Class shares, masks without a disc and mean vertical CDR of some masks (N, H, W)."""
    shares = segmetrics.class_fractions(masks) if len(masks) else np.full(3, np.nan)
    cdrs = np.array([segmetrics.vertical_cdr(m) for m in masks])
    with_disc = cdrs[~np.isnan(cdrs)]
    return {
        "n": len(masks),
        **{name: round(float(v), 4) for name, v in zip(MASK_TABLE, shares)},
        "empty": int(len(masks) - len(with_disc)),
        "cdr": round(float(with_disc.mean()), 4) if len(with_disc) else None,
    }


def mask_stats(source: DataSource, spec: ClientSpec, kept: Mapping[str, SampleTable], attribute: str | None, names: Mapping[int, str]) -> tuple[dict[str, Any], list[str]]:
    """`_mask_row` of all the client's masks ("all") and of each group of the attribute, over every split."""
    loaded, codes, problems = [], [], []
    for split, table in kept.items():
        masks, index, found = _masks(source, spec, split, table)
        problems += found
        loaded.append(masks)
        codes.append(table.attributes[attribute][index] if attribute else np.zeros(len(index), np.int64))
    masks = np.concatenate(loaded) if loaded else np.zeros((0, MASK_SIZE, MASK_SIZE), np.uint8)
    group = np.concatenate(codes) if codes else np.zeros(0, np.int64)
    stats = {"all": _mask_row(masks)}
    for code, name in [*names.items(), (-1, UNKNOWN_NAME)] if attribute else []:
        if (group == code).any():
            stats[name] = _mask_row(masks[group == code])
    return stats, problems


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


def _table(header: list[str], rows: list[list[str]], notes: list[str]) -> list[str]:
    """Left-aligned first column, the rest right-aligned; a row's note (if any) after it."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(f"{cell:<{w}}" if i == 0 else f"{cell:>{w}}" for i, (cell, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return [line(header), "-" * len(line(header)), *(line(r) + (f"  {n}" if n else "") for r, n in zip(rows, notes))]


def format_summary(summary: dict[str, Any]) -> str:
    clients = summary["clients"]
    groups = list(dict.fromkeys(g for c in clients for split in ("train", "test") for g in c[split]))
    title = f"attribute: {summary['attribute']}" if summary["attribute"] else "no sensitive attribute"
    with_labels = any("labels" in c for c in clients)
    header = ["client", *(f"{g} tr/te" for g in groups), *(["labels train", "labels test"] if with_labels else [])]
    rows, notes = [], []
    for c in clients:
        cells = [f"{c['train'].get(g, 0)}/{c['test'].get(g, 0)}" for g in groups]
        labels = [" ".join(f"{k}:{v}" for k, v in c["labels"][s].items()) for s in ("train", "test")] if with_labels else []
        rows.append([c["id"], *cells, *labels])
        notes.append(f"skipped: {c['skipped']}" if c["skipped"] else "")
    lines = [title, *_table(header, rows, notes)]
    if any("masks" in c for c in clients):
        lines += ["", "masks: share of pixels per class (rim: the disc without the cup), masks without a disc (rim + cup), mean vertical cup-to-disc ratio"]
        header = ["client", "group", "n", *MASK_TABLE, "empty", "cdr"]
        rows = [
            [c["id"], group, str(m["n"]), *(f"{100 * m[k]:.1f}%" for k in MASK_TABLE), str(m["empty"]), "-" if m["cdr"] is None else f"{m['cdr']:.3f}"]
            for c in clients
            for group, m in c.get("masks", {}).items()
            if m["n"]
        ]
        lines += _table(header, rows, [""] * len(rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m raysim.datasets.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="the dataset directory (data.root)")
    parser.add_argument("--dataset", required=True, help=f"data source: {', '.join(DATASETS.names())}")
    parser.add_argument("--attribute", help="sensitive attribute to count by (default: the source's target attribute)")
    parser.add_argument("--flag", help="MedMNIST only: which file")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    return cli.guard(lambda: _main(args), (ConfigError, DataError))


def _main(args: argparse.Namespace) -> int:
    cfg = DataConfig(name=args.dataset, root=args.path, attribute=args.attribute, flag=args.flag, keep_unknown=True)
    cfg.validate()
    try:
        factory = DATASETS.get(args.dataset)
    except KeyError as err:
        raise cli.InputError(f"--dataset {cli.one_line(err)}") from None
    source = factory(cfg, img_size=32, seed=0)
    summary, problems = inspect(source)
    if not summary["clients"] and problems:  # not even the metadata reads: no data set to list problems of
        raise DataError(problems[0])
    print(json.dumps({k: summary[k] for k in ("attribute", "clients")}, indent=2) if args.json else format_summary(summary))
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
    return EXIT_PROBLEMS if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
