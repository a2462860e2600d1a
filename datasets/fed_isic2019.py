"""Fed-ISIC2019: 8-class dermoscopy diagnosis over 6 natural centers (FLamby preparation).

Datasheet
- Clients: 6 centers, ids `center0`..`center5` = the split file's `center` codes:
  0 BCN, 1 HAM_vidir_molemax, 2 HAM_vidir_modern, 3 HAM_rosendahl, 4 MSK, 5 HAM_vienna_dias.
- Size (train/test per center): 9930/2483, 3163/791, 2691/672, 1807/452, 655/164, 351/88
  (23,247 images); validation is carved from each center's train rows (`data.val_fraction`,
  stratified by label, seeded from (seed, client id)).
- Label (`target`, 8 classes): 0 MEL, 1 NV, 2 BCC, 3 AK, 4 BKL, 5 DF, 6 VASC, 7 SCC.
- Sensitive attributes (from `ISIC_2019_Training_Metadata_FL.csv`): `sex` female=0, male=1;
  `age` from `age_approx` binned <30 = 0, 30-59 = 1, 60+ = 2. Blank or `unknown` = -1. Rows
  whose target attribute is -1 are dropped unless `data.keep_unknown` (set it for numbers
  comparable to FLamby's, which use every row).
- Layout under `data.root` (as FLamby's scripts leave it): `train_test_split` (CSV without
  extension: `image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK,target,center,fold,fold2`; fold
  train/test), `ISIC_2019_Training_Metadata_FL.csv` (`image,age_approx,anatom_site_general,
  sex,dataset`) and `ISIC_2019_Training_Input_preprocessed/<image>.jpg` (RGB, shorter side
  224, colour constancy applied). An `image` that is not a plain name under that folder
  (absolute, or with a `..` component) is an error naming the file and rows, as is a listed
  image that is missing; an unreadable image (or one over PIL's decompression-bomb limit)
  fails the load naming the file.
- Pixels: the central square (side = the shorter side) is cropped, then resized to
  `model.img_size` (FLamby center-crops 200 px at test time; a square crop keeps the aspect).
- Licence: ISIC 2019 images and metadata are CC BY-NC 4.0. Users download the challenge data
  and run FLamby's `download_isic.py` and `resize_images.py` themselves (copying FLamby's
  `train_test_split` into the root); raysim reads a local copy and never downloads.
- Metrics: balanced accuracy (FLamby's metric: pooled 0.708, FedAvg 0.539 mean per client);
  AUC is macro one-vs-rest over the classes present (see raysim.metrics).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raysim.datasets.base import ClientSpec, DataError, DataSource, SampleTable, Shard, check_unique, listed_names, path_under, read_csv, register_dataset
from raysim.datasets.imaging import read_image, resize_chw

CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
CENTERS = ("BCN", "HAM_vidir_molemax", "HAM_vidir_modern", "HAM_rosendahl", "MSK", "HAM_vienna_dias")
SPLIT_FILE = "train_test_split"
METADATA_FILE = "ISIC_2019_Training_Metadata_FL.csv"
IMAGE_DIR = "ISIC_2019_Training_Input_preprocessed"
SPLIT_COLUMNS = ("image", "target", "center", "fold")
METADATA_COLUMNS = ("image", "age_approx", "sex")
FOLDS = ("train", "test")
SEX_CODES = {"female": 0, "male": 1}
UNKNOWN_TEXT = ("", "unknown")
AGE_EDGES = (30, 60)  # age < 30 -> 0, 30 <= age < 60 -> 1, age >= 60 -> 2
GROUP_NAMES = {"sex": {0: "Female", 1: "Male"}, "age": {0: "<30", 1: "30-59", 2: "60+"}}


@register_dataset("fed_isic2019")
class FedISIC2019(DataSource):
    name = "fed_isic2019"
    num_classes = len(CLASSES)
    channels = 3
    label_name = "diagnosis"
    default_attribute = "sex"
    root_hint = f"the directory holding {SPLIT_FILE}, {METADATA_FILE} and {IMAGE_DIR}/"

    @property
    def group_names(self) -> Mapping[str, Mapping[int, str]]:
        return GROUP_NAMES

    def client_specs(self) -> list[ClientSpec]:
        self._check_layout()
        rows = self._read_split()
        codes = self._read_metadata(rows["image"].to_numpy())
        self._check_images_exist(rows["image"])
        specs = []
        for center in range(len(CENTERS)):
            client_id = f"center{center}"
            train, test = (self._table(rows, codes, center, fold) for fold in FOLDS)
            specs.append(self.client_spec(client_id, train, test, center=CENTERS[center]))
        return specs

    def load(self, spec: ClientSpec, split: str) -> Shard:
        table = spec.splits[split]
        images = [resize_chw(center_square(read_image(self._image_path(i), grayscale=False)), self.img_size, self.channels) for i in table.sample_ids]
        if not images:
            return Shard(np.zeros((0, self.channels, self.img_size, self.img_size), np.uint8), table)
        return Shard(np.stack(images), table)

    def fingerprint(self) -> dict[str, Any]:
        digest = hashlib.sha256()
        for name in (SPLIT_FILE, METADATA_FILE):
            digest.update(name.encode())
            digest.update((self.root / name).read_bytes())
        return {"name": self.name, "root": str(self.root), "csv_sha256": digest.hexdigest(), "jpg_files": sum(1 for _ in (self.root / IMAGE_DIR).glob("*.jpg"))}

    # --- metadata ---------------------------------------------------------------------------

    def _check_layout(self) -> None:
        if self.attribute not in GROUP_NAMES:
            raise DataError(f"data.attribute={self.attribute!r}: Fed-ISIC2019 has {', '.join(GROUP_NAMES)} only")
        if self.cfg.partition is not None:
            raise DataError(f"data.partition={self.cfg.partition!r}: Fed-ISIC2019 uses its 6 natural centers; leave data.partition null")
        for path in (self.root / SPLIT_FILE, self.root / METADATA_FILE):
            if not path.is_file():
                raise DataError(f"{path}: missing (FLamby's Fed-ISIC2019 preparation writes it; {METADATA_FILE} gives the sex and age attributes)")
        if not (self.root / IMAGE_DIR).is_dir():
            raise DataError(f"{self.root / IMAGE_DIR}: missing image directory (run FLamby's resize_images.py)")

    def _read_split(self) -> pd.DataFrame:
        path = self.root / SPLIT_FILE
        frame = read_csv(path, SPLIT_COLUMNS)
        frame["image"] = listed_names(path, "image", frame["image"].tolist(), where=f"data.root/{IMAGE_DIR}")
        check_unique(path, frame["image"].tolist(), "images")
        frame["target"] = _int_column(path, frame, "target", len(CLASSES), "/".join(CLASSES))
        frame["center"] = _int_column(path, frame, "center", len(CENTERS), "/".join(CENTERS))
        frame["fold"] = frame["fold"].str.strip().str.lower()
        fold2 = frame["fold2"].str.strip().to_numpy() if "fold2" in frame.columns else None  # optional: checked when present
        for row, (fold, center) in enumerate(zip(frame["fold"], frame["center"])):
            if fold not in FOLDS:
                raise DataError(f"{path}: row {row}: fold={fold!r} is not one of {', '.join(FOLDS)}")
            if fold2 is not None and fold2[row] != f"{fold}_{center}":
                raise DataError(f"{path}: row {row}: fold2={fold2[row]!r} disagrees with fold={fold!r}, center={center} (expected '{fold}_{center}')")
        return frame

    def _read_metadata(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Group codes per attribute, aligned with `images`."""
        path = self.root / METADATA_FILE
        frame = read_csv(path, METADATA_COLUMNS)
        frame["image"] = listed_names(path, "image", frame["image"].tolist(), where=f"data.root/{IMAGE_DIR}")
        check_unique(path, frame["image"].tolist(), "images")
        by_image = pd.DataFrame(
            {
                "sex": [sex_code(path, row, text) for row, text in enumerate(frame["sex"])],
                "age": [age_code(path, row, text) for row, text in enumerate(frame["age_approx"])],
            },
            index=frame["image"],
        )
        absent = [i for i in images if i not in by_image.index]
        if absent:
            raise DataError(f"{path}: {len(absent)} images of {SPLIT_FILE} have no metadata row (first: {', '.join(absent[:3])})")
        aligned = by_image.loc[images]
        return {attr: aligned[attr].to_numpy(dtype=np.int64) for attr in GROUP_NAMES}

    def _check_images_exist(self, images: pd.Series) -> None:
        missing = [i for i in images if not self._image_path(i).is_file()]
        if missing:
            raise DataError(f"{self.root / SPLIT_FILE}: {len(missing)} listed images are missing from {self.root / IMAGE_DIR} (first: {', '.join(missing[:3])})")

    def _table(self, rows: pd.DataFrame, codes: Mapping[str, np.ndarray], center: int, fold: str) -> SampleTable:
        index = np.flatnonzero((rows["center"].to_numpy() == center) & (rows["fold"].to_numpy() == fold))
        if not self.cfg.keep_unknown:
            index = index[codes[self.attribute][index] != -1]
        return SampleTable(rows["image"].to_numpy()[index].astype(str), rows["target"].to_numpy()[index], {a: c[index] for a, c in codes.items()})

    def _image_path(self, image: str) -> Path:
        return path_under(self.root / IMAGE_DIR, f"{image}.jpg", where=f"data.root/{IMAGE_DIR}")


def sex_code(path: Path, row: int, text: str) -> int:
    value = text.strip().lower()
    if value in UNKNOWN_TEXT:
        return -1
    if value not in SEX_CODES:
        raise DataError(f"{path}: row {row}: sex={text!r} is not one of female, male, blank or unknown")
    return SEX_CODES[value]


def age_code(path: Path, row: int, text: str) -> int:
    """`age_approx` (e.g. '55.0') -> 0 (<30), 1 (30-59), 2 (60+); blank/unknown -> -1."""
    if text.strip().lower() in UNKNOWN_TEXT:
        return -1
    try:
        age = float(text)
    except ValueError:
        age = math.nan
    if not 0 <= age <= 130:
        raise DataError(f"{path}: row {row}: age_approx={text!r} is neither an age in years (0-130) nor blank/unknown")
    return int(np.searchsorted(AGE_EDGES, age, side="right"))


def center_square(image: np.ndarray) -> np.ndarray:
    """The central square of an (H, W, C) image, side = min(H, W)."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return image[top : top + side, left : left + side]


def _int_column(path: Path, frame: pd.DataFrame, column: str, n_codes: int, meaning: str) -> np.ndarray:
    """Integer codes 0..n_codes-1 ('3' or '3.0'); a DataError names the first bad row."""
    values = []
    for row, text in enumerate(frame[column]):
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if not (number.is_integer() and 0 <= number < n_codes):
            raise DataError(f"{path}: row {row}: {column}={text!r} is not an integer code 0..{n_codes - 1} ({meaning})")
        values.append(int(number))
    return np.asarray(values, dtype=np.int64)
