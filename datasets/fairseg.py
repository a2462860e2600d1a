"""FairSeg (Harvard-FairSeg): optic disc and cup segmentation on SLO fundus images, no sites.

Datasheet
- Task: segmentation. A mask holds FairSeg's codes 0 background, -1 neuroretinal rim (the optic
  disc without the cup), -2 optic cup, read as classes 0 / 1 / 2 (`mask_classes`; disc Dice
  counts label >= 1, cup Dice label 2, rim Dice label 1: `raysim.metrics.segmentation`). Any other value is a DataError naming the file.
- No classification label: FairSeg ships masks and demographics, no diagnosis. The sample
  tables' labels are 0 placeholders, and `num_classes` raises a DataError (the driver asks for
  it when it builds the model, before any training) until the engine has a segmentation task.
  `load` gives the images and `load_masks` the masks of the same rows.
- Size (real release): 10,000 patients, one SLO fundus each; the public lists
  (Harvard-Ophthalmology-AI-Lab/FairSeg, `lists/FairSeg_final/`) name 7,500 train and 2,000
  test files.
- Files: one `.npz` per patient, anywhere under data.root (names are relative to it). Two key
  families (specs/datasets.md), told apart by the image key:
  `fundus_slo` + `disc_cup` (the public loader's copy: race codes 2 Asian, 3 Black, 7 White)
  and `slo_fundus` + `disc_cup_mask` (the release README's copy and the Harvard npz family,
  the synthetic twin included: race 0 Asian, 1 Black, 2 White). Race may also be text.
  A file with an empty image is skipped (counted), as in FairFedMed-Oph.
- Attributes: race, gender, ethnicity, language, marital status (codes as FairFedMed's,
  `oph_schema.py`, -1 unknown) and age in two groups, <60 and 60+ (the public loader's cut).
  `age` is in days in the public loader's copy (÷ 365) and in years elsewhere: a value over
  130 can only be days. A summary CSV (`data_summary.csv` in data.root or data.root/ReadMe,
  a `filename` column) gives text that wins over the npz codes for the columns it has.
- Splits: `train.txt` and `test.txt` in data.root (one file name per line), else the summary
  CSV's `use` (or `split`) column: training / validation / test (validation rows train; raysim
  carves its own validation share). Clients: none in the data: `data.partition` splits the
  pooled train rows (iid over `data.num_clients`, 3 by default; dirichlet or quantity on
  request) and the test rows IID over the same clients (`partition.split_pool`).
- Licence: CC BY-NC-ND 4.0, non-commercial research only; users download it themselves
  (ophai.hms.harvard.edu/datasets/harvard-fairseg10k). raysim reads a local copy, never downloads.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raysim.datasets.arrays import image_pixel_limit, open_npz, read_npz_array, read_npz_scalar
from raysim.datasets.base import ClientSpec, DataError, DataSource, EmptySplitError, SampleTable, Shard, check_unique, listed_names, path_under, read_csv, register_dataset
from raysim.datasets.imaging import resize_chw
from raysim.datasets.oph_schema import ATTRIBUTES, UNKNOWN, code_from_text

MASK_CODES = {0: 0, -1: 1, -2: 2}  # FairSeg code -> class index (the public loader's mapping)
MASK_CLASSES = ("background", "disc", "cup")  # class 1 is the disc rim: the disc is classes >= 1
MASK_KEYS = ("disc_cup", "disc_cup_mask")
AGE_GROUPS = {0: "<60", 1: "60+"}
AGE_CUT_YEARS = 60.0
MAX_AGE_YEARS = 130.0  # an age above this is in days
SUMMARY_CSVS = ("data_summary.csv", "ReadMe/data_summary.csv")
SPLIT_LISTS = ("train.txt", "test.txt")
SPLIT_TEXT = {"training": "train", "train": "train", "validation": "train", "val": "train", "test": "test", "testing": "test"}
DEFAULT_PARTITION = "iid"


@dataclass(frozen=True)
class KeyFamily:
    """One copy's npz layout: the image key, the mask key it pairs with, its race integers."""

    image: str
    mask: str
    race_codes: Mapping[int, int]  # npz integer -> raysim race code (0 Asian, 1 Black, 2 White)


FAMILIES = (
    KeyFamily("fundus_slo", "disc_cup", {2: 0, 3: 1, 7: 2}),
    KeyFamily("slo_fundus", "disc_cup_mask", {0: 0, 1: 1, 2: 2}),
)


# --- masks (shared with the synthetic twin) --------------------------------------------------


def mask_key(files: list[str], path: Path) -> str:
    """The mask key a file has (either family's); a DataError naming the file otherwise."""
    for key in MASK_KEYS:
        if key in files:
            return key
    raise DataError(f"{path}: no disc/cup mask: expected key {' or '.join(MASK_KEYS)} (has: {', '.join(files)})")


def mask_to_classes(raw: np.ndarray, path: Path, key: str) -> np.ndarray:
    """A 2D mask in FairSeg's codes 0 / -1 / -2 as uint8 classes 0 / 1 / 2; any other value is a DataError."""
    if raw.ndim != 2 or raw.dtype.kind not in "biuf":
        raise DataError(f"{path}: {key} must be a 2D numeric mask, got {raw.dtype} of shape {raw.shape}")
    values = np.unique(raw)
    bad = [v for v in values.tolist() if v not in MASK_CODES]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise DataError(f"{path}: {key} holds {shown}; expected FairSeg's mask codes 0 (background), -1 (neuroretinal rim), -2 (optic cup)")
    classes = np.zeros(raw.shape, dtype=np.uint8)
    classes[raw == -1] = 1
    classes[raw == -2] = 2
    return classes


def resize_mask(classes: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of a class mask to (size, size), sampling at pixel centres."""
    rows = ((np.arange(size) + 0.5) * classes.shape[0] / size).astype(np.int64)
    cols = ((np.arange(size) + 0.5) * classes.shape[1] / size).astype(np.int64)
    return classes[rows[:, None], cols[None, :]]


def read_array(data: Any, key: str, path: Path) -> np.ndarray:
    """One image or mask of an open npz, size-checked (`datasets.arrays`) before it is decompressed."""
    return read_npz_array(data, key, path, max_values=image_pixel_limit())


def read_mask(path: Path, size: int | None = None) -> np.ndarray:
    """The disc / cup classes of one npz (either family's key), resized to `size` when given.

    The mask must have its image's shape (the image under either family's key).
    """
    with open_npz(path) as data:
        key = mask_key(data.files, path)
        raw = read_array(data, key, path)
        image_key = next((f.image for f in FAMILIES if f.image in data.files), None)
        image_shape = read_array(data, image_key, path).shape if image_key else None
    if raw.size == 0:
        raise DataError(f"{path}: {key} is empty; a file with an image needs its mask")
    if image_shape is not None and image_shape != raw.shape:
        raise DataError(f"{path}: {key} has shape {raw.shape} but {image_key} has {image_shape}; a mask must cover its image pixel for pixel")
    classes = mask_to_classes(raw, path, key)
    return classes if size is None else resize_mask(classes, size)


# --- demographics ------------------------------------------------------------------------------


def _scalar(data: Any, key: str, path: Path) -> Any:
    return read_npz_scalar(data, key, path)


def _whole(value: Any) -> int | None:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return int(number) if number.is_integer() else None


def age_group(value: Any) -> int:
    """<60 (0) or 60+ (1) of an age in years, or in days when over MAX_AGE_YEARS; -1 if unknown."""
    try:
        age = float(value)
    except (TypeError, ValueError):
        return UNKNOWN
    if not np.isfinite(age) or age < 0:
        return UNKNOWN
    years = age / 365.0 if age > MAX_AGE_YEARS else age
    return int(years >= AGE_CUT_YEARS)


def _attribute_code(attr: str, value: Any, family: KeyFamily, path: Path, key: str) -> int:
    """raysim's code of one npz scalar: text as the CSVs write it, race integers by the file's family."""
    if isinstance(value, str):
        code = code_from_text(attr, value)  # knows race's long forms too ("black or african american")
    elif attr == "race":
        whole = _whole(value)
        code = UNKNOWN if whole == UNKNOWN else family.race_codes.get(whole) if whole is not None else None
    else:
        code = _whole(value)
    n_groups = len(ATTRIBUTES[attr].names)
    if code is None or not (code == UNKNOWN or 0 <= code < n_groups):
        expected = f"one of {sorted(family.race_codes)} (race codes of files with {family.image}) or -1" if attr == "race" else f"a code 0..{n_groups - 1} or -1 (unknown)"
        raise DataError(f"{path}: {key}={value!r} is not {expected}")
    return code


def _family(files: list[str], path: Path) -> KeyFamily:
    family = next((f for f in FAMILIES if f.image in files), None)
    if family is None:
        raise DataError(f"{path}: no fundus image: expected key {' or '.join(f.image for f in FAMILIES)} (has: {', '.join(files)})")
    return family


def npz_demographics(path: Path, *, male0: bool = False) -> dict[str, int]:
    """Group codes of one file from its npz scalars (a missing scalar is unknown).

    `male0`: this copy's `gender` integers code Male=0 (data.gender_coding), as in FairFedMed-Oph.
    """
    with open_npz(path) as data:
        family = _family(data.files, path)
        codes = {}
        for attr, spec in ATTRIBUTES.items():
            key = next((k for k in spec.npz_keys if k in data.files), None)
            value = _scalar(data, key, path) if key else UNKNOWN
            codes[attr] = UNKNOWN if key is None else _attribute_code(attr, value, family, path, key)
            if key == "gender" and male0 and not isinstance(value, str) and codes[attr] != UNKNOWN:
                codes[attr] = 1 - codes[attr]
        codes["age"] = age_group(_scalar(data, "age", path)) if "age" in data.files else UNKNOWN
    return codes


def csv_demographics(csv: Path, row: int, record: Mapping[str, str]) -> dict[str, int]:
    """Group codes from one summary-CSV row's text (only the columns it has)."""
    codes = {}
    for attr in ATTRIBUTES:
        if attr in record:
            code = code_from_text(attr, record[attr])
            if code is None:
                raise DataError(f"{csv}: row {row}: {attr}={record[attr]!r} is neither a known value ({', '.join(ATTRIBUTES[attr].csv_text)}) nor unknown")
            codes[attr] = code
    if "age" in record and record["age"].strip():
        codes["age"] = age_group(record["age"])
    return codes


# --- the source --------------------------------------------------------------------------------


@register_dataset("fairseg")
class FairSeg(DataSource):
    name = "fairseg"
    label_name = ""  # no classification label (see the datasheet)
    mask_classes = MASK_CLASSES
    default_attribute = "race"
    root_hint = "the directory holding the FairSeg npz files and train.txt / test.txt (or data_summary.csv)"

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        raise DataError(
            "data.name=fairseg has no classification label (FairSeg ships optic disc/cup masks, no diagnosis); "
            "it trains only as a segmentation task: use a segmentation model, e.g. model.name=unet:resnet18"
        )

    @property
    def group_names(self) -> Mapping[str, Mapping[int, str]]:
        return {**{name: attr.group_names() for name, attr in ATTRIBUTES.items()}, "age": AGE_GROUPS}

    def client_specs(self) -> list[ClientSpec]:
        self._check_modality()
        splits = self._splits()
        csv_codes = self._csv_codes()
        tables = {split: self._table(names, csv_codes) for split, names in splits.items()}
        return self._pooled_specs(tables["train"], tables["test"])

    def load(self, spec: ClientSpec, split: str) -> Shard:
        table = spec.splits[split]
        if len(table) == 0:
            raise DataError(f"{spec.id}/{split}: no samples (data.val_fraction={self.cfg.val_fraction} of {spec.num_train} training rows carves none); add rows or raise data.val_fraction")
        images, kept, dropped = [], [], Counter()
        for i, name in enumerate(table.sample_ids):
            image = self._read_image(name)
            if image.size == 0:
                dropped["empty fundus"] += 1
                continue
            images.append(resize_chw(image, self.img_size, 1))
            kept.append(i)
        if not images:
            raise EmptySplitError(f"{spec.id}/{split}: every file has an empty fundus image")
        return Shard(np.stack(images), table.take(np.asarray(kept, dtype=np.int64)), dict(dropped))

    def load_masks(self, spec: ClientSpec, split: str, sample_ids: np.ndarray, size: int | None = None) -> np.ndarray:
        size = size or self.img_size
        masks = [read_mask(self._file(str(name)), size) for name in sample_ids]
        return np.stack(masks) if masks else np.zeros((0, size, size), np.uint8)

    def fingerprint(self) -> dict[str, Any]:
        digest = hashlib.sha256()
        for name in (*SPLIT_LISTS, *SUMMARY_CSVS):
            if (self.root / name).is_file():
                digest.update(name.encode())
                digest.update((self.root / name).read_bytes())
        return {"name": self.name, "root": str(self.root), "lists_sha256": digest.hexdigest()}

    # --- metadata ---------------------------------------------------------------------------

    def _check_modality(self) -> None:
        images = tuple(f.image for f in FAMILIES)
        if self.cfg.modality not in images:
            raise DataError(f"data.modality={self.cfg.modality!r}: FairSeg has SLO fundus images only ({' or '.join(images)}, whichever key a file has)")

    def _file(self, name: str) -> Path:
        return path_under(self.root, name)

    def _summary_csv(self) -> Path | None:
        return next((self.root / n for n in SUMMARY_CSVS if (self.root / n).is_file()), None)

    def _splits(self) -> dict[str, list[str]]:
        """File names per split: train.txt / test.txt, else the summary CSV's use / split column."""
        lists = [self.root / n for n in SPLIT_LISTS]
        if any(p.is_file() for p in lists):
            missing = [p.name for p in lists if not p.is_file()]
            if missing:
                raise DataError(f"{self.root}: {', '.join(missing)} missing; FairSeg's splits need both train.txt and test.txt")
            splits = {split: self._read_list(path) for split, path in zip(("train", "test"), lists)}
        else:
            splits = self._splits_from_csv()
        both = sorted(set(splits["train"]) & set(splits["test"]))
        if both:
            raise DataError(f"{self.root}: {len(both)} files are in both the train and the test split (first: {', '.join(both[:3])})")
        return splits

    def _read_list(self, path: Path) -> list[str]:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as err:  # a directory, no permission
            raise DataError(f"{path}: not a readable list of file names ({err.strerror or err})") from err
        names = listed_names(path, "file name", [line for line in text.splitlines() if line.strip()])
        check_unique(path, names, "file names")
        if not names:
            raise DataError(f"{path}: no file names (expected one npz name per line)")
        self._check_files_exist(path, names)
        return names

    def _splits_from_csv(self) -> dict[str, list[str]]:
        csv = self._summary_csv()
        if csv is None:
            raise DataError(f"{self.root}: no split: expected train.txt and test.txt (one npz name per line) or data_summary.csv with a 'use' column")
        frame = read_csv(csv, required=("filename",))
        column = next((c for c in ("use", "split") if c in frame.columns), None)
        if column is None:
            raise DataError(f"{csv}: no 'use' or 'split' column, and no train.txt / test.txt in {self.root}: nothing says which files are train and which test")
        names = listed_names(csv, "filename", frame["filename"].tolist())
        check_unique(csv, names)
        splits: dict[str, list[str]] = {"train": [], "test": []}
        for row, (name, text) in enumerate(zip(names, frame[column])):
            split = SPLIT_TEXT.get(text.strip().lower())
            if split is None:
                raise DataError(f"{csv}: row {row}: {column}={text!r} is not one of {', '.join(SPLIT_TEXT)}")
            splits[split].append(name)
        for listed in splits.values():
            self._check_files_exist(csv, listed)
        if not splits["train"] or not splits["test"]:
            raise DataError(f"{csv}: the {column} column gives {len(splits['train'])} train and {len(splits['test'])} test files; both splits need files")
        return splits

    def _check_files_exist(self, where: Path, names: list[str]) -> None:
        missing = [n for n in names if not self._file(n).is_file()]
        if missing:
            raise DataError(f"{where}: {len(missing)} listed files are missing from {self.root} (first: {', '.join(missing[:3])})")

    def _csv_codes(self) -> dict[str, dict[str, int]]:
        """file name -> the group codes the summary CSV's text gives (empty without a CSV)."""
        csv = self._summary_csv()
        if csv is None:
            return {}
        frame = read_csv(csv, required=("filename",))
        names = listed_names(csv, "filename", frame["filename"].tolist())
        check_unique(csv, names)
        return {name: csv_demographics(csv, row, r) for row, (name, r) in enumerate(zip(names, frame.to_dict("records")))}

    def _table(self, names: list[str], csv_codes: Mapping[str, Mapping[str, int]]) -> SampleTable:
        rows = []
        for name in names:
            text = csv_codes.get(name, {})
            needs_npz = any(attr not in text for attr in self.group_names)
            npz = npz_demographics(self._file(name), male0=self.cfg.gender_coding == "male0") if needs_npz else {}
            rows.append({**npz, **text})
        codes = {attr: np.asarray([r[attr] for r in rows], dtype=np.int64) for attr in self.group_names}
        table = SampleTable(np.asarray(names, dtype=str), np.zeros(len(names), dtype=np.int64), codes)
        if not self.cfg.keep_unknown and self.attribute in codes:
            table = table.take(np.flatnonzero(codes[self.attribute] != UNKNOWN))
        return table

    def _pooled_specs(self, train: SampleTable, test: SampleTable) -> list[ClientSpec]:
        cfg = dataclasses.replace(self.cfg, partition=self.cfg.partition or DEFAULT_PARTITION)
        return self.pooled_client_specs(train, test, f"{len(train)} train / {len(test)} test files", unit="files", cfg=cfg)

    # --- pixels -------------------------------------------------------------------------------

    def _read_image(self, name: str) -> np.ndarray:
        path = self._file(name)
        with open_npz(path) as data:
            family = _family(data.files, path)
            image = read_array(data, family.image, path)
        if image.size == 0:
            return image
        if image.ndim != 2 or image.dtype.kind not in "biuf":
            raise DataError(f"{path}: {family.image} must be a 2D image, got {image.dtype} of shape {image.shape}")
        if image.dtype != np.uint8:  # the public loader clips to 0..255; refuse values that would need it
            if not np.isfinite(image).all() or image.min() < 0 or image.max() > 255:
                raise DataError(f"{path}: {family.image} values must lie in 0..255 (got {image.dtype} in [{image.min()}, {image.max()}])")
            if image.max() <= 1 and (image % 1).any():
                # Refused, not scaled: a 0..1 image and a dark 0..255 one look alike, and a scale
                # guessed per file would mix scales within one data set (rounding made it black).
                raise DataError(
                    f"{path}: {family.image} holds fractions in [{image.min():g}, {image.max():g}] (a 0..1 scale); expected pixel values 0..255: "
                    "multiply by 255 and store uint8 (raysim does not guess a file's scale)"
                )
            image = np.round(image).astype(np.uint8)
        return image
