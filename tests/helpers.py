"""What many tests share: the tiny generated set's settings, config helpers, small builders.
Importable from any test folder (tests/ is on sys.path through its conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from raysim import algorithms, config
from raysim.algorithms import ALGORITHMS
from raysim.config import ExperimentConfig
from raysim.datasets import DATASETS
from raysim.datasets.fed_isic2019 import IMAGE_DIR
from raysim.engine.client_actor import ClientHost
from raysim.engine.driver import Driver

TINY = {"patients": 120, "seed": 3, "fundus_size": 32, "oct_shape": (4, 8, 8)}

FM = "{backend: callable, target: 'fedhelp_fm:brightness'}"

LOADER = {"image": "fundus_slo", "mask": "disc_cup", "race": {"Asian": 2, "Black": 3, "White": 7}}

RACES = ("Asian", "Black", "White")

SIZES = {"train": 60, "val": 20, "test": 30}

CHEXPERT_STUDIES = [
    (1, 1, "Male", 45, 1.0),
    (1, 2, "Male", 46, None),
    (2, 1, "Female", 60, 0.0),
    (2, 2, "Female", 61, -1.0),  # uncertain
    (3, 1, "Unknown", 70, 1.0),  # sex from the demographics table (Female)
    (4, 1, "Male", None, 0.0),  # age from the demographics table (59)
    (5, 1, "Female", 30, 1.0),
    (6, 1, "Male", 50, 1.0),  # race Other -> unknown race
    (7, 1, "Male", 80, -1.0),  # uncertain (and race unknown: counted as uncertain)
    (8, 1, "Female", 65, 0.0),
    (9, 1, "Male", 33, 1.0),  # not in the demographics table
]

CHEXPERT_RACE = {1: "White", 2: "Asian", 3: "Black or African American", 4: "White, non-Hispanic", 5: "Asian, Hispanic", 6: "Other", 7: "Race and Ethnicity Unknown", 8: "Black, non-Hispanic"}

MIMIC_STUDIES = [
    (10000001, 50000001, "PA", 1.0),
    (10000001, 50000002, "AP", 0.0),
    (10000002, 50000003, "PA", None),
    (10000003, 50000004, "AP", -1.0),  # uncertain
    (10000003, 50000005, "PA", 1.0),
    (10000004, 50000006, "PA", 1.0),  # WHITE and BLACK admissions: conflicting
    (10000005, 50000007, "PA", 0.0),  # UNKNOWN: unknown race
    (10000006, 50000008, "PA", 1.0),  # WHITE + UNABLE TO OBTAIN: white
    (10000007, 50000009, "PA", 0.0),  # no admissions: unknown race
    (10000008, 50000010, "PA", 1.0),  # not in patients: missing demographics
    (10000009, 50000011, "AP", "missing"),  # no label row
]

MIMIC_RACE = [
    (10000001, "WHITE"),
    (10000001, "WHITE"),
    (10000002, "ASIAN - CHINESE"),
    (10000003, "BLACK/AFRICAN AMERICAN"),
    (10000004, "WHITE"),
    (10000004, "BLACK/AFRICAN AMERICAN"),
    (10000005, "UNKNOWN"),
    (10000006, "WHITE"),
    (10000006, "UNABLE TO OBTAIN"),
    (10000008, "WHITE - OTHER EUROPEAN"),
    (10000009, "WHITE"),
]

MIMIC_PATIENTS = {
    10000001: ("M", 58, 2178),
    10000002: ("F", 40, 2180),
    10000003: ("F", 70, 2181),
    10000004: ("M", 50, 2180),
    10000005: ("F", 20, 2180),
    10000006: ("M", 59, 2179),
    10000007: ("F", 30, 2180),
    10000009: ("M", 30, 2180),
}

CHEXPERT_LABELS = [
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
]


MIMIC_LABELS = [
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
]


COLUMNS = ["round", "split", "client", "role", "attribute", "group", "metric", "value"]

GROUPS = ("Asian", "Black", "White")

CLIENTS = ("site1", "site2", "site3")


def load_config(source: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """`config.load` and the registered names checked, as every entry point loads a config."""
    cfg = config.load(source, overrides)
    algorithms.check(cfg)
    return cfg


def tiny_overrides(root: Path, **extra: object) -> list[str]:
    """Config overrides for a fast run on the tiny set: test_resnet at 16 px, 2 rounds."""
    values = {
        "data.name": "fairfedmed_oph",
        "data.root": str(root),
        "model.name": "test_resnet",
        "model.img_size": 16,
        "federation.rounds": 2,
        "federation.batch_size": 16,
        "eval.every": 1,
        "eval.bootstrap": 20,
        "resources.num_cpus": 0.25,
        "report.html": False,  # the report tests (tests/reports/test_report.py) turn it on
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def make_driver(root: Path, run_dir: Path, lines: list[str] | None = None, **extra: object) -> Driver:
    cfg = load_config(None, tiny_overrides(root, **extra))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config.dump(cfg))
    return Driver(cfg, run_dir, echo=(lines.append if lines is not None else lambda _: None))


def make_host(root: Path, name: str, **extra: object) -> ClientHost:
    """Two clients of the tiny set in one in-process actor body, running method `name`."""
    cfg = load_config(None, tiny_overrides(root, **{"algorithm.name": name, "resources.clients_per_actor": 2, **extra}))
    source = DATASETS.get("fairfedmed_oph")(cfg.data, img_size=16, seed=0)
    return ClientHost(cfg, source.client_specs()[:2])


def start(host: ClientHost) -> tuple[dict, dict]:
    """(server state, round-1 payload) of the host's method."""
    state = host.algorithm.init_state(host.clients["site1"].model)
    return state, dict(host.algorithm.payload(state, 1))


def write_fairseg(root: Path, family: dict = LOADER, n_train: int = 9, n_test: int = 6) -> list[str]:
    names = [f"data_{i:06d}.npz" for i in range(1, n_train + n_test + 1)]
    for i, name in enumerate(names):
        write_patient(root / name, family, RACES[i % 3], age_days=(30 if i % 2 else 70) * 365.0)
    (root / "train.txt").write_text("\n".join(names[:n_train]) + "\n")
    (root / "test.txt").write_text("\n".join(names[n_train:]) + "\n\n")
    return names


def write_isic(root: Path) -> None:
    """Fed-ISIC2019 layout: 6 centers x (4 train + 2 test) rows, 12x10 RGB JPEGs."""
    split, meta = [], []
    for center in range(6):
        for j in range(6):
            name = f"ISIC_{center * 100 + j:07d}"
            fold = "train" if j < 4 else "test"
            target = center if j % 2 == 0 else (center + 3) % 8
            split.append({"image": name, "target": target, "center": center, "fold": fold, "fold2": f"{fold}_{center}"})
            meta.append({"image": name, "age_approx": "45.0", "anatom_site_general": "torso", "sex": ("female", "male")[j % 2], "dataset": "BCN_nan"})
            write_image(root / IMAGE_DIR / f"{name}.jpg", center * 10 + j, rgb=True)
    pd.DataFrame(split).to_csv(root / "train_test_split", index=False)
    pd.DataFrame(meta).to_csv(root / "ISIC_2019_Training_Metadata_FL.csv", index=False)


def write_chest(root: Path) -> None:
    """FairFedMed-Chest race CSVs: 2 sites x (6 train + 3 test) rows, 12x10 gray JPEGs."""
    for site in ("chexpert", "mimic"):
        for split, n in (("train", 6), ("test", 3)):
            rows = []
            for i in range(n):
                name = f"CheXpert-v1.0-small/{split}/patient{i:05d}/study1/view1_frontal.jpg" if site == "chexpert" else f"p10/p10{i:06d}/s5{split}/{split}{i}.jpg"
                rows.append({"filename": name, "disease_label": i % 2, "race_label": i % 3, "gender_label": i % 2, "age_label": 0})
                write_image(root / ("files_336p" if site == "mimic" else "") / name, i, rgb=False)
            pd.DataFrame(rows).to_csv(root / f"meta_{site}_race_{split}.csv", index=False)


def write_medmnist(root: Path, **replace: np.ndarray) -> None:
    arrays = {}
    for split, n in (("train", 24), ("val", 6), ("test", 12)):
        arrays[f"{split}_images"] = np.broadcast_to((np.arange(n) % 251).astype(np.uint8)[:, None, None], (n, 8, 8)).copy()
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    arrays.update(replace)
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "pneumoniamnist.npz", **arrays)


def fake_medmnist(
    path: Path, *, classes: int, rgb: bool, sizes: dict[str, int] = SIZES, label_shape: str = "N1", seed: int = 0, compressed: bool = False, **replace: np.ndarray
) -> dict[str, np.ndarray]:
    """A MedMNIST-format npz: image i of a split is constant (i % 251, + channel in RGB), labels cycle."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in sizes.items():
        rows = np.arange(n)
        images = np.broadcast_to((rows % 251).astype(np.uint8)[:, None, None], (n, 28, 28))
        if rgb:
            images = images[..., None] + np.arange(3, dtype=np.uint8)
        labels = rng.permutation(rows % classes).astype(np.uint8)
        arrays[f"{split}_images"] = np.ascontiguousarray(images)
        arrays[f"{split}_labels"] = labels[:, None] if label_shape == "N1" else labels
    arrays.update(replace)
    path.parent.mkdir(parents=True, exist_ok=True)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return arrays


BUILT_IN = sorted(n for n in ALGORITHMS.names() if ALGORITHMS.get(n).__module__.startswith("raysim.algorithms."))


def write_raw(base: Path, race_column: str = "race") -> dict[str, Path]:
    chexpert = base / "CheXpert-v1.0-small"
    rows = []
    for patient, study, sex, age, label in CHEXPERT_STUDIES:
        for view, side in (("view1_frontal", "Frontal"), ("view2_lateral", "Lateral")):
            path = f"CheXpert-v1.0-small/train/patient{patient:05d}/study{study}/{view}.jpg"
            write_jpeg(base / path, patient * 10 + study)
            labels = dict.fromkeys(CHEXPERT_LABELS, None) | {"Pleural Effusion": label, "Support Devices": 1.0}
            rows.append({"Path": path, "Sex": sex, "Age": age, "Frontal/Lateral": side, "AP/PA": "AP" if side == "Frontal" else None} | labels)
    pd.DataFrame(rows).to_csv(chexpert / "train.csv", index=False)
    demo = pd.DataFrame(
        [
            {"PATIENT": f"patient{p:05d}", "GENDER": "Female" if p == 3 else "Male", "AGE_AT_CXR": 59 if p == 4 else 40, "PRIMARY_RACE": race, "ETHNICITY": "Non-Hispanic/Non-Latino"}
            for p, race in CHEXPERT_RACE.items()
        ]
    )
    demo_path = base / "CHEXPERT DEMO.xlsx"
    demo.to_excel(demo_path, index=False, engine="openpyxl")

    jpg, iv = base / "mimic-cxr-jpg", base / "mimiciv"
    (iv / "hosp").mkdir(parents=True)
    meta, labels, split = [], [], []
    for subject, study, frontal, label in MIMIC_STUDIES:
        for k, view in enumerate((frontal, "LATERAL")):
            dicom = f"d{study}{k}"
            meta.append(
                {
                    "dicom_id": dicom,
                    "subject_id": subject,
                    "study_id": study,
                    "PerformedProcedureStepDescription": "CHEST (PA AND LAT)",
                    "ViewPosition": view,
                    "Rows": 32,
                    "Columns": 39,
                    "StudyDate": 21800506,
                    "StudyTime": 134500.0,
                }
            )
            split.append({"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": "train"})
            write_jpeg(jpg / f"files/p{str(subject)[:2]}/p{subject}/s{study}/{dicom}.jpg", study + k)
        if label != "missing":
            labels.append({"subject_id": subject, "study_id": study} | dict.fromkeys(MIMIC_LABELS, None) | {"Pleural Effusion": label})
    pd.DataFrame(meta).to_csv(jpg / "mimic-cxr-2.0.0-metadata.csv.gz", index=False, compression="gzip")
    pd.DataFrame(labels).to_csv(jpg / "mimic-cxr-2.0.0-chexpert.csv.gz", index=False, compression="gzip")
    pd.DataFrame(split).to_csv(jpg / "mimic-cxr-2.0.0-split.csv.gz", index=False, compression="gzip")
    patients = [{"subject_id": s, "gender": g, "anchor_age": a, "anchor_year": y, "anchor_year_group": "2017 - 2019", "dod": None} for s, (g, a, y) in MIMIC_PATIENTS.items()]
    pd.DataFrame(patients).to_csv(iv / "hosp" / "patients.csv.gz", index=False, compression="gzip")
    admissions = [{"subject_id": s, "hadm_id": 20000000 + i, "admission_type": "EW EMER.", race_column: r} for i, (s, r) in enumerate(MIMIC_RACE)]
    pd.DataFrame(admissions).to_csv(iv / "hosp" / "admissions.csv.gz", index=False, compression="gzip")
    return {"chexpert": chexpert, "demo": demo_path, "jpg": jpg, "iv": iv}


def prep_args(raw: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--chexpert", str(raw["chexpert"]), "--chexpert-demo", str(raw["demo"]), "--mimic-jpg", str(raw["jpg"]), "--mimic-iv", str(raw["iv"]), "--out", str(out), *extra]


def make_run(
    path: Path,
    algorithm: dict,
    seed: int,
    val: dict[int, float],
    test: dict[int, float],
    *,
    clients: dict[str, float] | None = None,
    fairness: bool = True,
    epsilon: float | None = None,
    config: dict | None = None,
    data: dict | None = None,
) -> Path:
    """A run directory by hand: mean validation AUC per round (`val`), mean test AUC per round
    (`test`); ES-AUC = AUC - 0.1, EOD 0.2, SPD 0.1, group AUCs AUC -0.05 / -0.1 / +0.05, client
    AUCs `clients` (default all equal to the test AUC), 1 MB up per client per round."""
    rows = []
    for round_, auc in test.items():
        rows += [(round_, "val", "mean", "", "", "", "auc", val[round_]), (round_, "test", "mean", "", "", "", "auc", auc), (round_, "test", "mean", "", "", "", "acc", auc - 0.2)]
        if fairness:
            rows += [(round_, "test", "mean", "", "race", "", "es_auc", auc - 0.1), (round_, "test", "mean", "", "race", "", "eod", 0.2), (round_, "test", "mean", "", "race", "", "spd", 0.1)]
            rows += [(round_, "test", "mean", "", "race", g, "auc", auc + d) for g, d in zip(GROUPS, (-0.05, -0.1, 0.05))]
        for client in clients or CLIENTS:
            rows += [(round_, "test", client, "", "", "", "auc", (clients or {}).get(client, auc)), (round_, "train", client, "", "", "", "bytes_up", 1e6 * (1 + (client == "site1")))]
        if epsilon is not None:
            rows.append((round_, "train", "server", "", "", "", "epsilon", epsilon * round_ / max(test)))
    path.mkdir(parents=True)
    pd.DataFrame(rows, columns=COLUMNS).to_parquet(path / "metrics.parquet")
    cfg = {
        "seed": seed,
        "data": {"name": "synthetic", "root": "/data/a", "attribute": "race" if fairness else None},
        "algorithm": algorithm,
        "federation": {"rounds": max(test), "lr": 0.001},
        "resources": {"num_cpus": 1},
        "eval": {"predictions": "all", "every": 1},
        "report": {"html": False},
    }
    for key, value in (config or {}).items():
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    (path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    fingerprint = {"name": "synthetic", "root": "/cache/a", "csv_sha256": "abc", "npz_files": 10} | (data or {})
    (path / "provenance.json").write_text(json.dumps({"data": fingerprint, "attribute": "race" if fairness else None}))
    return path


def _study(tmp_path: Path, **fields: object) -> Path:
    body = {"base": {"config": "default", "overrides": ["federation.rounds=2"]}, "search_space": {"federation.lr": {"loguniform": [1e-4, 1e-2]}}, "objective": "auc - 0.5*eod"} | fields
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def write_patient(path: Path, family: dict, group: str, *, age_days: float = 70 * 365.0, mask: np.ndarray | None = None, image: np.ndarray | None = None, **extra: object) -> None:
    mask = disc_cup_codes() if mask is None else mask
    image = np.where(mask < 0, 200, 60).astype(np.uint8) if image is None else image
    arrays = {family["image"]: image, family["mask"]: mask, "race": np.array(family["race"][group]), "gender": np.array(1),
              "ethnicity": np.array(0), "language": np.array(-1), "maritalstatus": np.array(0), "age": np.array(age_days), "pid": np.array(path.stem)}
    arrays.update({k: np.asarray(v) for k, v in extra.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def write_image(path: Path, seed: int, *, rgb: bool, size: tuple[int, int] = (10, 12), fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (*size, 3) if rgb else size
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)).save(path, format=fmt)


def write_jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(32, 39), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


def disc_cup_codes(size: int = 40, disc: int = 10, cup: int = 5, centre: tuple[int, int] = (20, 20)) -> np.ndarray:
    """A square disc of `disc` rows holding a square cup of `cup` rows, in FairSeg's codes."""
    mask = np.zeros((size, size), dtype=np.int8)
    (r, c), d, k = centre, disc // 2, cup // 2
    mask[r - d : r - d + disc, c - d : c - d + disc] = -1
    mask[r - k : r - k + cup, c - k : c - k + cup] = -2
    return mask
