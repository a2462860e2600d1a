"""FairFedMed-Oph: glaucoma from SLO fundus images, 3 sites, per-attribute site splits.

Datasheet
- Sites / clients: 3 (`site1`..`site3`); the split into sites is made per attribute
  (`meta_site{k}_{attr}_{train,test}.csv`, attr in race, language, ethnicity, gender).
  With `data.partition` set (dirichlet, quantity or iid; null keeps the 3 sites) the sites
  are pooled instead: their train rows (in site order) are re-split by `partition.py` into
  `data.num_clients` clients `client1`..`clientN` (quantity: one per `data.ratios` share),
  seeded by `(seed, "partition")`, and their test rows IID over the same clients (as for
  MedMNIST); validation is carved per client as for a site (one random train row when the
  stratified carve gives none). Every client needs 2 train rows and 1 test row, else a
  DataError names the client and what to change.
- Size (real release): 15,165 patients, ~5,055 per site, ~80/20 train/test.
- Label: `glaucoma` (yes/no). Sensitive attributes: race, gender, ethnicity, language,
  marital status (codes and names in `oph_schema.py`; -1 / "unknown" = unknown).
- Images: `all/<filename>.npz` with `slo_fundus` (2D uint8) and `oct_bscans` (3D uint8).
  `data.modality` names one of them, or a fundus image and a volume joined by `+`
  (`slo_fundus+oct_bscans`): both are read per file and stacked on the channel axis, the fundus
  first (1 channel), then the kept B-scans resized to the same size (the two-branch fundus + OCT
  model, `model.name=joint:<encoder>`, splits them again; `channel_split`).
- Licence: the Harvard-Ophthalmology-AI-Lab data licence (research use); users download it
  themselves. raysim reads a local copy and never downloads.
Rules: the CSV's text value of an attribute wins over the npz code; a sample whose target
attribute is unknown is dropped unless `data.keep_unknown`; a file whose modality array is
empty is skipped (counted); an attribute value that is neither known nor unknown is an error.
A `filename` that is absolute or has a `..` component, one listed twice in a site's CSVs (or
in both its train and test), or missing from all/ is an error naming the CSV and rows; an npz
scalar that is not one number or text, a label other than 0/1 and a modality array over PIL's
`Image.MAX_IMAGE_PIXELS` values are errors naming the file.
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raysim.datasets.arrays import image_pixel_limit, open_npz, read_npz_array, read_npz_scalar
from raysim.datasets.base import ClientSpec, DataError, DataSource, EmptySplitError, SampleTable, Shard, check_unique, listed_names, path_problem, path_under, read_csv, register_dataset
from raysim.datasets.imaging import resize_chw
from raysim.datasets.oph_schema import ATTRIBUTES, LABEL, LABEL_TEXT, MODALITIES, NUM_SITES, RACE_STRINGS, SITE_ATTRIBUTES, UNKNOWN, VOLUME_KEYS, code_from_text


@register_dataset("fairfedmed_oph")
class FairFedMedOph(DataSource):
    name = "fairfedmed_oph"
    num_classes = 2
    class_names = ("NOT Glaucoma", "Glaucoma")  # FairFedMed's (its code keeps them in a set; here by label code)
    label_name = LABEL
    default_attribute = "race"
    root_hint = "the directory holding all/ and meta_site*.csv"

    @property
    def group_names(self) -> Mapping[str, Mapping[int, str]]:
        return {name: attr.group_names() for name, attr in ATTRIBUTES.items()}

    def client_specs(self) -> list[ClientSpec]:
        self._check_layout()
        if self.cfg.partition is not None:
            return self._pooled_specs()
        specs = []
        for site in range(1, NUM_SITES + 1):
            client_id = f"site{site}"
            train = self._read_split(site, "train")
            test = self._read_split(site, "test")
            overlap = sorted(set(train.sample_ids) & set(test.sample_ids))
            if overlap:
                raise DataError(f"{self._csv(site, 'train').name}, {self._csv(site, 'test').name}: {len(overlap)} files are in both train and test (first: {', '.join(overlap[:3])})")
            specs.append(self.client_spec(client_id, train, test))
        return specs

    def load(self, spec: ClientSpec, split: str) -> Shard:
        table = spec.splits[split]
        if len(table) == 0:  # nothing listed, not a file problem: val carved from too few rows
            raise DataError(f"{spec.id}/{split}: no samples (data.val_fraction={self.cfg.val_fraction} of {spec.num_train} training rows carves none); add rows or raise data.val_fraction")
        images, kept, dropped = [], [], Counter()
        for i, filename in enumerate(table.sample_ids):
            arrays = [self._read_array(filename, key) for key in self.modalities]
            empty = [key for key, array in zip(self.modalities, arrays) if array.size == 0]
            if empty:
                dropped[f"empty {empty[0]}"] += 1
                continue
            images.append(np.concatenate([self._to_chw(key, array, filename) for key, array in zip(self.modalities, arrays)]))
            kept.append(i)
        if not images:
            raise EmptySplitError(f"{spec.id}/{split}: every file has an empty {self.cfg.modality} array")
        return Shard(np.stack(images), table.take(np.asarray(kept, dtype=np.int64)), dict(dropped))

    def fingerprint(self) -> dict[str, Any]:
        digest = hashlib.sha256()
        for path in sorted(self.root.glob("meta_site*_*.csv")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
        return {"name": self.name, "root": str(self.root), "csv_sha256": digest.hexdigest(), "npz_files": sum(1 for _ in (self.root / "all").glob("*.npz"))}

    def _pooled_specs(self) -> list[ClientSpec]:
        """The sites' rows pooled and re-split into clients by `data.partition` (see the datasheet)."""
        sites = range(1, NUM_SITES + 1)
        train = SampleTable.concat([self._read_split(site, "train") for site in sites])
        test = SampleTable.concat([self._read_split(site, "test") for site in sites])
        for split, table in (("train", train), ("test", test)):
            ids, counts = np.unique(table.sample_ids, return_counts=True)
            if (counts > 1).any():
                raise DataError(f"{self.root}: {ids[counts > 1][0]} is listed more than once in the {self.attribute} site {split} CSVs; pooling with data.partition needs each file once")
        return self.pooled_client_specs(train, test, f"pooled {len(train)} train / {len(test)} test rows of the {NUM_SITES} sites")

    # --- metadata ---------------------------------------------------------------------------

    def _check_layout(self) -> None:
        attr = self.attribute
        if attr not in SITE_ATTRIBUTES:
            raise DataError(f"data.attribute={attr!r}: FairFedMed-Oph has site splits for {', '.join(SITE_ATTRIBUTES)} only")
        self._check_modalities()
        missing = [self._csv(k, s).name for k in range(1, NUM_SITES + 1) for s in ("train", "test") if not self._csv(k, s).exists()]
        if missing:
            raise DataError(f"{self.root}: missing site CSVs for attribute {attr}: {', '.join(missing)}")

    known_modalities: tuple[str, ...] = MODALITIES

    def _check_modalities(self) -> None:
        """One known array key, or a fundus image and a volume joined by `+` (fundus first)."""
        given = self.modalities
        unknown = [key for key in given if key not in self.known_modalities]
        if unknown or not given:
            raise DataError(f"data.modality={self.cfg.modality!r}: choose one of {', '.join(self.known_modalities)}, or a fundus image and a volume joined by + ({self.known_modalities[0]}+{VOLUME_KEYS[0]})")
        if len(given) > 1 and (len(given) != 2 or given[0] in VOLUME_KEYS or given[1] not in VOLUME_KEYS):
            raise DataError(f"data.modality={self.cfg.modality!r}: two modalities are a fundus image then a volume ({self.known_modalities[0]}+{VOLUME_KEYS[0]})")

    def _csv(self, site: int, split: str) -> Path:
        return self.root / f"meta_site{site}_{self.attribute}_{split}.csv"

    def _read_split(self, site: int, split: str) -> SampleTable:
        path = self._csv(site, split)
        frame = read_csv(path, required=("filename",))
        filenames = np.asarray(listed_names(path, "filename", frame["filename"].tolist(), where="data.root/all"), dtype=str)
        check_unique(path, list(filenames))
        frame["filename"] = filenames
        self._check_files_exist(path, filenames)
        labels = self._labels(path, frame)
        codes = {attr: self._codes(path, frame, attr) for attr in ATTRIBUTES}
        table = SampleTable(filenames.astype(str), labels, codes)
        if not self.cfg.keep_unknown:
            table = table.take(np.flatnonzero(codes[self.attribute] != UNKNOWN))
        return table

    def _check_files_exist(self, csv: Path, filenames: np.ndarray) -> None:
        missing = [f for f in filenames if not self._file(f).is_file()]
        if missing:
            raise DataError(f"{csv}: {len(missing)} listed files are missing from {self.root / 'all'} (first: {', '.join(missing[:3])})")

    def _labels(self, csv: Path, frame: pd.DataFrame) -> np.ndarray:
        if LABEL not in frame.columns:
            return np.array([self._label_from_npz(f.strip()) for f in frame["filename"]], dtype=np.int64)
        labels = []
        for row, text in enumerate(frame[LABEL]):
            value = LABEL_TEXT.get(text.strip().lower(), {"0": 0, "1": 1}.get(text.strip()))
            if value is None:
                raise DataError(f"{csv}: row {row}: {LABEL}={text!r} is not one of yes, no, 0, 1")
            labels.append(value)
        return np.asarray(labels, dtype=np.int64)

    def _codes(self, csv: Path, frame: pd.DataFrame, attr: str) -> np.ndarray:
        if attr in frame.columns:
            return np.asarray([self._code_from_csv(csv, row, attr, text) for row, text in enumerate(frame[attr])], dtype=np.int64)
        return np.asarray([self._code_from_npz(f.strip(), attr) for f in frame["filename"]], dtype=np.int64)

    @staticmethod
    def _code_from_csv(csv: Path, row: int, attr: str, text: str) -> int:
        code = code_from_text(attr, text)
        if code is None:
            expected = ", ".join((*ATTRIBUTES[attr].csv_text, "unknown"))
            raise DataError(f"{csv}: row {row}: {attr}={text!r} is neither a known value ({expected}) nor unknown")
        return code

    def _label_from_npz(self, filename: str) -> int:
        _, value = self._npz_scalar(filename, (LABEL,))
        if isinstance(value, str):
            label = LABEL_TEXT.get(value.strip().lower(), {"0": 0, "1": 1}.get(value.strip()))
        else:
            label = int(value) if _is_integer(value) and value in (0, 1) else None
        if label is None:
            raise DataError(f"{self._file(filename)}: {LABEL}={value!r} is not 0 or 1 (no/yes)")
        return label

    def _code_from_npz(self, filename: str, attr: str) -> int:
        key, value = self._npz_scalar(filename, ATTRIBUTES[attr].npz_keys)
        if isinstance(value, str):
            code = RACE_STRINGS.get(value.strip().lower()) if attr == "race" else code_from_text(attr, value)
        elif not _is_integer(value):
            code = None
        else:
            code = int(value)
            if key == "gender" and self.cfg.gender_coding == "male0" and code != UNKNOWN:
                code = 1 - code  # this copy codes Male=0, Female=1 (the CSV's text still wins)
        n_groups = len(ATTRIBUTES[attr].names)
        if code is None or not (code == UNKNOWN or 0 <= code < n_groups):
            raise DataError(f"{self._file(filename)}: {attr}={value!r} is neither a code 0..{n_groups - 1} nor -1 (unknown)")
        return code

    # --- pixels -------------------------------------------------------------------------------

    def _file(self, filename: str) -> Path:
        """`data.root/all/<filename>`; a DataError when the name would leave that folder."""
        return path_under(self.root / "all", filename, where="data.root/all")

    def _open(self, filename: str) -> Any:
        return open_npz(self._file(filename))

    def _npz_scalar(self, filename: str, keys: tuple[str, ...]) -> tuple[str, Any]:
        """(key, value) of the first of `keys` the file has (key families differ)."""
        path = self._file(filename)
        with self._open(filename) as data:
            for key in keys:
                if key in data.files:
                    return key, read_npz_scalar(data, key, path)
        raise DataError(f"{path}: none of the keys {', '.join(keys)} present (has: {', '.join(data.files)})")

    def _read_array(self, filename: str, key: str) -> np.ndarray:
        path = self._file(filename)
        with self._open(filename) as data:
            if key not in data.files:
                raise DataError(f"{path}: missing key {key!r} (has: {', '.join(data.files)})")
            array = read_npz_array(data, key, path, max_values=image_pixel_limit())
        ndim = 3 if key in VOLUME_KEYS else 2
        if array.size and (array.ndim != ndim or array.dtype != np.uint8):
            raise DataError(f"{path}: {key} must be a {ndim}D uint8 array, got {array.dtype} {array.shape}")
        return array

    def _to_chw(self, key: str, array: np.ndarray, filename: str) -> np.ndarray:
        if key not in VOLUME_KEYS:
            return resize_chw(array, self.img_size, 1)
        kept = array[:: self.cfg.slice_step]
        if len(array) != self.volume_depth:  # the depth, not the kept count: 7 and 8 scans both keep 4 at step 2
            raise DataError(f"{self._file(filename)}: {len(array)} B-scans, but the first volume had {self.volume_depth} (all volumes must match)")
        return resize_chw(kept.transpose(1, 2, 0), self.img_size, len(kept))

    # --- modalities and volumes (oct_bscans) ----------------------------------------------------

    @property
    def modalities(self) -> tuple[str, ...]:
        """The npz keys read per file, in channel order (`data.modality` split at `+`)."""
        return tuple(key.strip() for key in self.cfg.modality.split("+") if key.strip())

    @property
    def volume_key(self) -> str | None:
        return next((key for key in self.modalities if key in VOLUME_KEYS), None)

    @property
    def is_volume(self) -> bool:
        """The image is a volume alone (not a fundus image with a volume beside it)."""
        return self.modalities == (self.volume_key,)

    @property
    def channels(self) -> int:  # type: ignore[override]
        """1 per fundus image; for an OCT volume the B-scans kept (every data.slice_step-th)."""
        return sum(self.channel_split)

    @property
    def channel_split(self) -> tuple[int, ...]:
        """Channels of each modality in `modalities`' order (1 for a fundus image)."""
        return tuple(self.volume_slices or 0 if key in VOLUME_KEYS else 1 for key in self.modalities)

    @property
    def volume_slices(self) -> int | None:
        """B-scans kept per volume; None without a volume."""
        return len(range(0, self.volume_depth, self.cfg.slice_step)) if self.volume_key else None

    @functools.cached_property
    def volume_depth(self) -> int:
        """B-scans per volume, read from the first non-empty volume in the site CSVs."""
        for site in range(1, NUM_SITES + 1):
            for split in ("train", "test"):
                path = self._csv(site, split)
                if not path.exists():
                    continue
                for filename in read_csv(path).get("filename", []):
                    name = filename.strip()
                    array = self._read_array(name, str(self.volume_key)) if path_problem(name) is None and self._file(name).is_file() else np.empty(0)
                    if array.size:
                        return int(array.shape[0])
        raise DataError(f"{self.root}: no non-empty {self.volume_key} volume found")


def _is_integer(value: Any) -> bool:
    """A whole number (int, bool or an integral float); False for NaN, inf and 2.5."""
    try:
        return float(value).is_integer()
    except (TypeError, ValueError, OverflowError):
        return False
