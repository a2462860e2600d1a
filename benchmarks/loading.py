"""Loading speed per data source: first epoch (decode + resize + cache) vs a cached epoch.

    python benchmarks/loading.py [--out DIR] [--size 224] [--scale 1.0]

Writes fixtures of realistic image sizes in each source's exact format (2,000 fundus images
of 664x512, 200 OCT volumes of 128x200x200, 2,000 chest JPEGs of 320x390, 2,000 ISIC JPEGs
of 299x224; --scale shrinks the counts), then times, per source, reading every client split
through the on-disk cache twice: the first pass decodes, resizes and writes the cache, the
second memory-maps it. Both passes also walk the images in batches of 32 as float tensors,
as a training epoch does. Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from raysim.config import DataConfig
from raysim.datasets import DATASETS
from raysim.datasets.cache import load_cached


def write_oph(root: Path, n: int, *, fundus: tuple[int, int], oct_shape: tuple[int, int, int], rng: np.random.Generator) -> None:
    (root / "all").mkdir(parents=True)
    rows = []
    for i in range(n):
        name = f"data_{i:05d}.npz"
        np.savez(
            root / "all" / name,
            slo_fundus=rng.integers(0, 256, fundus, dtype=np.uint8),
            oct_bscans=rng.integers(0, 256, oct_shape, dtype=np.uint8),
            glaucoma=np.array(i % 2), race=np.array(i % 3), gender=np.array(i % 2), ethnicity=np.array(0),
            language=np.array(0), maritalstatus=np.array(0), age=np.array(60.0),
        )
        rows.append({"filename": name, "race": ("asian", "black", "white")[i % 3], "glaucoma": ("no", "yes")[i % 2]})
    frame = pd.DataFrame(rows)
    for site in (1, 2, 3):
        part = frame.iloc[site - 1 :: 3]
        cut = int(0.8 * len(part))
        part.iloc[:cut].to_csv(root / f"meta_site{site}_race_train.csv")
        part.iloc[cut:].to_csv(root / f"meta_site{site}_race_test.csv")


def write_jpegs(folder: Path, names: list[str], size: tuple[int, int], mode: str, rng: np.random.Generator) -> None:
    channels = (3,) if mode == "RGB" else ()
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size[1], size[0], *channels), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(folder / name, quality=90)


def write_chest(root: Path, n: int, rng: np.random.Generator) -> None:
    for site, prefix in (("chexpert", ""), ("mimic", "files_336p/")):
        names = [f"{site}/img_{i:05d}.jpg" for i in range(n // 2)]
        write_jpegs(root / prefix, names, (320, 390), "L", rng)
        frame = pd.DataFrame({"filename": names, "disease_label": [i % 2 for i in range(len(names))], "race_label": [i % 3 for i in range(len(names))], "gender_label": [i % 2 for i in range(len(names))], "age_label": [i % 2 for i in range(len(names))]})
        cut = int(0.8 * len(frame))
        for attr in ("race", "gender", "age"):
            frame.iloc[:cut].to_csv(root / f"meta_{site}_{attr}_train.csv")
            frame.iloc[cut:].to_csv(root / f"meta_{site}_{attr}_test.csv")


def write_isic(root: Path, n: int, rng: np.random.Generator) -> None:
    names = [f"ISIC_{i:07d}" for i in range(n)]
    write_jpegs(root / "ISIC_2019_Training_Input_preprocessed", [f"{x}.jpg" for x in names], (299, 224), "RGB", rng)
    classes = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    rows = []
    for i, name in enumerate(names):
        target, center, fold = i % 8, i % 6, "train" if i % 5 else "test"
        rows.append({"image": name, **{c: float(k == target) for k, c in enumerate(classes)}, "target": target, "center": center, "fold": fold, "fold2": f"{fold}_{center}"})
    pd.DataFrame(rows).to_csv(root / "train_test_split", index=False)
    meta = pd.DataFrame({"image": names, "age_approx": [45.0] * n, "anatom_site_general": ["torso"] * n, "sex": ["female", "male"] * (n // 2), "dataset": ["x"] * n})
    meta.to_csv(root / "ISIC_2019_Training_Metadata_FL.csv", index=False)


def epoch(images: np.ndarray) -> None:
    for start in range(0, len(images), 32):
        torch.from_numpy(np.array(images[start : start + 32])).to(torch.float32).div_(255.0)


def time_source(name: str, root: Path, size: int, **data: object) -> tuple[int, float, float]:
    source = DATASETS.get(name)(DataConfig(name=name, root=str(root), keep_unknown=True, **data), img_size=size, seed=0)
    specs = source.client_specs()
    timings = []
    for _ in range(2):
        start, count = time.perf_counter(), 0
        for spec in specs:
            for split in spec.splits:
                shard = load_cached(source, spec, split)
                epoch(shard.images)
                count += len(shard.images)
        timings.append(time.perf_counter() - start)
    return count, count / timings[0], count / timings[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="fixture folder (default: a temporary one, removed)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the image counts")
    args = parser.parse_args()
    base = args.out or Path(tempfile.mkdtemp(prefix="raysim-loading-"))
    os.environ["RAYSIM_CACHE"] = str(base / "cache")
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    n = lambda count: max(30, int(count * args.scale))  # noqa: E731
    cases: list[tuple[str, str, Path, Callable[[Path], None], dict]] = [
        ("FairFedMed-Oph 2D (664x512 fundus)", "fairfedmed_oph", base / "oph2d", lambda r: write_oph(r, n(2000), fundus=(664, 512), oct_shape=(1, 1, 1), rng=rng), {}),
        ("FairFedMed-Oph 3D (128x200x200 OCT, every 4th B-scan)", "fairfedmed_oph", base / "oct", lambda r: write_oph(r, n(200), fundus=(8, 8), oct_shape=(128, 200, 200), rng=rng), {"modality": "oct_bscans"}),
        ("FairFedMed-Chest (320x390 JPEG)", "fairfedmed_chest", base / "chest", lambda r: write_chest(r, n(2000), rng), {}),
        ("Fed-ISIC2019 (299x224 JPEG)", "fed_isic2019", base / "isic", lambda r: write_isic(r, n(2000), rng), {}),
    ]
    print(f"# {time.strftime('%Y-%m-%d')} on {platform.node()} ({platform.machine()}, {len(os.sched_getaffinity(0))} cores), torch threads 1, resized to {args.size}")
    print("| source | images | first epoch (img/s) | cached epoch (img/s) | speed-up |")
    print("|---|---|---|---|---|")
    for title, name, root, write, data in cases:
        if not root.exists():
            write(root)
        count, first, cached = time_source(name, root, args.size, **data)
        print(f"| {title} | {count} | {first:.0f} | {cached:.0f} | {cached / first:.1f}x |", flush=True)
    if args.out is None:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
