"""Build the FairFedMed-Chest CSVs from the raw CheXpert and MIMIC-CXR-JPG (+ MIMIC-IV) releases.

    python -m raysim.datasets.prepare_chest --chexpert DIR --chexpert-demo XLSX \\
        --mimic-jpg DIR --mimic-iv DIR --out DIR [--uncertain exclude|zero|one] \\
        [--test-fraction 0.2] [--seed 0] [--link]

Inputs (specs/datasets.md): `--chexpert` is the release folder holding `train.csv`
(e.g. `CheXpert-v1.0-small/`), `--chexpert-demo` the `CHEXPERT DEMO.xlsx` race table (needs
openpyxl: `pip install raysim[xlsx]`), `--mimic-jpg` the folder holding
`mimic-cxr-2.0.0-{metadata,chexpert,split}.csv.gz` and `files/`, `--mimic-iv` the MIMIC-IV
folder holding `hosp/patients.csv.gz` and `hosp/admissions.csv.gz`.

Rules: frontal views only (CheXpert `Frontal/Lateral` == Frontal, MIMIC `ViewPosition` PA/AP);
Pleural Effusion 1 positive, 0 or blank negative, -1 (uncertain) excluded by default or mapped
by `--uncertain`; race White=0, Asian=1, Black=2 by substring of the release's race text (a
text naming none or several of these is unknown; a MIMIC subject whose admissions name
different races is dropped as conflicting); gender Male=0, Female=1; age 0-60=0, 60+=1 (60 is
60+). CheXpert age and sex come from train.csv (the age at that study), falling back to the
demographics table; MIMIC age at study = anchor_age + StudyDate year - anchor_year. Only
images with all three attributes known are kept, so the race, gender and age CSVs of a site
hold the same rows and the same patient-level train/test split (no patient in both).

Image paths: CheXpert `filename` is the release's `Path` (it starts with the release folder),
so `data.root` must be the parent of that folder; MIMIC `filename` is `files/p../p../s../x.jpg`
relative to `<data.root>/mimic/`. `--link` creates both as symlinks in `--out`.
"""

from __future__ import annotations

import argparse
import importlib.util
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from raysim import cli
from raysim.datasets.base import DataError

ATTRIBUTES = ("race", "gender", "age")
RACE_KEYS = (("white", 0), ("asian", 1), ("black", 2))
GENDER_CODES = {"male": 0, "m": 0, "female": 1, "f": 1}
AGE_CUT = 60
REASONS = ("lateral", "uncertain label", "no label row", "missing demographics", "conflicting race", "unknown race")
UNCERTAIN = {"exclude": None, "zero": 0, "one": 1}
LABEL_COLUMN = "Pleural Effusion"
MIMIC_CSV = "mimic-cxr-2.0.0-{}.csv.gz"
OUT_COLUMNS = ("filename", "patient_id", "age", "disease_label", "race_label", "gender_label", "age_label")


class PrepError(DataError):
    """An input file is missing, unreadable or lacks a column; the message says which."""


def require_module(module: str, extra: str, purpose: str) -> None:
    """A clear error when an optional dependency is not installed."""
    if importlib.util.find_spec(module) is None:
        raise PrepError(f"{purpose} needs {module}, which is not installed: pip install raysim[{extra}]")


def race_code(text: object) -> int:
    """White=0, Asian=1, Black=2 when the text names exactly one of them, else -1."""
    value = str(text).lower() if isinstance(text, str) else ""
    hits = {code for key, code in RACE_KEYS if key in value}
    return hits.pop() if len(hits) == 1 else -1


def age_bin(age: pd.Series) -> pd.Series:
    return (age >= AGE_CUT).astype(np.int64)


def read_csv(path: Path, columns: Sequence[str], **kw: object) -> pd.DataFrame:
    if not path.is_file():
        raise PrepError(f"{path}: file not found")
    try:
        frame = pd.read_csv(path, **kw)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, EOFError) as err:
        raise PrepError(f"{path}: not a readable CSV ({err})") from err
    return check_columns(path, frame, columns)


def check_columns(path: Path, frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise PrepError(f"{path}: missing column(s) {', '.join(map(repr, missing))} (columns: {', '.join(map(str, frame.columns))})")
    return frame


def read_xlsx(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    if path.suffix.lower() not in (".xlsx", ".xlsm"):
        raise PrepError(f"{path}: expected the CheXpert demographics workbook (.xlsx), got a {path.suffix or 'suffix-less'} file")
    require_module("openpyxl", "xlsx", f"reading {path.name}")
    if not path.is_file():
        raise PrepError(f"{path}: file not found")
    try:
        frame = pd.read_excel(path, engine="openpyxl")
    except (ValueError, OSError, KeyError, zipfile.BadZipFile) as err:  # an .xlsx is a zip archive
        raise PrepError(f"{path}: not a readable .xlsx workbook ({err})") from err
    return check_columns(path, frame, columns)


def label_codes(values: pd.Series, source: str, uncertain: str) -> pd.Series:
    """Pleural Effusion 1/0/blank/-1 -> 1/0/0/(-1 dropped later, or mapped); other values are an error."""
    numeric = pd.to_numeric(values, errors="coerce")
    bad = values[numeric.isna() & values.notna() & (values.astype(str).str.strip() != "")]
    bad = pd.concat([bad, values[numeric.notna() & ~numeric.isin([1, 0, -1])]])
    if len(bad):
        raise PrepError(f"{source}: {LABEL_COLUMN} has values other than 1, 0, -1 or blank (first: {bad.iloc[0]!r} at row {bad.index[0]})")
    codes = numeric.fillna(0).astype(np.int64)
    mapped = UNCERTAIN[uncertain]
    return codes if mapped is None else codes.where(codes != -1, mapped)


def apply_rules(frame: pd.DataFrame, masks: dict[str, pd.Series]) -> tuple[pd.DataFrame, dict[str, int]]:
    """Drop rows by the first failing rule, in REASONS order; counts per reason."""
    keep = pd.Series(True, index=frame.index)
    dropped = {}
    for reason in REASONS:
        bad = masks.get(reason, pd.Series(False, index=frame.index)) & keep
        dropped[reason] = int(bad.sum())
        keep &= ~bad
    return frame[keep].copy(), dropped


# --- CheXpert ---------------------------------------------------------------------------------


def build_chexpert(release: Path, demo_path: Path, uncertain: str) -> tuple[pd.DataFrame, dict[str, int]]:
    csv_path = release / "train.csv"
    frame = read_csv(csv_path, ("Path", "Sex", "Age", "Frontal/Lateral", LABEL_COLUMN), dtype={"Path": str, "Sex": str, "Frontal/Lateral": str})
    demo = read_xlsx(demo_path, ("PATIENT", "GENDER", "AGE_AT_CXR", "PRIMARY_RACE"))
    demo = demo.assign(PATIENT=demo["PATIENT"].astype(str).str.strip()).drop_duplicates("PATIENT").set_index("PATIENT")
    parts = frame["Path"].str.strip().str.split("/")
    if (parts.str.len() < 4).any():
        row = int(np.flatnonzero(parts.str.len() < 4)[0])
        raise PrepError(f"{csv_path}: row {row}: Path {frame['Path'].iloc[row]!r} is not <release>/<split>/<patient>/<study>/<view>.jpg")
    out = pd.DataFrame({"filename": frame["Path"].str.strip(), "patient_id": parts.str[2]})
    out["disease_label"] = label_codes(frame[LABEL_COLUMN], str(csv_path), uncertain)
    in_demo = out["patient_id"].isin(demo.index)
    patient = demo.reindex(out["patient_id"])
    sex = frame["Sex"].str.strip().str.lower().map(GENDER_CODES)
    out["gender_label"] = sex.fillna(pd.Series(patient["GENDER"].astype(str).str.strip().str.lower().map(GENDER_CODES).to_numpy(), index=out.index))
    age = pd.to_numeric(frame["Age"], errors="coerce")
    out["age"] = age.fillna(pd.Series(pd.to_numeric(patient["AGE_AT_CXR"], errors="coerce").to_numpy(), index=out.index))
    out["race_label"] = np.asarray([race_code(t) for t in patient["PRIMARY_RACE"]], dtype=np.int64)
    masks = {
        "lateral": frame["Frontal/Lateral"].str.strip().str.lower() != "frontal",
        "uncertain label": out["disease_label"] == -1,
        "missing demographics": ~in_demo | out["gender_label"].isna() | out["age"].isna() | (out["age"] < 0),
        "unknown race": out["race_label"] == -1,
    }
    return apply_rules(out, masks)


# --- MIMIC-CXR-JPG + MIMIC-IV -----------------------------------------------------------------


def mimic_race(admissions: pd.DataFrame, path: Path) -> tuple[pd.Series, set[int]]:
    """subject_id -> race code from the admissions (`race` in v2.x, `ethnicity` in v1.0); conflicting subjects."""
    column = "race" if "race" in admissions.columns else "ethnicity" if "ethnicity" in admissions.columns else None
    if column is None:
        raise PrepError(f"{path}: needs a 'race' (MIMIC-IV v2.x) or 'ethnicity' (v1.0) column (columns: {', '.join(admissions.columns)})")
    texts = admissions[column]
    codes = pd.DataFrame({"subject_id": admissions["subject_id"], "code": texts.map({t: race_code(t) for t in texts.dropna().unique()}).fillna(-1)})
    known = codes[codes["code"] != -1].drop_duplicates()
    per_subject = known.groupby("subject_id")["code"]
    conflicting = set(per_subject.nunique().loc[lambda n: n > 1].index)
    return per_subject.first().drop(list(conflicting)), conflicting


def build_mimic(jpg: Path, iv: Path, uncertain: str) -> tuple[pd.DataFrame, dict[str, int]]:
    meta = read_csv(jpg / MIMIC_CSV.format("metadata"), ("dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate"), dtype={"dicom_id": str, "ViewPosition": str})
    labels = read_csv(jpg / MIMIC_CSV.format("chexpert"), ("subject_id", "study_id", LABEL_COLUMN))
    split = read_csv(jpg / MIMIC_CSV.format("split"), ("dicom_id", "study_id", "subject_id", "split"), dtype={"dicom_id": str})
    patients = read_csv(iv / "hosp" / "patients.csv.gz", ("subject_id", "gender", "anchor_age", "anchor_year"))
    admissions_path = iv / "hosp" / "admissions.csv.gz"
    admissions = read_csv(admissions_path, ("subject_id",))
    unlisted = sorted(set(meta["dicom_id"]) - set(split["dicom_id"]))
    if unlisted:
        raise PrepError(f"{jpg / MIMIC_CSV.format('split')}: {len(unlisted)} images of the metadata file are not listed (first: {', '.join(unlisted[:3])})")

    labels["code"] = label_codes(labels[LABEL_COLUMN], str(jpg / MIMIC_CSV.format("chexpert")), uncertain)
    labels = labels.drop_duplicates(["subject_id", "study_id"])
    frame = meta.merge(labels[["subject_id", "study_id", "code"]], on=["subject_id", "study_id"], how="left", indicator=True)
    subject = frame["subject_id"].astype(np.int64)
    out = pd.DataFrame({"filename": [f"files/p{str(s)[:2]}/p{s}/s{t}/{d}.jpg" for s, t, d in zip(subject, frame["study_id"], frame["dicom_id"])], "patient_id": subject})
    out["disease_label"] = frame["code"].fillna(0).astype(np.int64)

    people = patients.drop_duplicates("subject_id").set_index("subject_id").reindex(subject)
    year = pd.to_numeric(frame["StudyDate"].astype(str).str[:4], errors="coerce").to_numpy()
    out["age"] = pd.to_numeric(people["anchor_age"], errors="coerce").to_numpy() + year - pd.to_numeric(people["anchor_year"], errors="coerce").to_numpy()
    out["gender_label"] = people["gender"].astype(str).str.strip().str.lower().map(GENDER_CODES).to_numpy()
    race, conflicting = mimic_race(admissions, admissions_path)
    out["race_label"] = race.reindex(subject).fillna(-1).astype(np.int64).to_numpy()
    masks = {
        "lateral": ~frame["ViewPosition"].fillna("").str.strip().str.upper().isin(["PA", "AP"]),
        "no label row": frame["_merge"] == "left_only",
        "uncertain label": out["disease_label"] == -1,
        "missing demographics": out["gender_label"].isna() | out["age"].isna() | (out["age"] < 0),
        "conflicting race": out["patient_id"].isin(conflicting),
        "unknown race": out["race_label"] == -1,
    }
    return apply_rules(out, masks)


# --- split and write ---------------------------------------------------------------------------


def split_by_patient(frame: pd.DataFrame, test_fraction: float, seed: int, site: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seeded patient-level split: every image of a patient lands on the same side."""
    patients = np.sort(frame["patient_id"].astype(str).unique())
    if len(patients) < 2:
        raise PrepError(f"{site}: {len(patients)} patient(s) left after the drop rules; a train/test split needs at least 2")
    rng = np.random.default_rng([seed, zlib.crc32(site.encode())])
    n_test = min(max(1, int(round(test_fraction * len(patients)))), len(patients) - 1)
    test = set(rng.permutation(patients)[:n_test])
    is_test = frame["patient_id"].astype(str).isin(test)
    return frame[~is_test], frame[is_test]


def write_site(out: Path, site: str, frame: pd.DataFrame, test_fraction: float, seed: int) -> tuple[int, int, int]:
    frame = frame.astype({"disease_label": np.int64, "race_label": np.int64, "gender_label": np.int64})
    frame["age_label"] = age_bin(frame["age"])
    train, test = split_by_patient(frame, test_fraction, seed, site)
    for name, part in (("train", train), ("test", test)):
        for attr in ATTRIBUTES:
            part.loc[:, list(OUT_COLUMNS)].to_csv(out / f"meta_{site}_{attr}_{name}.csv", index=False)
    return frame["patient_id"].nunique(), len(train), len(test)


def report(site: str, kept: pd.DataFrame, dropped: dict[str, int], sizes: tuple[int, int, int]) -> str:
    patients, n_train, n_test = sizes
    reasons = ", ".join(f"{reason} {n}" for reason, n in dropped.items())
    return f"{site}: kept {len(kept)} rows ({patients} patients; train {n_train}, test {n_test}); dropped {sum(dropped.values())}: {reasons}"


def link(target: Path, link_path: Path) -> str:
    if link_path.exists() or link_path.is_symlink():
        return f"{link_path} exists, left as is"
    link_path.symlink_to(target.resolve(), target_is_directory=True)
    return f"linked {link_path} -> {target.resolve()}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="python -m raysim.datasets.prepare_chest", description=__doc__.splitlines()[0])
    parser.add_argument("--chexpert", type=Path, required=True, help="CheXpert release folder holding train.csv (e.g. CheXpert-v1.0-small)")
    parser.add_argument("--chexpert-demo", type=Path, required=True, help="CHEXPERT DEMO.xlsx (needs openpyxl: pip install raysim[xlsx])")
    parser.add_argument("--mimic-jpg", type=Path, required=True, help="MIMIC-CXR-JPG folder holding mimic-cxr-2.0.0-*.csv.gz and files/")
    parser.add_argument("--mimic-iv", type=Path, required=True, help="MIMIC-IV folder holding hosp/patients.csv.gz and hosp/admissions.csv.gz")
    parser.add_argument("--out", type=Path, required=True, help="where the 12 meta_*.csv files are written (the data.root)")
    parser.add_argument("--uncertain", choices=tuple(UNCERTAIN), default="exclude", help="uncertain (-1) Pleural Effusion labels: drop, or map to 0 / 1")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of each site's patients in the test split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient-level split")
    parser.add_argument("--link", action="store_true", help="symlink the CheXpert release and the MIMIC-CXR-JPG folder into --out (as <release name> and mimic)")
    args = parser.parse_args(argv)
    if not 0 < args.test_fraction < 1:
        parser.error(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.guard(lambda: _main(args), (PrepError,), outs=[args.out])


def _main(args: argparse.Namespace) -> int:
    cli.check_out_dir(args.out)  # before the (slow) tables are built
    sites = {"chexpert": build_chexpert(args.chexpert, args.chexpert_demo, args.uncertain), "mimic": build_mimic(args.mimic_jpg, args.mimic_iv, args.uncertain)}
    args.out.mkdir(parents=True, exist_ok=True)
    for site, (kept, dropped) in sites.items():
        print(report(site, kept, dropped, write_site(args.out, site, kept, args.test_fraction, args.seed)))
    print(f"wrote {len(sites) * len(ATTRIBUTES) * 2} CSVs to {args.out}")
    release = args.chexpert.resolve()
    if args.link:
        print(link(release, args.out / release.name))
        print(link(args.mimic_jpg, args.out / "mimic"))
    else:
        print(
            f"images: CheXpert paths start with {release.name}/, so data.root must hold it (or use --out {release.parent}, or --link); MIMIC paths are relative to <data.root>/mimic/ (link {args.mimic_jpg} there, or --link)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
