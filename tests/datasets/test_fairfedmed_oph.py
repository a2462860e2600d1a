"""The FairFedMed-Oph loader on files in the exact format (generated), including bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raysim.config import DataConfig
from raysim.datasets import DATASETS, DataError
from raysim.datasets.fairfedmed_oph import FairFedMedOph
from raysim.datasets.oph_schema import ATTRIBUTES


def source(root: Path, **kw) -> FairFedMedOph:
    cfg = DataConfig(name="fairfedmed_oph", root=str(root), **kw)
    return FairFedMedOph(cfg, img_size=16, seed=0)


def test_registered() -> None:
    assert {"fairfedmed_oph", "synthetic"} <= set(DATASETS.names())


def test_reads_sites_splits_and_attribute_codes(oph_root: Path) -> None:
    specs = source(oph_root).client_specs()
    assert [s.id for s in specs] == ["site1", "site2", "site3"]
    for spec in specs:
        csv = pd.read_csv(oph_root / f"meta_{spec.id}_race_train.csv")
        train, val = spec.splits["train"], spec.splits["val"]
        # val is carved from train, disjoint, and together they are the known-race training rows
        assert not set(train.sample_ids) & set(val.sample_ids)
        known = csv[csv["race"] != "unknown"]
        assert sorted([*train.sample_ids, *val.sample_ids]) == sorted(known["filename"])
        assert len(val) == pytest.approx(0.15 * len(known), abs=2)
        # codes follow the CSV text: asian=0, black=1, white=2
        expected = known.set_index("filename")["race"].map({"asian": 0, "black": 1, "white": 2})
        assert list(train.attributes["race"]) == list(expected.loc[list(train.sample_ids)])
        assert set(train.labels) <= {0, 1}
        for attr in ATTRIBUTES:
            assert set(np.unique(train.attributes[attr])) <= {-1, *range(len(ATTRIBUTES[attr].names))}


def test_validation_split_is_seeded(oph_root: Path) -> None:
    a = source(oph_root).client_specs()[0].splits["val"].sample_ids
    b = source(oph_root).client_specs()[0].splits["val"].sample_ids
    other = FairFedMedOph(DataConfig(name="fairfedmed_oph", root=str(oph_root)), img_size=16, seed=1).client_specs()[0]
    assert list(a) == list(b)
    assert list(a) != list(other.splits["val"].sample_ids)


def test_keep_unknown_keeps_minus_one(oph_root: Path) -> None:
    dropped = sum(len(s.splits["test"]) for s in source(oph_root, attribute="language").client_specs())
    kept = sum(len(s.splits["test"]) for s in source(oph_root, attribute="language", keep_unknown=True).client_specs())
    csv_rows = sum(len(pd.read_csv(oph_root / f"meta_site{k}_language_test.csv")) for k in (1, 2, 3))
    assert kept == csv_rows and dropped <= kept


def test_load_resizes_and_skips_empty_arrays(oph_copy: Path) -> None:
    src = source(oph_copy)
    spec = src.client_specs()[0]
    before = src.load(spec, "train")
    assert before.images.dtype == np.uint8 and before.images.shape[1:] == (1, 16, 16)
    assert len(before.images) == len(before.table)
    victim = before.table.sample_ids[0]
    with np.load(oph_copy / "all" / victim) as data:
        arrays = dict(data)
    arrays["slo_fundus"] = np.zeros((0, 0), np.uint8)
    np.savez(oph_copy / "all" / victim, **arrays)
    after = src.load(spec, "train")
    assert len(after.images) == len(after.table) == len(before.table) - 1
    assert victim not in set(after.table.sample_ids)
    assert after.dropped["empty slo_fundus"] == before.dropped.get("empty slo_fundus", 0) + 1


def test_missing_csv_column_is_named(oph_copy: Path) -> None:
    path = oph_copy / "meta_site2_race_train.csv"
    pd.read_csv(path).drop(columns=["filename"]).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"meta_site2_race_train.csv: missing required column\(s\) 'filename'"):
        source(oph_copy).client_specs()


def test_missing_site_csv_is_named(oph_copy: Path) -> None:
    (oph_copy / "meta_site3_race_test.csv").unlink()
    with pytest.raises(DataError, match="meta_site3_race_test.csv"):
        source(oph_copy).client_specs()


def test_unknown_attribute_text_is_an_error(oph_copy: Path) -> None:
    path = oph_copy / "meta_site1_race_test.csv"
    frame = pd.read_csv(path)
    frame.loc[2, "race"] = "martian"
    frame.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"meta_site1_race_test.csv: row 2: race='martian' is neither a known value"):
        source(oph_copy).client_specs()


def test_unknown_npz_code_is_an_error(oph_copy: Path) -> None:
    # Without the CSV column the npz code is used; 7 is neither a race code nor -1.
    path = oph_copy / "meta_site1_race_train.csv"
    frame = pd.read_csv(path)
    frame.drop(columns=["race"]).to_csv(path, index=False)
    victim = frame["filename"].iloc[0]
    with np.load(oph_copy / "all" / victim) as data:
        arrays = dict(data)
    arrays["race"] = np.array(7)
    np.savez(oph_copy / "all" / victim, **arrays)
    with pytest.raises(DataError, match=rf"{victim}: race=7 is neither a code 0..2 nor -1"):
        source(oph_copy).client_specs()


def test_race_as_string_in_npz(oph_copy: Path) -> None:
    path = oph_copy / "meta_site1_race_train.csv"
    frame = pd.read_csv(path)
    frame.drop(columns=["race"]).to_csv(path, index=False)
    victim = frame[frame["race"] == "black"]["filename"].iloc[0]
    with np.load(oph_copy / "all" / victim) as data:
        arrays = dict(data)
    arrays["race"] = np.array("Black or African American")
    np.savez(oph_copy / "all" / victim, **arrays)
    spec = source(oph_copy).client_specs()[0]
    table = spec.splits["train"] if victim in set(spec.splits["train"].sample_ids) else spec.splits["val"]
    assert table.attributes["race"][list(table.sample_ids).index(victim)] == 1


def test_corrupt_npz_is_named(oph_copy: Path) -> None:
    src = source(oph_copy)
    spec = src.client_specs()[0]
    victim = spec.splits["test"].sample_ids[1]
    (oph_copy / "all" / victim).write_bytes(b"this is not a zip file")
    with pytest.raises(DataError, match=rf"{victim}: not a readable npz file"):
        src.load(spec, "test")


def test_missing_npz_file_is_named(oph_copy: Path) -> None:
    victim = pd.read_csv(oph_copy / "meta_site1_race_train.csv")["filename"].iloc[0]
    (oph_copy / "all" / victim).unlink()
    with pytest.raises(DataError, match=rf"listed files are missing .*{victim}"):
        source(oph_copy).client_specs()


def test_attribute_without_site_split(oph_root: Path) -> None:
    with pytest.raises(DataError, match="site splits for race, language, ethnicity, gender"):
        source(oph_root, attribute="maritalstatus").client_specs()


def test_wrong_npz_keys_are_named(oph_copy: Path) -> None:
    src = source(oph_copy)
    spec = src.client_specs()[0]
    victim = spec.splits["test"].sample_ids[0]
    with np.load(oph_copy / "all" / victim) as data:
        arrays = {("fundus" if k == "slo_fundus" else k): v for k, v in data.items()}
    np.savez(oph_copy / "all" / victim, **arrays)
    with pytest.raises(DataError, match=rf"{victim}: missing key 'slo_fundus' \(has: .*fundus"):
        src.load(spec, "test")
