"""Malformed data is a DataError that names the culprit, never a traceback or a silent success.

A catalogue of broken inputs across the data sources (paths that leave data.root,
decompression bombs, truncated files, wrong shapes, bad CSVs, duplicate ids, unknown codes,
empty splits, huge values, missing files), each run in-process on a tiny generated set.
"""

from __future__ import annotations

import shutil
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from raysim.config import DataConfig
from raysim.datasets import ClientSpec, DataError, DataSource, SampleTable
from raysim.datasets.base import path_problem
from raysim.datasets.fairfedmed_chest import FairFedMedChest
from raysim.datasets.fairfedmed_oph import FairFedMedOph
from raysim.datasets.fed_isic2019 import IMAGE_DIR, FedISIC2019
from raysim.datasets.inspect import inspect
from raysim.datasets.medmnist import MedMNIST

from helpers import write_chest, write_image, write_isic, write_medmnist

# --- tiny sets --------------------------------------------------------------------------------










@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One intact root per source (treat as read-only; cases break private copies)."""
    roots = {name: tmp_path_factory.mktemp(name) for name in ("isic", "chest", "medmnist")}
    write_isic(roots["isic"])
    write_chest(roots["chest"])
    write_medmnist(roots["medmnist"])
    return roots


SOURCES: dict[str, type[DataSource]] = {"isic": FedISIC2019, "chest": FairFedMedChest, "oph": FairFedMedOph, "medmnist": MedMNIST}
NAMES = {"isic": "fed_isic2019", "chest": "fairfedmed_chest", "oph": "fairfedmed_oph", "medmnist": "medmnist"}


def make_source(dataset: str, root: Path, **kw: object) -> DataSource:
    kw.setdefault("keep_unknown", dataset != "medmnist")
    return SOURCES[dataset](DataConfig(name=NAMES[dataset], root=str(root), **kw), img_size=8, seed=0)


def load_everything(source: DataSource) -> None:
    for spec in source.client_specs():
        for split in spec.splits:
            source.load(spec, split)


# --- ways to break a root -------------------------------------------------------------------


@dataclass
class Ctx:
    root: Path
    outside: Path  # a folder next to the root: what an escaping path would read
    monkeypatch: pytest.MonkeyPatch


def edit_csv(path: Path, change: Callable[[pd.DataFrame], pd.DataFrame | None]) -> None:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    result = change(frame)  # edits in place (None) or returns a new frame
    (frame if result is None else result).to_csv(path, index=False)


def set_cell(path: Path, row: int, column: str, value: str) -> None:
    def change(frame: pd.DataFrame) -> None:
        frame.loc[row, column] = value

    edit_csv(path, change)


def first(path: Path, column: str = "filename", row: int = 0) -> str:
    return str(pd.read_csv(path, dtype=str, keep_default_na=False)[column][row])


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def png_claiming(width: int, height: int) -> bytes:
    """A 57-byte PNG whose header declares width x height pixels (no pixel data follows)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


# ISIC: the first row of the split file is center 0's first train image.
ISIC_SPLIT, ISIC_META, ISIC_VICTIM = "train_test_split", "ISIC_2019_Training_Metadata_FL.csv", "ISIC_0000000"


def isic_rename_first(ctx: Ctx, image: str, target: Path) -> None:
    """Point row 0 of the split and metadata files at `image`, a readable JPEG at `target`."""
    write_image(target, 99, rgb=True)
    set_cell(ctx.root / ISIC_SPLIT, 0, "image", image)
    set_cell(ctx.root / ISIC_META, 0, "image", image)


def isic_absolute(ctx: Ctx) -> None:
    isic_rename_first(ctx, str(ctx.outside / "secret"), ctx.outside / "secret.jpg")


def isic_dotdot(ctx: Ctx) -> None:
    isic_rename_first(ctx, "../../outside/secret", ctx.outside / "secret.jpg")


def isic_victim(ctx: Ctx) -> Path:
    return ctx.root / IMAGE_DIR / f"{ISIC_VICTIM}.jpg"


def isic_no_test_rows_for_center5(ctx: Ctx) -> None:
    def change(frame: pd.DataFrame) -> None:
        five = frame["center"] == "5"
        frame.loc[five, "fold"] = "train"
        frame.loc[five, "fold2"] = "train_5"

    edit_csv(ctx.root / ISIC_SPLIT, change)


# Chest: victims are row 0 of a site's CSV.
CHEX_TRAIN, CHEX_TEST, MIMIC_TEST = "meta_chexpert_race_train.csv", "meta_chexpert_race_test.csv", "meta_mimic_race_test.csv"


def chest_absolute(ctx: Ctx) -> None:
    write_image(ctx.outside / "x.jpg", 5, rgb=False)
    set_cell(ctx.root / CHEX_TRAIN, 0, "filename", str(ctx.outside / "x.jpg"))


def chest_mimic_dotdot(ctx: Ctx) -> None:
    write_image(ctx.outside / "y.jpg", 5, rgb=False)
    set_cell(ctx.root / MIMIC_TEST, 1, "filename", "../../outside/y.jpg")  # relative to data.root/files_336p


def chest_victim(ctx: Ctx) -> Path:
    return ctx.root / first(ctx.root / CHEX_TEST)


def chest_latin1(ctx: Ctx) -> None:
    path = ctx.root / CHEX_TRAIN
    path.write_bytes(path.read_bytes().replace(b"patient00001", "patiént00001".encode("latin-1")))


def chest_header_only(ctx: Ctx) -> None:
    edit_csv(ctx.root / CHEX_TEST, lambda frame: frame.iloc[:0])


def chest_duplicate(ctx: Ctx) -> None:
    edit_csv(ctx.root / CHEX_TRAIN, lambda frame: pd.concat([frame, frame.iloc[[2]]]))


# Oph: victims are row 0 of site 1's race test CSV.
OPH_TRAIN, OPH_TEST = "meta_site1_race_train.csv", "meta_site1_race_test.csv"


def oph_victim(ctx: Ctx) -> Path:
    return ctx.root / "all" / first(ctx.root / OPH_TEST)


def oph_rewrite(ctx: Ctx, drop_column: str | None = None, **replace: object) -> None:
    """Rewrite the victim npz with some arrays replaced (and drop a CSV column so the npz is read)."""
    path = oph_victim(ctx)
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays.update({k: np.asarray(v) for k, v in replace.items()})
    np.savez(path, **arrays)
    if drop_column:
        edit_csv(ctx.root / OPH_TEST, lambda frame: frame.drop(columns=[drop_column]))


def oph_dotdot(ctx: Ctx) -> None:
    shutil.copy(oph_victim(ctx), ctx.outside / "z.npz")
    set_cell(ctx.root / OPH_TRAIN, 0, "filename", "../../outside/z.npz")


def oph_header_bomb(ctx: Ctx) -> None:
    """slo_fundus's npy header declares 10^10 pixels; no data follows."""
    path = oph_victim(ctx)
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k != "slo_fundus"}
    with zipfile.ZipFile(path, "w") as archive:
        with archive.open("slo_fundus.npy", "w") as stream:
            np.lib.format.write_array_header_1_0(stream, {"descr": "|u1", "fortran_order": False, "shape": (100_000, 100_000)})
        for key, value in arrays.items():
            with archive.open(f"{key}.npy", "w") as stream:
                np.lib.format.write_array(stream, value)


def oph_duplicate(ctx: Ctx) -> None:
    edit_csv(ctx.root / OPH_TRAIN, lambda frame: pd.concat([frame, frame.iloc[[3]]]))


def oph_train_test_overlap(ctx: Ctx) -> None:
    test_row = pd.read_csv(ctx.root / OPH_TEST, dtype=str, keep_default_na=False).iloc[[0]]
    edit_csv(ctx.root / OPH_TRAIN, lambda frame: pd.concat([frame, test_row]))


def medmnist_file(ctx: Ctx) -> Path:
    return ctx.root / "pneumoniamnist.npz"


def medmnist_replace(**replace: np.ndarray) -> Callable[[Ctx], None]:
    return lambda ctx: write_medmnist(ctx.root, **replace)


def medmnist_flag_outside(ctx: Ctx) -> None:
    shutil.copy(medmnist_file(ctx), ctx.outside / "pneumoniamnist.npz")


def pixel_limit(limit: int) -> Callable[[Ctx], None]:
    return lambda ctx: ctx.monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)


# --- the catalogue ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    dataset: str
    breaks: Callable[[Ctx], None]
    match: str  # regex the DataError must match; it names the culprit (file, row or column)
    load: bool = False  # the error comes from reading pixels (in the actor), not metadata
    kw: dict[str, object] = field(default_factory=dict)


CASES = [
    # paths that leave data.root (issue 14.3)
    Case("isic-absolute-image", "isic", isic_absolute, r"train_test_split: 1 image value\(s\) are not paths relative to data.root/ISIC_2019_Training_Input_preprocessed \(row 0: '/.*/outside/secret' is an absolute path\)"),
    Case("isic-dotdot-image", "isic", isic_dotdot, r"train_test_split: 1 image value\(s\) are not paths relative .* \(row 0: '\.\./\.\./outside/secret' contains a '\.\.' component\)"),
    Case("chest-absolute-filename", "chest", chest_absolute, r"meta_chexpert_race_train.csv: 1 filename value\(s\) are not paths relative to data.root \(row 0: '/.*/outside/x.jpg' is an absolute path\)"),
    Case("chest-mimic-dotdot-filename", "chest", chest_mimic_dotdot, r"meta_mimic_race_test.csv: 1 filename value\(s\) are not paths relative to data.root/\{files_336p,mimic\} \(row 1: '\.\./\.\./outside/y.jpg' contains"),
    Case("oph-dotdot-filename", "oph", oph_dotdot, r"meta_site1_race_train.csv: 1 filename value\(s\) are not paths relative to data.root/all \(row 0: '\.\./\.\./outside/z.npz' contains a '\.\.' component\)"),
    Case("medmnist-flag-is-a-path", "medmnist", medmnist_flag_outside, r"data.flag='\.\./outside/pneumoniamnist': expected the name of an npz file in data.root", kw={"flag": "../outside/pneumoniamnist"}),
    # decompression bombs (issue 14.3) and their npz twin
    Case("chest-png-bomb", "chest", lambda c: chest_victim(c).write_bytes(png_claiming(100_000, 100_000)), r"view1_frontal.jpg: not a readable image: 10000000000 pixels, over the limit of 89478485 \(PIL's Image.MAX_IMAGE_PIXELS; a decompression bomb or a corrupt header\)", load=True),
    Case("isic-over-pil-limit", "isic", pixel_limit(100), rf"{ISIC_VICTIM}.jpg: not a readable image: 120 pixels, over the limit of 100 \(PIL's", load=True),
    Case("oph-npz-header-bomb", "oph", oph_header_bomb, r"data_\d+.npz: slo_fundus declares shape \(100000, 100000\) = 10000000000 values, over the limit of 89478485", load=True),
    Case("oph-npz-over-pil-limit", "oph", pixel_limit(500), r"data_\d+.npz: slo_fundus declares shape \(32, 32\) = 1024 values, over the limit of 500", load=True),
    # truncated or corrupt files
    Case("isic-truncated-jpeg", "isic", lambda c: truncate(isic_victim(c)), rf"{ISIC_VICTIM}.jpg: not a readable image \((image file is truncated|Truncated File Read)", load=True),
    Case("chest-truncated-png", "chest", lambda c: (write_image(chest_victim(c), 1, rgb=False, fmt="PNG"), truncate(chest_victim(c))), r"view1_frontal.jpg: not a readable image \(", load=True),
    Case("oph-truncated-npz", "oph", lambda c: truncate(oph_victim(c)), r"data_\d+.npz: not a readable npz file", load=True),
    Case("medmnist-truncated-npz", "medmnist", lambda c: truncate(medmnist_file(c)), r"pneumoniamnist.npz: not a readable npz file with keys train_images"),
    # wrong array rank, shape or type
    Case("oph-fundus-3d", "oph", lambda c: oph_rewrite(c, slo_fundus=np.zeros((2, 32, 32), np.uint8)), r"data_\d+.npz: slo_fundus must be a 2D uint8 array, got uint8 \(2, 32, 32\)", load=True),
    Case("oph-fundus-float", "oph", lambda c: oph_rewrite(c, slo_fundus=np.zeros((32, 32), np.float32)), r"data_\d+.npz: slo_fundus must be a 2D uint8 array, got float32", load=True),
    Case("oph-npz-race-not-scalar", "oph", lambda c: oph_rewrite(c, "race", race=np.array([0, 1])), r"data_\d+.npz: race must be a scalar .*, got int64 of shape \(2,\)"),
    Case("medmnist-flat-images", "medmnist", medmnist_replace(train_images=np.zeros((24, 64), np.uint8)), r"pneumoniamnist.npz: train_images must be uint8 images \(N, H, W\) or \(N, H, W, 3\), got uint8 \(24, 64\)"),
    Case("medmnist-count-mismatch", "medmnist", medmnist_replace(test_images=np.zeros((11, 8, 8), np.uint8)), r"pneumoniamnist.npz: test_images has 11 images but test_labels has 12 labels"),
    # CSV problems
    Case("chest-missing-column", "chest", lambda c: edit_csv(c.root / CHEX_TEST, lambda f: f.drop(columns=["race_label"])), r"meta_chexpert_race_test.csv: missing required column\(s\) 'race_label'"),
    Case("chest-not-utf8", "chest", chest_latin1, r"meta_chexpert_race_train.csv: not a readable CSV: not UTF-8 text \(byte \d+: invalid continuation byte\)"),
    Case("isic-empty-split-file", "isic", lambda c: (c.root / ISIC_SPLIT).write_bytes(b""), r"train_test_split: not a readable CSV \(No columns to parse from file\)"),
    # duplicate sample ids
    Case("chest-duplicate-filename", "chest", chest_duplicate, r"meta_chexpert_race_train.csv: 1 filenames listed more than once \(first: CheXpert-v1.0-small/train/patient00002/"),
    Case("isic-duplicate-image", "isic", lambda c: set_cell(c.root / ISIC_SPLIT, 1, "image", ISIC_VICTIM), rf"train_test_split: 1 images listed more than once \(first: {ISIC_VICTIM}\)"),
    Case("oph-duplicate-filename", "oph", oph_duplicate, r"meta_site1_race_train.csv: 1 filenames listed more than once \(first: data_\d+.npz\)"),
    Case("oph-train-test-overlap", "oph", oph_train_test_overlap, r"meta_site1_race_train.csv, meta_site1_race_test.csv: 1 files are in both train and test \(first: data_\d+.npz\)"),
    # unknown group codes and labels
    Case("chest-unknown-race-code", "chest", lambda c: set_cell(c.root / CHEX_TRAIN, 3, "race_label", "9"), r"meta_chexpert_race_train.csv: row 3: race_label='9' is neither a code \(0=White, 1=Asian, 2=Black\) nor unknown"),
    Case("oph-unknown-race-text", "oph", lambda c: set_cell(c.root / OPH_TEST, 1, "race", "martian"), r"meta_site1_race_test.csv: row 1: race='martian' is neither a known value \(asian, black, white, unknown\)"),
    Case("oph-npz-race-nan", "oph", lambda c: oph_rewrite(c, "race", race=np.float64("nan")), r"data_\d+.npz: race=nan is neither a code 0\.\.2 nor -1"),
    Case("oph-npz-label-7", "oph", lambda c: oph_rewrite(c, "glaucoma", glaucoma=7), r"data_\d+.npz: glaucoma=7 is not 0 or 1"),
    # a client with an empty split
    Case("isic-center-without-test", "isic", isic_no_test_rows_for_center5, r"center5: no samples left in train or test after the drop rules"),
    Case("chest-header-only-test-csv", "chest", chest_header_only, r"chexpert: no samples left in train or test after the drop rules"),
    # huge values
    Case("isic-huge-age", "isic", lambda c: set_cell(c.root / ISIC_META, 2, "age_approx", "1e308"), r"Metadata_FL.csv: row 2: age_approx='1e308' is neither an age in years \(0-130\)"),
    Case("isic-huge-target", "isic", lambda c: set_cell(c.root / ISIC_SPLIT, 4, "target", "1e20"), r"train_test_split: row 4: target='1e20' is not an integer code 0\.\.7"),
    Case("chest-infinite-label", "chest", lambda c: set_cell(c.root / CHEX_TEST, 2, "disease_label", "inf"), r"meta_chexpert_race_test.csv: row 2: disease_label='inf' is not 0 or 1"),
    Case("medmnist-huge-label", "medmnist", medmnist_replace(train_labels=np.r_[np.arange(23) % 2, 10**9].astype(np.int64)[:, None]), r"pneumoniamnist.npz: labels run up to 1000000000, but only 3 distinct values occur \(0, 1, 1000000000\)"),
    # missing files
    Case("oph-missing-npz", "oph", lambda c: oph_victim(c).unlink(), r"meta_site1_race_test.csv: 1 listed files are missing from .*/all \(first: data_\d+.npz\)"),
    Case("chest-missing-image", "chest", lambda c: chest_victim(c).unlink(), r"meta_chexpert_race_test.csv: 1 of 3 listed images are missing from .* \(first: CheXpert-v1.0-small/test/patient00000/"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_input_is_a_data_error_naming_the_culprit(case: Case, pristine: dict[str, Path], request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    origin = request.getfixturevalue("oph_root") if case.dataset == "oph" else pristine[case.dataset]
    root = Path(shutil.copytree(origin, tmp_path / case.dataset))
    outside = tmp_path / "outside"
    outside.mkdir()
    case.breaks(Ctx(root, outside, monkeypatch))
    source = make_source(case.dataset, root, **case.kw)
    if case.load:
        specs = source.client_specs()  # metadata is fine: the pixels are not
        with pytest.raises(DataError, match=case.match):
            for spec in specs:
                for split in spec.splits:
                    source.load(spec, split)
    else:
        with pytest.raises(DataError, match=case.match):
            load_everything(source)


def test_catalogue_is_broad() -> None:
    assert len(CASES) >= 12 and {c.dataset for c in CASES} == set(SOURCES)
    assert len({c.id for c in CASES}) == len(CASES)


# --- the path rule itself, the load-side guard, symlinks and the inspector --------------------


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("a.jpg", None),
        ("sub/dir/a.jpg", None),
        ("./a.jpg", None),
        ("a..b.jpg", None),
        ("/etc/passwd", "is an absolute path"),
        ("../a.jpg", "contains a '..' component"),
        ("sub/../../a.jpg", "contains a '..' component"),
        ("sub\\..\\..\\a.jpg", "contains a '..' component"),
        ("C:\\data\\a.jpg", "starts with a drive or root (absolute on Windows)"),
        ("", "is empty"),
        ("a\0b", "contains a NUL byte"),
    ],
)
def test_path_problem(name: str, problem: str | None) -> None:
    assert path_problem(name) == problem


def test_load_refuses_an_escaping_name_even_without_client_specs(pristine: dict[str, Path], tmp_path: Path) -> None:
    """A spec built elsewhere (or tampered with) cannot make an actor read outside data.root."""
    write_image(tmp_path / "x.jpg", 0, rgb=False)
    table = SampleTable(np.array([str(tmp_path / "x.jpg")]), np.array([0]), {"race": np.array([0])})
    spec = ClientSpec("chexpert", {"test": table})
    with pytest.raises(DataError, match=rf"file name '{tmp_path / 'x.jpg'}' is an absolute path; expected a path relative to data.root \({pristine['chest']}\)"):
        make_source("chest", pristine["chest"]).load(spec, "test")
    isic = ClientSpec("center0", {"test": SampleTable(np.array(["../../x"]), np.array([0]), {"sex": np.array([0]), "age": np.array([0])})})
    with pytest.raises(DataError, match=r"file name '\.\./\.\./x.jpg' contains a '\.\.' component; expected a path relative to data.root/ISIC_2019_Training_Input_preprocessed"):
        make_source("isic", pristine["isic"]).load(isic, "test")


def test_symlinks_inside_the_root_are_followed(pristine: dict[str, Path], tmp_path: Path) -> None:
    """The rule is on the metadata text: a data owner may link folders in (prepare_chest --link)."""
    root = Path(shutil.copytree(pristine["chest"], tmp_path / "chest"))
    release = tmp_path / "elsewhere" / "CheXpert-v1.0-small"
    release.parent.mkdir()
    shutil.move(root / "CheXpert-v1.0-small", release)
    (root / "CheXpert-v1.0-small").symlink_to(release, target_is_directory=True)
    source = make_source("chest", root)
    spec = source.client_specs()[0]
    assert source.load(spec, "test").images.shape == (3, 1, 8, 8)


def test_inspector_lists_escaping_rows_and_bombs(pristine: dict[str, Path], tmp_path: Path) -> None:
    root = Path(shutil.copytree(pristine["chest"], tmp_path / "chest"))
    outside = tmp_path / "outside"
    outside.mkdir()
    chest_absolute(Ctx(root, outside, pytest.MonkeyPatch()))
    set_cell(root / CHEX_TRAIN, 4, "filename", "../x.jpg")
    _, problems = inspect(make_source("chest", root))
    assert len(problems) == 1
    assert "meta_chexpert_race_train.csv: 2 filename value(s) are not paths relative to data.root" in problems[0]
    assert f"row 0: '{outside / 'x.jpg'}' is an absolute path; row 4: '../x.jpg' contains a '..' component" in problems[0]

    root = Path(shutil.copytree(pristine["chest"], tmp_path / "chest2"))
    victims = pd.read_csv(root / CHEX_TEST)["filename"][:2]
    for name in victims:
        (root / name).write_bytes(png_claiming(100_000, 100_000))
    summary, problems = inspect(make_source("chest", root))
    assert [c["id"] for c in summary["clients"]] == ["chexpert", "mimic"]
    assert problems == [f"chexpert/test: {root / name}: not a readable image: 10000000000 pixels, over the limit of 89478485 (PIL's Image.MAX_IMAGE_PIXELS; a decompression bomb or a corrupt header)" for name in victims]
