"""Synthetic FairFedMed-Oph twin: a small, deterministic set in the exact on-disk format.

Datasheet
- Format: specs/fairfedmed.md "FairFedMed-Oph on disk" (``all/data_{i:05d}.npz``,
  ``meta_all.csv``, ``meta_site{k}_{attr}[_train|_test].csv`` for k = 1..3 and attr in
  race/language/ethnicity/gender), plus ``truth.json`` (every generator parameter, counts
  and oracle AUCs). Content: specs/synthetic.md.
- Sites: 3, equal sizes. In this twin a site is a *physical* property (scanner style:
  gamma, brightness, blur, noise) with its own group mix and prevalence, so every
  attribute's site files list the same patients with the same train/test split (the real
  set re-splits per attribute).
- Label: glaucoma, drawn from a per-site prevalence and age; it acts on the anatomy only
  (cup-to-disc ratio in the fundus, nerve-fibre-layer thickness in the OCT).
- Groups: race changes the anatomy (larger, more variable discs for Black patients, so a
  group-blind rule on raw cup size over-calls them) and the image quality (fundus
  pigmentation lowers disc/cup contrast and adds structured noise). Prevalence does not
  depend on any group, so the group carries no label shortcut.
- Unknowns (-1) at realistic rates for ethnicity, language and marital status; a few
  files (``empty_fraction``, default 0.5 %) have an empty fundus and/or OCT array.
- Segmentation (generator version 2): ``disc_cup_mask`` (int8, the fundus's size) marks the
  optic disc and cup in FairSeg's codes (0 background, -1 disc rim, -2 cup; read by
  ``raysim.datasets.fairseg``), rasterised from the very ellipses the fundus drew (recorded
  while drawing, never drawn again). ``oct_onh_bscans`` (uint8, ``oct_shape``) is an
  optic-nerve-head cube of the same anatomy: centred on that disc, the cup a bowl of that
  ellipse whose depth grows with the CDR, the nerve-fibre layer around it ``rnfl`` thinned by
  the rim's share (1 - CDR^2); its speckle has its own stream ``(seed, 2, i)``. The macular
  ``oct_bscans`` is unchanged: its nerve-fibre band is ``rnfl``, drawn with the label
  (glaucoma thins it) but not from the CDR, so in it the anatomy shows only through the label.
  An empty fundus has an empty mask; an empty OCT, both cubes empty.
- Populations: ``clinical`` (the default: the 3 client sites above) and ``public``, a
  separate pool for central pretraining (``python -m raysim.pretrain``): its own seed
  namespace, its own 3 acquisition styles, a White-dominated group mix (~88 %) and files
  named ``public_*.npz``, so it shares no patient, file or scanner style with the clinical
  sites. The label mechanism (CDR, RNFL, age) is the same disease in both.
- Licence: generated data, no restrictions. Build it with
  ``python -m raysim.datasets.synthetic --out DIR [--population public]``.

Versions (``GENERATOR_VERSION``, part of the parameters and so of the cache key):
1. the fundus, the macular OCT, the CSVs and truth.json.
2. adds ``disc_cup_mask`` and ``oct_onh_bscans`` to every npz; every version-1 array, CSV
   and random draw is byte-identical (tests/datasets/test_segmentation_data.py checks it against
   version 1's code).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import tempfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

from raysim import cli
from raysim.datasets import synthetic_render as render
from raysim.datasets.base import ClientSpec, DataError, register_dataset
from raysim.datasets.cache import cache_root
from raysim.datasets.fairfedmed_oph import FairFedMedOph
from raysim.datasets.fairseg import MASK_CLASSES, read_mask
from raysim.datasets.oph_schema import (
    ATTRIBUTES,
    CSV_COLUMNS,
    MODALITIES,
    NUM_SITES,
    SITE_ATTRIBUTES,
    SPLITS,
    UNKNOWN,
    text_from_code,
)
from raysim.datasets.synthetic_render import (
    DISC_RADIUS,
    PIGMENT_CUP_LOSS,
    PIGMENT_DISC_LOSS,
    PIGMENT_NOISE_GAIN,
    PIGMENT_TEXTURE,
    REF_DISC_AREA,
    SiteStyle,
)

logger = logging.getLogger(__name__)

MASK_KEY = "disc_cup_mask"  # FairSeg's key (the slo_fundus family), so the FairSeg reader reads it
ONH_KEY = "oct_onh_bscans"

GENERATOR_VERSION = 2  # see the module docstring's version list
DEFAULT_PATIENTS = 2100
EMPTY_FRACTION = 0.005
MIN_TEST_PER_GROUP = 25  # per site and race, capped at a third of the group
RACE_NAMES = ATTRIBUTES["race"].names  # Asian, Black, White


@dataclass(frozen=True)
class RaceAnatomy:
    """Per-race optic-disc size (area, mm^2) and fundus pigmentation (0 light .. 1 dark)."""

    disc_area_mean: float
    disc_area_sd: float
    pigment_mean: float


# Minority shares are above the real sites' (Asian 6-10 %, Black ~15 %) and the split keeps
# MIN_TEST_PER_GROUP test patients per race group, so that group AUCs at the default size are
# not pure noise; the ordering (White majority, then Black, then Asian) is the real one.
SITES: tuple[SiteStyle, ...] = (
    SiteStyle(0.85, 0.02, 0.6, 0.03, 0.45, 0.70, (0.14, 0.19, 0.67), (0.95, 0.04, 0.01),
              (0.93, 0.01, 0.04, 0.02), (0.55, 0.22, 0.10, 0.08, 0.01, 0.04)),
    SiteStyle(1.00, 0.00, 1.1, 0.05, 0.40, 0.55, (0.16, 0.23, 0.61), (0.91, 0.07, 0.02),
              (0.91, 0.02, 0.05, 0.02), (0.50, 0.27, 0.10, 0.08, 0.02, 0.03)),
    SiteStyle(1.20, -0.03, 1.6, 0.04, 0.50, 0.36, (0.14, 0.16, 0.70), (0.93, 0.05, 0.02),
              (0.94, 0.01, 0.03, 0.02), (0.58, 0.20, 0.09, 0.10, 0.01, 0.02)),
)
RACES: tuple[RaceAnatomy, ...] = (
    RaceAnatomy(disc_area_mean=2.8, disc_area_sd=0.50, pigment_mean=0.40),  # Asian
    RaceAnatomy(disc_area_mean=3.4, disc_area_sd=0.80, pigment_mean=0.70),  # Black
    RaceAnatomy(disc_area_mean=2.6, disc_area_sd=0.45, pigment_mean=0.15),  # White
)
# The public pool: other cameras (a sharp bright one, a dim noisy one, a dark contrasty one),
# a group mix dominated by the majority as in public fundus collections, case-enriched.
PUBLIC_SITES: tuple[SiteStyle, ...] = (
    SiteStyle(0.75, 0.05, 0.3, 0.02, 0.40, 0.48, (0.05, 0.06, 0.89), (0.94, 0.03, 0.03),
              (0.95, 0.01, 0.02, 0.02), (0.55, 0.20, 0.10, 0.10, 0.01, 0.04)),
    SiteStyle(1.10, -0.05, 1.3, 0.06, 0.30, 0.52, (0.04, 0.09, 0.87), (0.92, 0.04, 0.04),
              (0.94, 0.02, 0.02, 0.02), (0.52, 0.24, 0.10, 0.09, 0.02, 0.03)),
    SiteStyle(1.35, 0.04, 0.9, 0.035, 0.50, 0.45, (0.06, 0.05, 0.89), (0.95, 0.02, 0.03),
              (0.96, 0.01, 0.01, 0.02), (0.57, 0.21, 0.09, 0.09, 0.01, 0.03)),
)


@dataclass(frozen=True)
class Population:
    """Who is drawn and how they are imaged: site styles, file names, seed namespace."""

    sites: tuple[SiteStyle, ...]
    prefix: str  # npz file names: f"{prefix}_{i:05d}.npz"
    seed_words: tuple[int, ...]  # prepended to every seed (empty: the clinical set's own streams)


POPULATIONS: dict[str, Population] = {
    "clinical": Population(SITES, "data", ()),
    "public": Population(PUBLIC_SITES, "public", (zlib.crc32(b"public"),)),
}
DEFAULT_POPULATION = "clinical"
# Label -> anatomy (identical for every group: the oracle's AUC does not depend on the group).
CDR = ((0.35, 0.07), (0.63, 0.07))  # cup-to-disc ratio (mean, sd) for glaucoma 0 / 1
RNFL = ((1.00, 0.12), (0.75, 0.12))  # relative nerve-fibre-layer thickness
AGE_MEAN, AGE_SD, AGE_LOGIT_PER_YEAR = 60.0, 12.0, 0.03


def generator_params(
    *,
    patients: int = DEFAULT_PATIENTS,
    seed: int = 0,
    fundus_size: int = 128,
    oct_shape: tuple[int, int, int] = (16, 32, 32),
    test_fraction: float = 0.2,
    empty_fraction: float = EMPTY_FRACTION,
    population: str = DEFAULT_POPULATION,
) -> dict[str, Any]:
    """The exact parameters that define a generated set (validated; usable as a cache key).

    `population` appears only when it is not the default, so the clinical sets' parameters
    (and their cache keys) have the keys they had before the public pool existed.
    """
    if patients < 6 * NUM_SITES:
        raise ValueError(f"patients must be >= {6 * NUM_SITES}, got {patients}")
    if fundus_size < 16:
        raise ValueError(f"fundus_size must be >= 16 pixels, got {fundus_size}")
    if len(oct_shape) != 3 or min(oct_shape) < 4:
        raise ValueError(f"oct_shape must be 3 sizes >= 4 (slices, depth, width), got {oct_shape}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if not 0.0 <= empty_fraction <= 1.0:
        raise ValueError(f"empty_fraction must be in [0, 1], got {empty_fraction}")
    if population not in POPULATIONS:
        raise ValueError(f"population must be one of {', '.join(POPULATIONS)}, got {population!r}")
    params: dict[str, Any] = {
        "version": GENERATOR_VERSION,
        "patients": int(patients),
        "seed": int(seed),
        "fundus_size": int(fundus_size),
        "oct_shape": [int(s) for s in oct_shape],
        "test_fraction": float(test_fraction),
        "empty_fraction": float(empty_fraction),
    }
    if population != DEFAULT_POPULATION:
        params["population"] = population
    return params


def population_of(params: dict[str, Any]) -> Population:
    return POPULATIONS[params.get("population", DEFAULT_POPULATION)]


# ----------------------------------------------------------------------------- latents
def _draw_latents(params: dict[str, Any]) -> pd.DataFrame:
    """One row per patient: site, split, demographics, label and the anatomy it acts on."""
    pop = population_of(params)
    rng = np.random.default_rng([*pop.seed_words, params["seed"], 0])
    n = params["patients"]
    site = rng.permutation(np.arange(n) % NUM_SITES)
    cols: dict[str, np.ndarray] = {k: np.zeros(n, dtype=np.int64) for k in
                                   ("race", "gender", "ethnicity", "language", "maritalstatus")}
    for k, s in enumerate(pop.sites):
        idx = np.flatnonzero(site == k)
        m = len(idx)

        def pick(codes: list[int], p: tuple[float, ...], m: int = m) -> np.ndarray:
            return rng.choice(codes, size=m, p=np.asarray(p) / sum(p))

        cols["race"][idx] = pick([0, 1, 2], s.race_mix)
        cols["gender"][idx] = (rng.random(m) < s.male_share).astype(np.int64)
        cols["ethnicity"][idx] = pick([0, 1, UNKNOWN], s.ethnicity_mix)
        cols["language"][idx] = pick([0, 1, 2, UNKNOWN], s.language_mix)
        cols["maritalstatus"][idx] = pick([0, 1, 2, 3, 4, UNKNOWN], s.marital_mix)
    age = np.round(np.clip(rng.normal(AGE_MEAN, AGE_SD, n), 20.0, 95.0), 1)
    prev = np.array([s.prevalence for s in pop.sites])[site]
    prior_logit = np.log(prev / (1 - prev)) + AGE_LOGIT_PER_YEAR * (age - AGE_MEAN)
    y = (rng.random(n) < 1 / (1 + np.exp(-prior_logit))).astype(np.int64)
    cdr_mu, cdr_sd = np.array(CDR).T
    rnfl_mu, rnfl_sd = np.array(RNFL).T
    cdr = np.clip(rng.normal(cdr_mu[y], cdr_sd[y]), 0.08, 0.92)
    rnfl = np.clip(rng.normal(rnfl_mu[y], rnfl_sd[y]), 0.3, 1.6)
    race = cols["race"]
    area_mu = np.array([r.disc_area_mean for r in RACES])[race]
    area_sd = np.array([r.disc_area_sd for r in RACES])[race]
    disc_area = np.clip(rng.normal(area_mu, area_sd), 1.2, 6.0)
    pigment = np.clip(rng.normal(np.array([r.pigment_mean for r in RACES])[race], 0.1), 0, 1)
    # Split: within each site and race, a fixed share to test (stratified by group), raised to
    # MIN_TEST_PER_GROUP where that leaves at least two thirds of the group for training.
    split = np.zeros(n, dtype=np.int64)
    for k in range(NUM_SITES):
        for g in range(len(RACES)):
            idx = rng.permutation(np.flatnonzero((site == k) & (race == g)))
            n_test = max(round(params["test_fraction"] * len(idx)),
                         min(MIN_TEST_PER_GROUP, len(idx) // 3))
            split[idx[:n_test]] = 1
    n_empty = int(round(params["empty_fraction"] * n))
    empty = np.zeros(n, dtype=np.int64)  # bit 1: no fundus, bit 2: no OCT
    empty[rng.choice(n, size=n_empty, replace=False)] = rng.choice([1, 2, 3], size=n_empty)
    df = pd.DataFrame({"filename": [f"{pop.prefix}_{i + 1:05d}.npz" for i in range(n)], "age": age,
                       **cols, "glaucoma": y, "site": site, "split": split, "cdr": cdr,
                       "rnfl": rnfl, "disc_area": disc_area, "pigment": pigment,
                       "prior_logit": prior_logit, "empty": empty})
    # Cup diameter in mm (disc diameter from its area): the quantity a size rule thresholds.
    df["cup_diameter"] = df["cdr"] * 2 * np.sqrt(df["disc_area"] / np.pi)
    return df


# ----------------------------------------------------------------------------- truth
def _auc(y: np.ndarray, score: np.ndarray) -> float | None:
    if len(np.unique(y)) < 2:
        return None
    return round(float(roc_auc_score(y, score)), 4)


def _oracle(df: pd.DataFrame) -> dict[str, Any]:
    """Per site (test split): AUC of the Bayes score and of a group-blind cup-size rule."""
    (m0, sd), (m1, _) = CDR
    # Exact posterior log-odds given the fundus-visible latent (equal sds: linear in CDR).
    bayes = df["prior_logit"] + (m1 - m0) / sd**2 * (df["cdr"] - (m0 + m1) / 2)
    out: dict[str, Any] = {}
    for k in range(NUM_SITES):
        t = df[(df["site"] == k) & (df["split"] == 1)]
        white = t[t["race"] == 2]
        res: dict[str, Any] = {"oracle_auc": {}, "blind_cup_auc": {},
                               "blind_cup_fpr_at_white_threshold": {}}
        # The size threshold a majority-tuned rule would use: Youden's J on White patients.
        if white["glaucoma"].nunique() == 2:
            fpr, tpr, thresholds = roc_curve(white["glaucoma"], white["cup_diameter"])
            thr = float(thresholds[int(np.argmax(tpr - fpr))])
        else:
            thr = float("nan")
        for name, g in [("all", t), *[(RACE_NAMES[i], t[t["race"] == i]) for i in range(3)]]:
            y = g["glaucoma"].to_numpy()
            res["oracle_auc"][name] = _auc(y, bayes[g.index].to_numpy())
            res["blind_cup_auc"][name] = _auc(y, g["cup_diameter"].to_numpy())
            neg = g["cup_diameter"].to_numpy()[y == 0]
            res["blind_cup_fpr_at_white_threshold"][name] = (
                round(float((neg >= thr).mean()), 4) if len(neg) and np.isfinite(thr) else None)
        for key in ("oracle_auc", "blind_cup_auc"):
            vals = [res[key][r] for r in RACE_NAMES if res[key][r] is not None]
            res[key.replace("_auc", "_gap")] = round(max(vals) - min(vals), 4) if vals else None
        res["blind_cup_threshold_mm"] = round(thr, 4) if np.isfinite(thr) else None
        out[f"site{k + 1}"] = res
    return out


def _mean_over_sites(oracle: dict[str, Any]) -> dict[str, Any]:
    """Mean over sites of each group's AUC, and the gap (max - min over race groups) of those."""
    out: dict[str, Any] = {}
    for key in ("oracle_auc", "blind_cup_auc"):
        means = {}
        for group in ("all", *RACE_NAMES):
            vals = [o[key][group] for o in oracle.values() if o[key][group] is not None]
            means[group] = round(float(np.mean(vals)), 4) if vals else None
        out[key] = means
        known = [means[r] for r in RACE_NAMES if means[r] is not None]
        out[key.replace("_auc", "_gap")] = round(max(known) - min(known), 4) if known else None
    return out


def _counts(df: pd.DataFrame) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in range(NUM_SITES):
        out[f"site{k + 1}"] = {}
        for sp, split in enumerate(SPLITS):
            g = df[(df["site"] == k) & (df["split"] == sp)]
            out[f"site{k + 1}"][split] = {
                "all": len(g), "glaucoma": int(g["glaucoma"].sum()),
                "male": int(g["gender"].sum()),
                **{RACE_NAMES[i]: int((g["race"] == i).sum()) for i in range(3)}}
    return out


def _truth(params: dict[str, Any], df: pd.DataFrame) -> dict[str, Any]:
    return {
        "generator": "raysim.datasets.synthetic",
        "params": params,
        "label_model": {"cdr_mean_sd": CDR, "rnfl_mean_sd": RNFL, "age_mean_sd": [AGE_MEAN, AGE_SD],
                        "age_logit_per_year": AGE_LOGIT_PER_YEAR,
                        "ref_disc_area_mm2": REF_DISC_AREA, "disc_radius": DISC_RADIUS,
                        "onh_oct": {"field_half_width": render.ONH_FIELD, "healthy_cdr": render.ONH_HEALTHY_CDR,
                                    "cup_depth_at_cdr1": render.CUP_DEPTH_AT_CDR1}},
        "sites": {f"site{k + 1}": asdict(s) for k, s in enumerate(population_of(params).sites)},
        "races": {RACE_NAMES[i]: asdict(r) for i, r in enumerate(RACES)},
        "pigment_effects": {"disc_contrast_loss": PIGMENT_DISC_LOSS,
                            "cup_contrast_loss": PIGMENT_CUP_LOSS,
                            "noise_gain": PIGMENT_NOISE_GAIN, "texture": PIGMENT_TEXTURE},
        "counts": _counts(df),
        "empty": {"slo_fundus": int((df["empty"] & 1).astype(bool).sum()),
                  "oct_bscans": int((df["empty"] & 2).astype(bool).sum())},
        "oracle": (oracle := _oracle(df)),
        "oracle_mean_over_sites": _mean_over_sites(oracle),
    }


# ----------------------------------------------------------------------------- writing
def _owned_files(out: Path) -> list[Path]:
    npz = [f for pop in POPULATIONS.values() for f in out.glob(f"all/{pop.prefix}_*.npz")]
    return [*npz, *out.glob("meta_*.csv"), *out.glob("truth.json")]


def _write_csvs(out: Path, df: pd.DataFrame) -> None:
    meta = pd.DataFrame({"filename": df["filename"], "age": df["age"]})
    for attr in ATTRIBUTES:
        meta[attr] = [text_from_code(attr, int(c)) for c in df[attr]]
    meta["glaucoma"] = np.where(df["glaucoma"] == 1, "yes", "no")
    meta = meta[list(CSV_COLUMNS)]
    meta.to_csv(out / "meta_all.csv", index=True)
    for k in range(NUM_SITES):
        site = meta[df["site"] == k]
        for attr in SITE_ATTRIBUTES:
            stem = f"meta_site{k + 1}_{attr}"
            site.to_csv(out / f"{stem}.csv", index=True)
            for sp, split in enumerate(SPLITS):
                site[df.loc[site.index, "split"] == sp].to_csv(out / f"{stem}_{split}.csv",
                                                                 index=True)


def _anatomy_arrays(row: Any, geometry: render.DiscGeometry, site: SiteStyle, params: dict[str, Any], i: int) -> dict[str, np.ndarray]:
    """Version 2's arrays: the disc / cup mask and the ONH cube of the anatomy the fundus drew.

    The ONH cube's speckle has its own stream `(seed, 2, i)`, so the version-1 streams
    `(seed, 0)` and `(seed, 1, i)` draw exactly what they drew before.
    """
    onh_rng = np.random.default_rng([*population_of(params).seed_words, params["seed"], 2, i])
    shape: tuple[int, int, int] = tuple(params["oct_shape"])  # type: ignore[assignment]
    return {MASK_KEY: render.disc_cup_mask(geometry, params["fundus_size"]),
            ONH_KEY: render.onh_volume(row, geometry, site, shape, onh_rng)}


def generate(
    out: Path | str,
    *,
    patients: int = DEFAULT_PATIENTS,
    seed: int = 0,
    fundus_size: int = 128,
    oct_shape: tuple[int, int, int] = (16, 32, 32),
    test_fraction: float = 0.2,
    empty_fraction: float = EMPTY_FRACTION,
    population: str = DEFAULT_POPULATION,
) -> dict[str, Any]:
    """Write the set to ``out`` (replacing files a previous run wrote there); return the truth.

    Deterministic: the same arguments give byte-identical files.
    """
    params = generator_params(patients=patients, seed=seed, fundus_size=fundus_size,
                              oct_shape=oct_shape, test_fraction=test_fraction,
                              empty_fraction=empty_fraction, population=population)
    pop = population_of(params)
    out = Path(out)
    for f in _owned_files(out):
        f.unlink()
    (out / "all").mkdir(parents=True, exist_ok=True)
    df = _draw_latents(params)
    shape: tuple[int, int, int] = tuple(params["oct_shape"])  # type: ignore[assignment]
    for i, row in enumerate(df.itertuples(index=False)):
        rng = np.random.default_rng([*pop.seed_words, params["seed"], 1, i])
        site = pop.sites[row.site]
        fundus, geometry = render.fundus_and_geometry(row, site, fundus_size, rng)
        oct_ = render.oct_volume(row, site, shape, rng)
        arrays = {"slo_fundus": fundus, "oct_bscans": oct_,
                  "glaucoma": np.array(row.glaucoma, dtype=np.int64),
                  **{a: np.array(getattr(row, a), dtype=np.int64) for a in ATTRIBUTES},
                  "age": np.array(row.age, dtype=np.float64),
                  **_anatomy_arrays(row, geometry, site, params, i)}
        if row.empty & 1:
            arrays.update(slo_fundus=np.zeros((0, 0), np.uint8), disc_cup_mask=np.zeros((0, 0), np.int8))
        if row.empty & 2:
            arrays.update(oct_bscans=np.zeros((0, 0, 0), np.uint8), oct_onh_bscans=np.zeros((0, 0, 0), np.uint8))
        render.save_npz(out / "all" / row.filename, arrays)
    _write_csvs(out, df)
    truth = _truth(params, df)
    (out / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    logger.info("wrote %d patients to %s", len(df), out)
    return truth


# ----------------------------------------------------------------------------- CLI
def _summary(truth: dict[str, Any]) -> str:
    lines = []
    for site, splits in truth["counts"].items():
        for split, c in splits.items():
            races = " ".join(f"{r}={c[r]}" for r in RACE_NAMES)
            lines.append(f"{site} {split:5s}: n={c['all']} glaucoma={c['glaucoma']} "
                         f"male={c['male']} {races}")
    for site, o in truth["oracle"].items():
        fmt = lambda d: " ".join(f"{k}={v}" for k, v in d.items())  # noqa: E731
        lines.append(f"{site} test oracle AUC: {fmt(o['oracle_auc'])} (gap {o['oracle_gap']})")
        lines.append(f"{site} test blind cup-size AUC: {fmt(o['blind_cup_auc'])}; its FPR at "
                     f"the White-tuned cut-off: {fmt(o['blind_cup_fpr_at_white_threshold'])}")
    m = truth["oracle_mean_over_sites"]
    lines.append(f"mean over sites: oracle AUC {m['oracle_auc']} (race gap {m['oracle_gap']})")
    lines.append(f"empty arrays: {truth['empty']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m raysim.datasets.synthetic",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--patients", type=int, default=DEFAULT_PATIENTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fundus-size", type=int, default=128)
    parser.add_argument("--population", choices=sorted(POPULATIONS), default=DEFAULT_POPULATION,
                        help="clinical: the 3 client sites; public: the separate pretraining pool")
    parser.add_argument("--force", action="store_true",
                        help="replace the files of an earlier run in a non-empty --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return cli.guard(lambda: _main(args), (ValueError,), outs=[args.out])


def _main(args: argparse.Namespace) -> int:
    cli.check_out_dir(args.out)
    if args.out.is_dir() and any(args.out.iterdir()) and not args.force:
        raise cli.InputError(f"{args.out} is not empty; pass --force to replace the generated files in it")
    truth = generate(args.out, patients=args.patients, seed=args.seed, fundus_size=args.fundus_size, population=args.population)
    print(f"wrote {args.patients} patients to {args.out}")
    print(_summary(truth))
    return 0


# --- registered data source ---------------------------------------------------------


@register_dataset("synthetic")
class SyntheticOph(FairFedMedOph):
    """The synthetic twin, read by the FairFedMed-Oph loader; generated on first use.

    `data.root` empty: cached under `cache_root()` by a hash of the generator's parameters,
    so every run with the same `data.patients` / `data.generator_seed` reuses one set.
    `data.root` set: generated there when that directory holds no set yet.
    """

    name = "synthetic"
    mask_classes = MASK_CLASSES
    known_modalities = (*MODALITIES, ONH_KEY)  # the ONH cube follows the fundus's disc and cup

    @property
    def root(self) -> Path:
        if self.cfg.root:
            return Path(self.cfg.root).expanduser()
        return cached_root(**self._generator_kwargs())

    def client_specs(self) -> list[ClientSpec]:
        self.ensure_generated()
        return super().client_specs()

    def ensure_generated(self) -> Path:
        return ensure_generated(self.root, **self._generator_kwargs())

    def load_masks(self, spec: ClientSpec, split: str, sample_ids: np.ndarray, size: int | None = None) -> np.ndarray:
        """The disc / cup masks of these files (read as FairSeg's, `fairseg.read_mask`)."""
        version = json.loads((self.root / "truth.json").read_text())["params"]["version"]
        if version < 2:
            raise DataError(f"data.root {self.root} holds a synthetic set of generator version {version}, which has no disc/cup masks; "
                            f"regenerate it (python -m raysim.datasets.synthetic --out {self.root} --force) or point data.root at a new directory")
        size = size or self.img_size
        masks = [read_mask(self._file(str(name)), size) for name in sample_ids]
        return np.stack(masks) if masks else np.zeros((0, size, size), np.uint8)

    def _generator_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"seed": self.cfg.generator_seed}
        if self.cfg.patients is not None:
            kwargs["patients"] = self.cfg.patients
        return kwargs


def cached_root(**kwargs: Any) -> Path:
    """Where the set of these `generate` arguments lives under `cache_root()` (a hash of its parameters)."""
    params = generator_params(**kwargs)
    key = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]
    population = params.get("population")
    return cache_root() / (f"synthetic-oph-{population}-{key}" if population else f"synthetic-oph-{key}")


def ensure_generated(root: Path, **kwargs: Any) -> Path:
    """`root` holding the set of these `generate` arguments: generated there once, else reused."""
    if (root / "truth.json").exists():
        return root
    if root.exists() and any(root.iterdir()):
        raise DataError(f"data.root {root} holds files but no synthetic set (no truth.json); point data.root at an empty or new directory")
    logger.info("generating the synthetic set into %s", root)
    # Generate beside the target and rename, so a concurrent run never sees half a set.
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=_parent(root)))
    try:
        generate(tmp, **kwargs)
        if root.exists():
            root.rmdir()
        tmp.rename(root)
    except OSError:
        if not (root / "truth.json").exists():  # lost a race to another process: fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _parent(root: Path) -> Path:
    root.parent.mkdir(parents=True, exist_ok=True)
    return root.parent


if __name__ == "__main__":
    raise SystemExit(main())
