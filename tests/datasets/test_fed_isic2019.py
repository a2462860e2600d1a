"""The Fed-ISIC2019 loader on a tiny set in FLamby's exact layout, bad input, and one real run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from raysim.config import DataConfig
from raysim.datasets import DATASETS, DataError
from raysim.datasets.fed_isic2019 import FedISIC2019
from raysim.datasets.imaging import resize_chw
from raysim.engine.driver import Driver

from helpers import load_config, tiny_overrides

ONE_HOT = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
TRAIN, TEST = 8, 3  # rows per center
AGES = ("25.0", "45.0", "70.0", "")  # cycled; bins 0, 1, 2, unknown
AGE_CODE = {"25.0": 0, "45.0": 1, "70.0": 2, "": -1}
SEX_CODE = {"female": 0, "male": 1, "": -1}
BLANK_SEX = "ISIC_0000510"  # center 5, last test row


def image_name(center: int, j: int) -> str:
    return f"ISIC_{center * 100 + j:07d}"


def write_isic(root: Path) -> None:
    """6 centers x (8 train + 3 test) rows, 40x32 RGB JPEGs, split file and metadata CSV."""
    images = root / "ISIC_2019_Training_Input_preprocessed"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    split, meta = [], []
    for center in range(6):
        a, b = center, (center + 3) % 8
        for j in range(TRAIN + TEST):
            name = image_name(center, j)
            fold = "train" if j < TRAIN else "test"
            target = (a if j < 4 else b) if j < TRAIN else (a if j == TRAIN else b)
            one_hot = {c: f"{float(k == target):.1f}" for k, c in enumerate(ONE_HOT)}
            split.append({"image": name, **one_hot, "target": target, "center": center, "fold": fold, "fold2": f"{fold}_{center}"})
            sex = "" if name == BLANK_SEX else ("female", "male")[j % 2]
            meta.append({"image": name, "age_approx": AGES[j % 4], "anatom_site_general": "torso", "sex": sex, "dataset": "BCN_nan"})
            Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(images / f"{name}.jpg", quality=90)
    meta.append({"image": "ISIC_9999999", "age_approx": "", "anatom_site_general": "", "sex": "", "dataset": ""})  # not in the split
    pd.DataFrame(split).to_csv(root / "train_test_split", index=False)
    pd.DataFrame(meta).to_csv(root / "ISIC_2019_Training_Metadata_FL.csv", index=False)


@pytest.fixture(scope="module")
def isic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("isic")
    write_isic(root)
    return root


@pytest.fixture
def isic_copy(isic_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(isic_root, tmp_path / "isic"))


def source(root: Path, seed: int = 0, **kw: object) -> FedISIC2019:
    return FedISIC2019(DataConfig(name="fed_isic2019", root=str(root), **kw), img_size=16, seed=seed)


def edit_csv(path: Path, row: int, column: str, value: str) -> None:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.loc[row, column] = value
    frame.to_csv(path, index=False)


def test_registered_with_its_datasheet_constants() -> None:
    cls = DATASETS.get("fed_isic2019")
    assert cls is FedISIC2019 and cls.num_classes == 8 and cls.channels == 3 and cls.default_attribute == "sex"
    assert source(".").group_names == {"sex": {0: "Female", 1: "Male"}, "age": {0: "<30", 1: "30-59", 2: "60+"}}


def test_six_centers_with_train_val_test_counts(isic_root: Path) -> None:
    specs = source(isic_root, attribute="sex", keep_unknown=True).client_specs()
    assert [s.id for s in specs] == [f"center{c}" for c in range(6)]
    for spec in specs:
        train, val, test = (spec.splits[s] for s in ("train", "val", "test"))
        assert len(train) + len(val) == TRAIN and len(test) == TEST
        assert len(val) == 2  # round(0.15 * 4) per label, two labels per center
    # without keep_unknown, the row whose sex (the target attribute) is blank is dropped
    dropped = source(isic_root, attribute="sex").client_specs()
    assert [len(s.splits["test"]) for s in dropped] == [3, 3, 3, 3, 3, 2]
    assert BLANK_SEX not in set(dropped[5].splits["test"].sample_ids)
    # with age as the target attribute, every center loses its two train rows of blank age
    by_age = source(isic_root, attribute="age").client_specs()
    assert [(len(s.splits["train"]) + len(s.splits["val"]), len(s.splits["test"])) for s in by_age] == [(6, 3)] * 6


def test_labels_and_group_codes_follow_the_csv_files(isic_root: Path) -> None:
    split = pd.read_csv(isic_root / "train_test_split", dtype=str, keep_default_na=False).set_index("image")
    meta = pd.read_csv(isic_root / "ISIC_2019_Training_Metadata_FL.csv", dtype=str, keep_default_na=False).set_index("image")
    seen = set()
    for spec in source(isic_root, attribute="sex", keep_unknown=True).client_specs():
        for name, table in spec.splits.items():
            ids = list(table.sample_ids)
            seen |= set(ids)
            assert list(table.labels) == [int(split.loc[i, "target"]) for i in ids]
            assert list(table.attributes["sex"]) == [SEX_CODE[meta.loc[i, "sex"]] for i in ids]
            assert list(table.attributes["age"]) == [AGE_CODE[meta.loc[i, "age_approx"]] for i in ids]
            assert {split.loc[i, "center"] for i in ids} == {spec.id.removeprefix("center")}
            assert {split.loc[i, "fold"] for i in ids} == {"test" if name == "test" else "train"}
            assert table.labels.dtype == np.int64 and table.attributes["sex"].dtype == np.int64
    assert seen == set(split.index)
    # spot checks against hand-written values
    center0 = {}
    for t in source(isic_root, attribute="sex", keep_unknown=True).client_specs()[0].splits.values():
        center0.update({i: (lbl, sex, age) for i, lbl, sex, age in zip(t.sample_ids, t.labels, t.attributes["sex"], t.attributes["age"])})
    assert center0[image_name(0, 0)] == (0, 0, 0)  # MEL, female, 25
    assert center0[image_name(0, 5)] == (3, 1, 1)  # AK, male, 45
    assert center0[image_name(0, 7)] == (3, 1, -1)  # AK, male, age blank
    assert center0[image_name(0, 10)] == (3, 0, 2)  # test row: AK, female, 70


def test_validation_split_is_disjoint_stratified_and_seeded(isic_root: Path) -> None:
    first = source(isic_root, attribute="sex").client_specs()
    again = source(isic_root, attribute="sex").client_specs()
    other = source(isic_root, seed=1, attribute="sex").client_specs()
    for spec, same in zip(first, again):
        train, val = spec.splits["train"], spec.splits["val"]
        assert not set(train.sample_ids) & set(val.sample_ids)
        assert len(set(val.labels)) == 2  # one of each of the center's two labels
        assert list(val.sample_ids) == list(same.splits["val"].sample_ids)
    assert [list(s.splits["val"].sample_ids) for s in first] != [list(s.splits["val"].sample_ids) for s in other]


def test_load_crops_the_central_square_and_resizes(isic_root: Path) -> None:
    src = source(isic_root, attribute="sex")
    spec = src.client_specs()[2]
    shard = src.load(spec, "test")
    assert shard.images.dtype == np.uint8 and shard.images.shape == (3, 3, 16, 16)
    assert list(shard.table.sample_ids) == list(spec.splits["test"].sample_ids)
    first = np.asarray(Image.open(isic_root / "ISIC_2019_Training_Input_preprocessed" / f"{shard.table.sample_ids[0]}.jpg").convert("RGB"))
    assert first.shape == (32, 40, 3)
    np.testing.assert_array_equal(shard.images[0], resize_chw(first[:, 4:36], 16, 3))


@pytest.mark.parametrize(
    ("file", "row", "column", "value", "message"),
    [
        ("train_test_split", 2, "target", "9", r"train_test_split: row 2: target='9' is not an integer code 0\.\.7"),
        ("train_test_split", 4, "center", "6", r"train_test_split: row 4: center='6' is not an integer code 0\.\.5"),
        ("train_test_split", 1, "fold", "valid", r"train_test_split: row 1: fold='valid' is not one of train, test"),
        ("ISIC_2019_Training_Metadata_FL.csv", 3, "sex", "martian", r"Metadata_FL.csv: row 3: sex='martian' is not one of female, male, blank or unknown"),
        ("ISIC_2019_Training_Metadata_FL.csv", 5, "age_approx", "old", r"Metadata_FL.csv: row 5: age_approx='old' is neither an age"),
    ],
)
def test_bad_values_name_file_row_and_expectation(isic_copy: Path, file: str, row: int, column: str, value: str, message: str) -> None:
    edit_csv(isic_copy / file, row, column, value)
    with pytest.raises(DataError, match=message):
        source(isic_copy, attribute="sex").client_specs()


def test_missing_column_is_named(isic_copy: Path) -> None:
    path = isic_copy / "train_test_split"
    pd.read_csv(path, dtype=str).drop(columns=["center"]).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"train_test_split: missing required column\(s\) 'center'"):
        source(isic_copy, attribute="sex").client_specs()


def test_missing_metadata_file_names_the_expected_path(isic_copy: Path) -> None:
    (isic_copy / "ISIC_2019_Training_Metadata_FL.csv").unlink()
    with pytest.raises(DataError, match=rf"{isic_copy / 'ISIC_2019_Training_Metadata_FL.csv'}: missing"):
        source(isic_copy, attribute="sex").client_specs()


def test_missing_images_are_counted_and_named(isic_copy: Path) -> None:
    for j in (3, 9):
        (isic_copy / "ISIC_2019_Training_Input_preprocessed" / f"{image_name(4, j)}.jpg").unlink()
    with pytest.raises(DataError, match=rf"2 listed images are missing .* \(first: {image_name(4, 3)}, {image_name(4, 9)}\)"):
        source(isic_copy, attribute="sex").client_specs()


def test_corrupt_jpeg_fails_load_naming_the_file(isic_copy: Path) -> None:
    src = source(isic_copy, attribute="sex")
    spec = src.client_specs()[1]
    victim = spec.splits["train"].sample_ids[0]
    (isic_copy / "ISIC_2019_Training_Input_preprocessed" / f"{victim}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(DataError, match=rf"{victim}\.jpg: not a readable image"):
        src.load(spec, "train")


def test_one_round_through_ray_actors(ray_session, isic_root: Path, tmp_path: Path) -> None:
    overrides = {
        "data.name": "fed_isic2019",
        "data.attribute": "sex",
        "federation.rounds": 1,
        "eval.bootstrap": 0,
        "resources.clients_per_actor": 3,
    }
    cfg = load_config(None, tiny_overrides(isic_root, **overrides))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    Driver(cfg, run_dir, echo=lambda _: None).run()

    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    clients = {f"center{c}" for c in range(6)}
    assert set(metrics["client"]) == clients | {"mean"}
    whole = metrics[(metrics["split"] == "test") & (metrics["attribute"] == "")]
    for name in ("bacc", "auc"):
        assert set(whole[whole["metric"] == name]["client"]) == clients | {"mean"}
    assert whole[whole["metric"] == "bacc"]["value"].between(0, 1).all()
    groups = metrics[metrics["group"] != ""]
    assert set(groups[groups["attribute"] == "sex"]["group"]) == {"Female", "Male"}
    assert set(groups[groups["attribute"] == "age"]["group"]) == {"<30", "30-59", "60+"}

    preds = pd.read_parquet(run_dir / "predictions.parquet")
    scores = [f"score_{k}" for k in range(8)]
    assert set(scores) <= set(preds.columns) and "score" not in preds.columns
    np.testing.assert_allclose(preds[scores].sum(axis=1), 1, rtol=1e-5)
    assert set(preds["client"]) == clients and {"sex", "age"} <= set(preds.columns)
    assert (preds["sex"] != -1).all()  # target attribute unknown -> dropped
