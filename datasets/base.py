"""The small interface every data source implements, and the registry that names them.

A source has two halves. `client_specs()` runs in the driver: it reads metadata only
(CSVs, labels, group codes), validates it and returns one light, picklable `ClientSpec`
per client. `load()` runs inside the client's actor and reads the pixels of one split.
"""

from __future__ import annotations

import functools
import posixpath
import zlib
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd

from raysim.registry import Registry

if TYPE_CHECKING:
    from raysim.config import DataConfig

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Input data is missing or malformed; the message names the file and what was expected."""


class EmptySplitError(DataError):
    """Every file of a split was skipped by design (e.g. all modality arrays empty): no pixels."""


@dataclass(frozen=True)
class SampleTable:
    """Metadata of one client split: everything but the pixels."""

    sample_ids: np.ndarray  # str, unique within the client
    labels: np.ndarray  # int64
    attributes: Mapping[str, np.ndarray]  # attribute -> int64 group codes, -1 unknown

    def __len__(self) -> int:
        return len(self.sample_ids)

    def take(self, index: np.ndarray) -> SampleTable:
        return SampleTable(self.sample_ids[index], self.labels[index], {k: v[index] for k, v in self.attributes.items()})

    @staticmethod
    def concat(tables: Sequence[SampleTable]) -> SampleTable:
        """The rows of several tables, in order (their attributes must match)."""
        return SampleTable(
            np.concatenate([t.sample_ids for t in tables]),
            np.concatenate([t.labels for t in tables]),
            {k: np.concatenate([t.attributes[k] for t in tables]) for k in tables[0].attributes},
        )

    def group_counts(self, attribute: str) -> dict[int, int]:
        codes, counts = np.unique(self.attributes[attribute], return_counts=True)
        return {int(c): int(n) for c, n in zip(codes, counts)}


@dataclass(frozen=True)
class ClientSpec:
    """One client: its id, role and how its actor loads each split. Cheap to pickle."""

    id: str
    splits: Mapping[str, SampleTable]
    role: str = ""
    source_info: Mapping[str, Any] = field(default_factory=dict)  # source-specific (paths, ...)

    @property
    def num_train(self) -> int:
        return len(self.splits["train"])


@dataclass(frozen=True)
class Shard:
    """The pixels of one client split, aligned with its SampleTable (after drop rules)."""

    images: np.ndarray  # uint8, (N, C, H, W)
    table: SampleTable
    dropped: Mapping[str, int] = field(default_factory=dict)  # reason -> count
    masks: np.ndarray | None = None  # uint8 (N, H, W) class indices, row-aligned; only for segmentation runs


class DataSource(ABC):
    """A registered data source. Subclasses set the class attributes and the two methods."""

    name: ClassVar[str]
    num_classes: ClassVar[int] = 2
    channels: ClassVar[int] = 1
    label_name: ClassVar[str] = "label"  # "" when the source has no classification label (masks only)
    mask_classes: ClassVar[tuple[str, ...]] = ()  # segmentation mask classes by index; () = no masks
    # Each label code's name, in code order: what a CLIP host's prompts say (raysim.models.clip).
    class_names: ClassVar[tuple[str, ...]] = ()  # (): "class 0", "class 1", ...
    default_attribute: ClassVar[str | None] = None  # the target attribute when data.attribute is null
    root_hint: ClassVar[str] = "the dataset directory"  # what data.root must hold, for errors

    def __init__(self, cfg: DataConfig, *, img_size: int, seed: int) -> None:
        self.cfg = cfg
        self.img_size = img_size
        self.seed = seed

    @functools.cached_property
    def root(self) -> Path:
        """`data.root` as a path; a DataError saying what it must hold when unset or absent."""
        if not self.cfg.root:
            raise DataError(f"data.root is required for {self.name}: {self.root_hint}")
        root = Path(self.cfg.root).expanduser()
        if not root.is_dir():
            raise DataError(f"data.root {root} is not a directory ({self.name} expects {self.root_hint})")
        return root

    @property
    def volume_slices(self) -> int | None:
        """Slices per sample for volumes (the model folds them into its 2D backbone), else None."""
        return None

    @property
    def channel_split(self) -> tuple[int, ...]:
        """Channels of each modality stacked in an image: (channels,) for one modality; a fundus
        image with an OCT volume beside it is (1, slices) (`data.modality=slo_fundus+oct_bscans`)."""
        return (self.channels,)

    @property
    def attribute(self) -> str | None:
        """The target sensitive attribute: `data.attribute`, else the source's default."""
        return self.cfg.attribute or self.default_attribute

    @property
    @abstractmethod
    def group_names(self) -> Mapping[str, Mapping[int, str]]:
        """attribute -> {code: display name} for every sensitive attribute the source has."""

    @abstractmethod
    def client_specs(self) -> list[ClientSpec]:
        """Read and validate metadata; one spec per client, sorted by id."""

    @abstractmethod
    def load(self, spec: ClientSpec, split: str) -> Shard:
        """Read, validate and resize the images of one split (runs in the client's actor)."""

    def load_masks(self, spec: ClientSpec, split: str, sample_ids: np.ndarray, size: int | None = None) -> np.ndarray:
        """(N, size, size) uint8 class indices (`mask_classes`) of these samples of a split, in
        their order (pass the ids of `load`'s shard: its rows after the drop rules); `size`
        defaults to the images' size. Sources without masks raise a DataError."""
        raise DataError(f"data source {self.name} has no segmentation masks (it is a classification source)")

    def client_spec(self, client_id: str, train: SampleTable, test: SampleTable, **source_info: Any) -> ClientSpec:
        """A client with validation carved from its training rows, seeded by (seed, client id)."""
        rng = np.random.default_rng([self.seed, zlib.crc32(client_id.encode())])
        train, val = carve_validation(train, self.cfg.val_fraction, rng)
        if len(train) == 0 or len(test) == 0:
            raise DataError(f"{client_id}: no samples left in train or test after the drop rules")
        return ClientSpec(client_id, {"train": train, "val": val, "test": test}, source_info={"root": str(self.root), **source_info})

    def pooled_client_specs(self, train: SampleTable, test: SampleTable, pool: str, *, unit: str = "rows", cfg: Any = None) -> list[ClientSpec]:
        """Pooled train / test rows split into `client1`..`clientN` by `data.partition`
        (`datasets.partition.split_pool`; `cfg`: the data config to split by, default this
        source's). A client too small for a val share gets one random train row as val, seeded
        by (seed, "val", client id). `pool` describes the pool in errors, `unit` its rows."""
        import dataclasses

        from raysim.datasets.partition import split_pool
        from raysim.seeding import rng

        cfg = cfg or self.cfg
        try:
            parts = split_pool(train.labels, len(test), cfg, self.seed)
        except ValueError as err:
            raise DataError(f"{self.root}: cannot split the {pool} into clients: {err}") from err
        width = len(str(len(parts)))
        specs = []
        for k, (train_index, test_index) in enumerate(parts, start=1):
            client_id = f"client{k:0{width}d}"
            if len(train_index) < 2 or len(test_index) < 1:
                raise DataError(
                    f"{client_id} got {len(train_index)} train and {len(test_index)} test {unit} (of the {pool}, data.partition={cfg.partition}); "
                    "it needs 2 train (train and val) and 1 test: raise its share (data.ratios, data.alpha) or lower data.num_clients"
                )
            spec = self.client_spec(client_id, train.take(train_index), test.take(test_index))
            own = spec.splits["train"]
            if len(spec.splits["val"]) == 0:  # too few rows for a stratified val row: one random train row instead
                moved = int(rng(self.seed, "val", client_id).integers(len(own)))
                spec = dataclasses.replace(spec, splits={**spec.splits, "train": own.take(np.delete(np.arange(len(own)), moved)), "val": own.take(np.array([moved]))})
            specs.append(spec)
        return specs

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the data on disk (for provenance.json)."""
        return {"name": self.name, "root": self.cfg.root}


DATASETS: Registry[type[DataSource]] = Registry("dataset", "raysim.datasets")
register_dataset = DATASETS.register


def read_csv(path: Path, required: tuple[str, ...] = ()) -> pd.DataFrame:
    """A metadata CSV as text columns; a DataError naming the file and any missing column."""
    if path.is_dir():
        raise DataError(f"{path}: a directory, not a CSV file")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError as err:
        raise DataError(f"{path}: file not found") from err
    except OSError as err:  # unreadable: permissions, I/O errors
        raise DataError(f"{path}: not a readable CSV ({err.strerror or err})") from err
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not a readable CSV: not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from err
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DataError(f"{path}: not a readable CSV ({err})") from err
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing required column(s) {', '.join(repr(c) for c in missing)} (columns: {', '.join(frame.columns)})")
    return frame


def path_problem(name: str) -> str | None:
    """Why a file name read from metadata is not a plain relative path; None when it is.

    Refused: empty names, NUL bytes, absolute paths (POSIX `/x`, Windows `C:`, `\\x`) and any
    `..` component (either separator), so a metadata row can never name a file outside the
    folder it is joined to. The check is on the text: symbolic links inside data.root are the
    data owner's layout (`prepare_chest --link` makes them) and are followed.
    """
    if not name.strip():
        return "is empty"
    if "\0" in name:
        return "contains a NUL byte"
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute():
        return "is an absolute path"
    if windows.anchor:
        return "starts with a drive or root (absolute on Windows)"
    if ".." in posix.parts or ".." in windows.parts:
        return "contains a '..' component"
    return None


def path_under(base: Path, name: str, where: str = "data.root") -> Path:
    """`base / name` for a file name read from metadata (base: data.root or a folder in it).

    A DataError naming the file and what was expected unless `name` passes `path_problem`.
    """
    problem = path_problem(name)
    if problem:
        raise DataError(f"file name {name!r} {problem}; expected a path relative to {where} ({base})")
    return base / name


def check_relative_paths(csv: Path, column: str, names: Sequence[str], where: str = "data.root") -> None:
    """A DataError listing the rows of `column` whose value is not a path relative to `where`."""
    bad = [(row, str(name), problem) for row, name in enumerate(names) if (problem := path_problem(str(name)))]
    if bad:
        listed = "; ".join(f"row {row}: {name!r} {problem}" for row, name, problem in bad[:10])
        more = f"; and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DataError(f"{csv}: {len(bad)} {column} value(s) are not paths relative to {where} ({listed}{more}); write them relative to {where}")


def listed_names(csv: Path, column: str, names: Sequence[str], where: str = "data.root") -> list[str]:
    """File names read from metadata: stripped, checked (`check_relative_paths`) and normalised
    (`./x.npz` and `a//b/x.npz` become `x.npz` and `a/b/x.npz`), so that one file has one name
    before the duplicate and train / test overlap checks compare them."""
    stripped = [str(name).strip() for name in names]
    check_relative_paths(csv, column, stripped, where)
    return [posixpath.normpath(name) for name in stripped]


def check_unique(csv: Path, names: Sequence[str], what: str = "filenames") -> None:
    """A DataError naming `csv` and the first names listed more than once (after `listed_names`)."""
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise DataError(f"{csv}: {len(repeated)} {what} listed more than once (first: {', '.join(repeated[:3])})")


def carve_validation(table: SampleTable, fraction: float, rng: np.random.Generator) -> tuple[SampleTable, SampleTable]:
    """Split a training table into (train, val), stratified by label so both keep both classes."""
    val_index = []
    for label in np.unique(table.labels):
        members = np.flatnonzero(table.labels == label)
        n_val = int(round(fraction * len(members)))
        val_index.append(rng.permutation(members)[:n_val])
    val = np.sort(np.concatenate(val_index)) if val_index else np.array([], dtype=np.int64)
    rest = np.ones(len(table), dtype=bool)
    rest[val] = False
    train = np.flatnonzero(rest)  # setdiff1d's rows, without its sort (10,000 clients: a second of the driver's start)
    return table.take(train), table.take(val)
