"""FairFedMed-Chest: the loader and the prep command on small files in the exact formats."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raysim import config
from raysim.config import DataConfig
from raysim.datasets import DATASETS, DataError
from raysim.datasets.fairfedmed_chest import GROUP_NAMES, FairFedMedChest
from raysim.datasets.prepare_chest import PrepError, main, race_code, require_module

from helpers import load_config, prep_args, tiny_overrides, write_jpeg, write_raw

ATTRS = ("race", "gender", "age")




def source(root: Path, **kw) -> FairFedMedChest:
    return FairFedMedChest(DataConfig(name="fairfedmed_chest", root=str(root), **kw), img_size=16, seed=0)


# --- (a) a FairFedMed-Chest root ------------------------------------------------------------


def site_frame(site: str, split: str, n: int) -> pd.DataFrame:
    """n rows; every race/gender/age group holds both labels; two unknown-race rows (-1 and blank)."""
    rows = []
    for i in range(n):
        key = f"{split}{i:03d}"
        if site == "chexpert":
            filename = f"CheXpert-v1.0-small/train/patient{split}{i:03d}/study1/view1_frontal.jpg"
        else:
            filename = f"p10/p10{i:06d}/s5{split[:2]}{i:05d}/{key}.jpg"
        race: object = i % 3 if i >= 2 else (-1 if i == 0 else "")
        rows.append({"filename": filename, "disease_label": (i // 3) % 2, "race_label": race, "gender_label": (i // 2) % 2, "age_label": (i // 6) % 2, "age": 30 + 5 * i})
    return pd.DataFrame(rows)


def write_chest_root(root: Path, n_train: int = 30, n_test: int = 14) -> None:
    for site in ("chexpert", "mimic"):
        for split, n in (("train", n_train), ("test", n_test)):
            frame = site_frame(site, split, n)
            for attr in ATTRS:
                frame.to_csv(root / f"meta_{site}_{attr}_{split}.csv", index=(attr == "race"))  # race: leading unnamed index
            for seed, filename in enumerate(frame["filename"]):
                write_jpeg(root / ("files_336p" if site == "mimic" else "") / filename, seed)


@pytest.fixture(scope="module")
def chest_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("chest")
    write_chest_root(root)
    return root


@pytest.fixture
def chest_copy(chest_root: Path, tmp_path: Path) -> Path:
    shutil.copytree(chest_root, tmp_path / "chest")
    return tmp_path / "chest"


def test_registered() -> None:
    assert "fairfedmed_chest" in DATASETS.names()
    assert source(Path(".")).group_names == GROUP_NAMES


def test_reads_sites_labels_and_groups(chest_root: Path) -> None:
    specs = source(chest_root).client_specs()
    assert [s.id for s in specs] == ["chexpert", "mimic"]
    for spec in specs:
        train, val, test = (spec.splits[s] for s in ("train", "val", "test"))
        assert not set(train.sample_ids) & set(val.sample_ids)
        for split, table in (("train", [train, val]), ("test", [test])):
            csv = pd.read_csv(chest_root / f"meta_{spec.id}_race_{split}.csv", dtype={"race_label": str}, keep_default_na=False)
            known = csv[~csv["race_label"].isin(["-1", ""])].set_index("filename")
            ids = np.concatenate([t.sample_ids for t in table])
            assert sorted(ids) == sorted(known.index) and len(known) == len(csv) - 2
            for t in table:
                rows = known.loc[list(t.sample_ids)]
                assert list(t.labels) == list(rows["disease_label"])
                assert list(t.attributes["race"]) == [int(r) for r in rows["race_label"]]
                assert list(t.attributes["gender"]) == list(rows["gender_label"])
                assert list(t.attributes["age"]) == list(rows["age_label"])
        assert train.group_counts("race").keys() == {0, 1, 2}


def test_keep_unknown_and_other_attributes(chest_root: Path) -> None:
    kept = source(chest_root, keep_unknown=True).client_specs()[0]
    assert len(kept.splits["test"]) == 14 and set(kept.splits["test"].attributes["race"]) == {-1, 0, 1, 2}
    by_gender = source(chest_root, attribute="gender").client_specs()[1]
    assert len(by_gender.splits["test"]) == 14  # unknown race is dropped only when race is the target
    with pytest.raises(DataError, match=r"data.attribute='language': FairFedMed-Chest has CSVs for race, gender, age only"):
        source(chest_root, attribute="language").client_specs()


def test_load_reads_grayscale_resized(chest_root: Path) -> None:
    src = source(chest_root)
    for spec in src.client_specs():
        shard = src.load(spec, "test")
        assert shard.images.dtype == np.uint8 and shard.images.shape == (len(spec.splits["test"]), 1, 16, 16)
        assert shard.table is spec.splits["test"]


def test_mimic_folder_fallback(chest_copy: Path) -> None:
    (chest_copy / "files_336p").rename(chest_copy / "mimic")
    src = source(chest_copy)
    mimic = src.client_specs()[1]
    assert src.load(mimic, "val").images.shape[1:] == (1, 16, 16)
    shutil.rmtree(chest_copy / "mimic")
    with pytest.raises(DataError, match=r"meta_mimic_race_train.csv: 30 of 30 listed images are missing from .*files_336p or .*mimic \(first: p10/"):
        src.client_specs()
    with pytest.raises(DataError, match=r"mimic: image 'p10/.*' not found \(tried .*files_336p/p10/.*, .*mimic/p10/"):
        src.load(mimic, "val")


def test_missing_column_is_named(chest_copy: Path) -> None:
    path = chest_copy / "meta_chexpert_race_test.csv"
    pd.read_csv(path).drop(columns=["disease_label"]).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"meta_chexpert_race_test.csv: missing required column\(s\) 'disease_label'"):
        source(chest_copy).client_specs()


@pytest.mark.parametrize("value", ["7", "Asian"])
def test_bad_race_code_names_file_row_and_expected(chest_copy: Path, value: str) -> None:
    path = chest_copy / "meta_mimic_race_train.csv"
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.loc[4, "race_label"] = value
    frame.to_csv(path, index=False)
    with pytest.raises(DataError, match=rf"meta_mimic_race_train.csv: row 4: race_label='{value}' is neither a code \(0=White, 1=Asian, 2=Black\) nor unknown"):
        source(chest_copy).client_specs()


def test_missing_image_is_counted(chest_copy: Path) -> None:
    victims = pd.read_csv(chest_copy / "meta_chexpert_race_test.csv")["filename"][:2]
    for name in victims:
        (chest_copy / name).unlink()
    with pytest.raises(DataError, match=rf"meta_chexpert_race_test.csv: 2 of 14 listed images are missing from .* \(first: {victims[0]}, {victims[1]}\)"):
        source(chest_copy).client_specs()


def test_corrupt_jpeg_is_named_in_load(chest_copy: Path) -> None:
    src = source(chest_copy)
    spec = src.client_specs()[0]
    victim = spec.splits["test"].sample_ids[0]
    (chest_copy / victim).write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match=rf"{victim}: not a readable image"):
        src.load(spec, "test")


# --- (b) raw releases for the prep command ------------------------------------------------------

# patient, study, sex, age, Pleural Effusion (frontal view; every study also has a lateral view)
# subject, study, frontal ViewPosition, Pleural Effusion (None: blank; "missing": no label row)
# subject: gender, anchor_age, anchor_year (studies are in 2180: age = anchor_age + 2180 - anchor_year)






@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("raw")
    return write_raw(base)


def read_site(out: Path, site: str, attr: str = "race") -> pd.DataFrame:
    return pd.concat([pd.read_csv(out / f"meta_{site}_{attr}_{s}.csv").assign(split=s) for s in ("train", "test")], ignore_index=True)


def test_prep_rules_and_report(raw: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(prep_args(raw, out, "--test-fraction", "0.4", "--link")) == 0
    printed = capsys.readouterr().out
    assert "chexpert: kept 7 rows (6 patients; " in printed
    assert "dropped 15: lateral 11, uncertain label 2, no label row 0, missing demographics 1, conflicting race 0, unknown race 1" in printed
    assert "mimic: kept 5 rows (4 patients; " in printed
    assert "dropped 17: lateral 11, uncertain label 1, no label row 1, missing demographics 1, conflicting race 1, unknown race 2" in printed
    assert sorted(p.name for p in out.glob("meta_*.csv")) == sorted(f"meta_{s}_{a}_{p}.csv" for s in ("chexpert", "mimic") for a in ATTRS for p in ("train", "test"))

    chex = read_site(out, "chexpert").set_index("filename")
    assert all(name.endswith("view1_frontal.jpg") for name in chex.index)
    first = "CheXpert-v1.0-small/train/patient{:05d}/study{}/view1_frontal.jpg".format
    assert chex.loc[first(1, 2), "disease_label"] == 0  # blank = 0
    assert list(chex.loc[[first(1, 1), first(2, 1), first(3, 1), first(4, 1), first(5, 1), first(8, 1)], "race_label"]) == [0, 1, 2, 0, 1, 2]
    assert chex.loc[first(3, 1), "gender_label"] == 1 and chex.loc[first(1, 1), "gender_label"] == 0
    assert list(chex.loc[[first(1, 1), first(2, 1), first(4, 1), first(8, 1)], "age_label"]) == [0, 1, 0, 1]  # 45, 60, 59 (table), 65
    mimic = read_site(out, "mimic").set_index("patient_id")
    assert sorted(set(mimic.index)) == [10000001, 10000002, 10000003, 10000006]
    assert mimic.loc[10000006, "race_label"] == 0 and mimic.loc[10000002, "race_label"] == 1 and mimic.loc[10000003, "race_label"] == 2
    assert mimic.loc[10000001, "age_label"].tolist() == [1, 1] and mimic.loc[10000006, "age_label"] == 1 and mimic.loc[10000003, "age_label"] == 1  # 60, 60, 69
    assert mimic.loc[10000002, "age_label"] == 0 and mimic.loc[10000002, "gender_label"] == 1
    assert "files/p10/p10000001/s50000001/d500000010.jpg" in set(mimic["filename"])
    for site in ("chexpert", "mimic"):
        frame = read_site(out, site)
        assert not set(frame[frame["split"] == "train"]["patient_id"]) & set(frame[frame["split"] == "test"]["patient_id"])
        assert (frame["split"] == "test").any() and (frame["split"] == "train").any()
        for attr in ("gender", "age"):
            pd.testing.assert_frame_equal(read_site(out, site, attr), frame)

    # the prepared root, linked into place, loads (MIMIC through the mimic/ folder)
    src = source(out, val_fraction=0.2)
    specs = src.client_specs()
    assert sum(len(t) for t in specs[0].splits.values()) == 7 and sum(len(t) for t in specs[1].splits.values()) == 5
    assert src.load(specs[1], "train").images.shape[1:] == (1, 16, 16)


def test_prep_uncertain_one_and_seeded_split(raw: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(prep_args(raw, tmp_path / "a", "--uncertain", "one")) == 0
    assert "chexpert: kept 8 rows" in capsys.readouterr().out  # both uncertain rows kept, but patient 7 has unknown race
    chex = read_site(tmp_path / "a", "chexpert").set_index("filename")
    assert chex.loc["CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg", "disease_label"] == 1
    assert main(prep_args(raw, tmp_path / "b", "--uncertain", "one")) == 0
    for site in ("chexpert", "mimic"):
        pd.testing.assert_frame_equal(read_site(tmp_path / "a", site), read_site(tmp_path / "b", site))


def test_prep_accepts_mimic_iv_v1_ethnicity_column(raw: dict[str, Path], tmp_path: Path) -> None:
    v1 = tmp_path / "raw_v1"
    assert main(prep_args(write_raw(v1, race_column="ethnicity"), tmp_path / "v1")) == 0
    assert main(prep_args(raw, tmp_path / "v2")) == 0
    pd.testing.assert_frame_equal(read_site(tmp_path / "v1", "mimic"), read_site(tmp_path / "v2", "mimic"))


def test_prep_errors_are_clear(raw: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(PrepError, match=r"reading X.xlsx needs not_a_module_xyz, which is not installed: pip install raysim\[xlsx\]"):
        require_module("not_a_module_xyz", "xlsx", "reading X.xlsx")
    require_module("openpyxl", "xlsx", "reading X.xlsx")
    args = prep_args(raw, tmp_path / "out")
    args[args.index(str(raw["demo"]))] = str(raw["demo"].with_suffix(".csv"))
    assert main(args) == 2  # bad input: the CLI contract's exit code
    assert "CHEXPERT DEMO.csv: expected the CheXpert demographics workbook (.xlsx)" in capsys.readouterr().err
    assert main(prep_args(raw, tmp_path / "out", "--mimic-iv", str(tmp_path))) == 2
    assert f"{tmp_path}/hosp/patients.csv.gz: file not found" in capsys.readouterr().err
    assert [race_code(t) for t in ("WHITE - RUSSIAN", "BLACK/CAPE VERDEAN", "Asian, non-Hispanic", "White and Black", "OTHER", None)] == [0, 2, 1, -1, -1, -1]


# --- end to end ----------------------------------------------------------------------------------


def test_one_round_through_ray_actors(ray_session, chest_root: Path, tmp_path: Path) -> None:
    from raysim.engine.driver import Driver

    overrides = tiny_overrides(chest_root, **{"data.name": "fairfedmed_chest", "federation.rounds": 1, "eval.bootstrap": 0})
    cfg = load_config(None, overrides)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(config.dump(cfg))
    Driver(cfg, run_dir, echo=lambda _: None).run()
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    auc = metrics[(metrics["metric"] == "auc") & (metrics["split"] == "test")]
    assert {"chexpert", "mimic", "mean"} <= set(auc[auc["group"] == ""]["client"])
    assert set(auc[(auc["attribute"] == "race") & (auc["group"] != "")]["group"]) == {"White", "Asian", "Black"}
    assert set(auc[(auc["attribute"] == "gender") & (auc["group"] != "")]["group"]) == {"Male", "Female"}
