"""FairFedMed-Chest: pleural effusion from frontal chest X-rays, 2 sites (CheXpert, MIMIC-CXR).

Datasheet
- Sites / clients: 2, `chexpert` (site 1, Stanford CheXpert) and `mimic` (site 2, MIMIC-CXR-JPG
  with MIMIC-IV demographics). Files `meta_{chexpert|mimic}_{attr}_{train|test}.csv`, attr in
  race, gender, age (chosen by `data.attribute`, default race).
- Label: `disease_label`, Pleural Effusion 0/1. Sensitive attributes, integer codes (-1 or blank
  = unknown): `race_label` White=0, Asian=1, Black=2; `gender_label` Male=0, Female=1 (the
  FairFedMed code lists gender groups in the order Male, Female); `age_label` 0-60=0, 60+=1.
- Group shares (CheXpert/MIMIC): Asian 15/19 %, Black 7/4 %, White 78/77 %; age 0-60 61/65 %;
  male 59/53 %.
- Images: CheXpert `filename` is relative to the root (e.g. `CheXpert-v1.0-small/train/...`);
  MIMIC `filename` is relative to `<root>/files_336p/` (the reference code) or `<root>/mimic/`
  (its README): the first that holds the file wins. Build the CSVs from the raw releases with
  `python -m raysim.datasets.prepare_chest`.
- Channels: images are read as grayscale and kept at 1 channel (the reference repeats them to
  3); the engine builds its timm model with in_chans=1, and timm folds a pretrained RGB stem
  into one channel, so pretrained weights still apply.
- Licence: CheXpert (Stanford research use agreement) and MIMIC-CXR-JPG / MIMIC-IV (PhysioNet
  credentialed access, data use agreement); users download them themselves. raysim reads a
  local copy and never downloads.
Rules: a sample whose target attribute is unknown is dropped unless `data.keep_unknown`; a code
that is neither known nor unknown is an error naming the file, row and column. A `filename`
that is absolute or has a `..` component is an error naming the CSV and rows (it would read
a file outside data.root); symbolic links inside data.root, such as `--link` makes, are
followed. An unreadable image, or one over PIL's decompression-bomb limit, fails the load
naming the file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raysim.datasets.base import ClientSpec, DataError, DataSource, SampleTable, Shard, check_unique, listed_names, path_under, read_csv, register_dataset
from raysim.datasets.imaging import read_image, resize_chw

UNKNOWN = -1
SITES = ("chexpert", "mimic")  # site 1, site 2 (client ids, sorted)
MIMIC_DIRS = ("files_336p", "mimic")  # where MIMIC filenames may live, first match wins
LABEL = "disease_label"
GROUP_NAMES: dict[str, dict[int, str]] = {
    "race": {0: "White", 1: "Asian", 2: "Black"},
    "gender": {0: "Male", 1: "Female"},
    "age": {0: "0-60", 1: "60+"},
}
ATTRIBUTE_COLUMNS = {attr: f"{attr}_label" for attr in GROUP_NAMES}
REQUIRED_COLUMNS = ("filename", LABEL, *ATTRIBUTE_COLUMNS.values())
_UNKNOWN_TEXT = ("", "-1", "-1.0", "nan", "unknown")


def parse_code(text: str, n_codes: int) -> int | None:
    """Integer code of a CSV cell (`1`, `1.0`); UNKNOWN for -1/blank; None when invalid."""
    value = text.strip().lower()
    if value in _UNKNOWN_TEXT:
        return UNKNOWN
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if number.is_integer() and 0 <= number < n_codes else None


@register_dataset("fairfedmed_chest")
class FairFedMedChest(DataSource):
    name = "fairfedmed_chest"
    num_classes = 2
    class_names = ("NOT Pleural Effusion", "Pleural Effusion")  # FairFedMed's FedChexMimic, by label code
    channels = 1
    label_name = LABEL
    default_attribute = "race"
    root_hint = "the directory holding meta_{chexpert,mimic}_*.csv"

    @property
    def group_names(self) -> Mapping[str, Mapping[int, str]]:
        return GROUP_NAMES

    def client_specs(self) -> list[ClientSpec]:
        self._check_layout()
        specs = []
        for client_id in SITES:
            train = self._read_split(client_id, "train")
            test = self._read_split(client_id, "test")
            overlap = sorted(set(train.sample_ids) & set(test.sample_ids))
            if overlap:
                raise DataError(f"{client_id}: {len(overlap)} images are in both train and test (first: {', '.join(overlap[:3])})")
            specs.append(self.client_spec(client_id, train, test))
        return specs

    def load(self, spec: ClientSpec, split: str) -> Shard:
        table = spec.splits[split]
        images = [resize_chw(read_image(self.image_path(spec.id, f), grayscale=True), self.img_size, self.channels) for f in table.sample_ids]
        if not images:
            return Shard(np.zeros((0, self.channels, self.img_size, self.img_size), np.uint8), table)
        return Shard(np.stack(images), table)

    def fingerprint(self) -> dict[str, Any]:
        digest = hashlib.sha256()
        for path in sorted(self.root.glob(f"meta_*_{self.attribute}_*.csv")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
        return {"name": self.name, "root": str(self.root), "attribute": self.attribute, "csv_sha256": digest.hexdigest()}

    # --- paths --------------------------------------------------------------------------------

    def candidates(self, client_id: str, filename: str) -> list[Path]:
        """Where an image may be, in the order tried."""
        filename = str(filename)
        if client_id == "mimic":
            return [path_under(self.root / folder, filename, where=f"data.root/{folder}") for folder in MIMIC_DIRS]
        return [path_under(self.root, filename)]

    def image_path(self, client_id: str, filename: str) -> Path:
        tried = self.candidates(client_id, filename)
        for path in tried:
            if path.is_file():
                return path
        raise DataError(f"{client_id}: image {str(filename)!r} not found (tried {', '.join(map(str, tried))})")

    # --- metadata ---------------------------------------------------------------------------

    def _check_layout(self) -> None:
        attr = self.attribute
        if attr not in GROUP_NAMES:
            raise DataError(f"data.attribute={attr!r}: FairFedMed-Chest has CSVs for {', '.join(GROUP_NAMES)} only")
        missing = [self._csv(c, s).name for c in SITES for s in ("train", "test") if not self._csv(c, s).exists()]
        if missing:
            raise DataError(f"{self.root}: missing CSVs for attribute {attr}: {', '.join(missing)} (build them with python -m raysim.datasets.prepare_chest)")

    def _csv(self, client_id: str, split: str) -> Path:
        return self.root / f"meta_{client_id}_{self.attribute}_{split}.csv"

    def _read_split(self, client_id: str, split: str) -> SampleTable:
        path = self._csv(client_id, split)
        frame = read_csv(path, required=REQUIRED_COLUMNS)
        filenames = self._check_filenames(path, client_id, frame["filename"].str.strip().to_numpy().astype(str))
        labels = np.asarray([self._label(path, row, text) for row, text in enumerate(frame[LABEL])], dtype=np.int64)
        codes = {attr: self._codes(path, frame, attr) for attr in GROUP_NAMES}
        table = SampleTable(filenames, labels, codes)
        if not self.cfg.keep_unknown:
            table = table.take(np.flatnonzero(codes[self.attribute] != UNKNOWN))
        return table

    def _check_filenames(self, csv: Path, client_id: str, listed: np.ndarray) -> np.ndarray:
        """The CSV's file names, normalised (`listed_names`) and checked: unique, present."""
        empty = np.flatnonzero(listed == "")
        if len(empty):
            raise DataError(f"{csv}: row {empty[0]}: empty filename")
        filenames = np.asarray(listed_names(csv, "filename", list(listed), where="data.root/{" + ",".join(MIMIC_DIRS) + "}" if client_id == "mimic" else "data.root"), dtype=str)
        check_unique(csv, list(filenames))
        missing = [f for f in filenames if not any(p.is_file() for p in self.candidates(client_id, f))]
        if missing:
            where = " or ".join(str(self.root / d) for d in MIMIC_DIRS) if client_id == "mimic" else str(self.root)
            raise DataError(f"{csv}: {len(missing)} of {len(filenames)} listed images are missing from {where} (first: {', '.join(missing[:3])})")
        return filenames

    @staticmethod
    def _label(csv: Path, row: int, text: str) -> int:
        code = parse_code(text, 2)
        if code is None or code == UNKNOWN:
            raise DataError(f"{csv}: row {row}: {LABEL}={text!r} is not 0 or 1 (Pleural Effusion negative/positive)")
        return code

    @staticmethod
    def _codes(csv: Path, frame: pd.DataFrame, attr: str) -> np.ndarray:
        column, names = ATTRIBUTE_COLUMNS[attr], GROUP_NAMES[attr]
        codes = []
        for row, text in enumerate(frame[column]):
            code = parse_code(text, len(names))
            if code is None:
                expected = ", ".join(f"{c}={n}" for c, n in names.items())
                raise DataError(f"{csv}: row {row}: {column}={text!r} is neither a code ({expected}) nor unknown (-1 or blank)")
            codes.append(code)
        return np.asarray(codes, dtype=np.int64)
