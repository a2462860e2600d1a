"""The synthetic FairFedMed-Oph twin: format, splits, determinism, truth and CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raysim.datasets import synthetic
from raysim.datasets.oph_schema import ATTRIBUTES, CSV_COLUMNS, SITE_ATTRIBUTES, code_from_text

SMALL = {"patients": 120, "fundus_size": 64, "oct_shape": (8, 16, 16)}
SCALARS = ("glaucoma", *ATTRIBUTES, "age")


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("syn")
    return out, synthetic.generate(out, seed=3, **SMALL)


def _files(root: Path) -> dict[str, bytes]:
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in paths}


def test_npz_keys_dtypes_and_shapes(small_set: tuple[Path, dict]) -> None:
    out, _ = small_set
    files = sorted((out / "all").glob("*.npz"))
    assert [f.name for f in files] == [f"data_{i:05d}.npz" for i in range(1, 121)]
    for f in files:
        with np.load(f) as z:
            assert set(z.files) == {"slo_fundus", "oct_bscans", "disc_cup_mask", "oct_onh_bscans", *SCALARS}  # masks, ONH: version 2
            for key in SCALARS:
                assert z[key].shape == (), key
            assert z["age"].dtype.kind == "f" and 20 <= z["age"].item() <= 95
            assert z["glaucoma"].item() in (0, 1)
            assert z["race"].item() in (0, 1, 2)
            assert z["gender"].item() in (0, 1)
            for attr in ("ethnicity", "language", "maritalstatus"):
                assert -1 <= z[attr].item() < len(ATTRIBUTES[attr].names)
            assert z["slo_fundus"].dtype == np.uint8 and z["oct_bscans"].dtype == np.uint8
            fundus, oct_ = z["slo_fundus"], z["oct_bscans"]
            assert fundus.shape in ((64, 64), (0, 0))
            assert oct_.shape in ((8, 16, 16), (0, 0, 0))
            assert z["disc_cup_mask"].dtype == np.int8 and z["disc_cup_mask"].shape == fundus.shape
            assert z["oct_onh_bscans"].dtype == np.uint8 and z["oct_onh_bscans"].shape == oct_.shape
            if fundus.size:
                assert fundus.std() > 5  # an image, not a constant


def test_empty_arrays_can_be_forced(tmp_path: Path) -> None:
    truth = synthetic.generate(tmp_path, patients=40, fundus_size=32, oct_shape=(4, 8, 8),
                               empty_fraction=0.25)
    empty_f = empty_o = 0
    for f in (tmp_path / "all").glob("*.npz"):
        with np.load(f) as z:
            empty_f += z["slo_fundus"].shape == (0, 0)
            empty_o += z["oct_bscans"].shape == (0, 0, 0)
    assert empty_f == truth["empty"]["slo_fundus"] and empty_o == truth["empty"]["oct_bscans"]
    assert 10 <= empty_f + empty_o <= 20  # 10 files, each missing one or both modalities
    assert synthetic.generate(tmp_path, patients=40, fundus_size=32, oct_shape=(4, 8, 8),
                              empty_fraction=0.0)["empty"] == {"slo_fundus": 0, "oct_bscans": 0}


def test_csv_columns_and_vocabulary(small_set: tuple[Path, dict]) -> None:
    out, _ = small_set
    header = (out / "meta_all.csv").read_text().splitlines()[0]
    assert header == "," + ",".join(CSV_COLUMNS)  # leading unnamed index column
    meta = pd.read_csv(out / "meta_all.csv", index_col=0, keep_default_na=False)
    assert list(meta.columns) == list(CSV_COLUMNS) and len(meta) == 120
    assert set(meta["glaucoma"]) <= {"yes", "no"}
    for attr in ATTRIBUTES:
        assert all(code_from_text(attr, v) is not None for v in meta[attr]), attr
    assert set(meta["race"]) == {"asian", "black", "white"}
    # The CSV text agrees with the npz codes.
    for row in meta.itertuples():
        with np.load(out / "all" / row.filename) as z:
            assert z["glaucoma"].item() == (row.glaucoma == "yes")
            assert z["age"].item() == pytest.approx(row.age)
            for attr in ATTRIBUTES:
                assert z[attr].item() == code_from_text(attr, getattr(row, attr)), attr


def test_site_files_share_patients_and_split(small_set: tuple[Path, dict]) -> None:
    out, truth = small_set
    meta = pd.read_csv(out / "meta_all.csv", index_col=0)
    seen: list[str] = []
    for k in (1, 2, 3):

        def read(attr: str, suffix: str = "", k: int = k) -> pd.DataFrame:
            return pd.read_csv(out / f"meta_site{k}_{attr}{suffix}.csv", index_col=0)

        site, train, test = read("race"), read("race", "_train"), read("race", "_test")
        assert list(site.columns) == list(CSV_COLUMNS)
        assert not set(train["filename"]) & set(test["filename"])
        assert set(train["filename"]) | set(test["filename"]) == set(site["filename"])
        assert len(train) == truth["counts"][f"site{k}"]["train"]["all"]
        assert len(test) == truth["counts"][f"site{k}"]["test"]["all"]
        for attr in SITE_ATTRIBUTES:  # the site is physical: every attribute, same patients
            for suffix, ref in (("", site), ("_train", train), ("_test", test)):
                assert read(attr, suffix).equals(ref), (attr, suffix)
        seen += list(site["filename"])
    assert sorted(seen) == sorted(meta["filename"])  # sites partition meta_all


def test_deterministic_by_seed(tmp_path: Path) -> None:
    kw = {"patients": 30, "fundus_size": 32, "oct_shape": (4, 8, 8), "empty_fraction": 0.1}
    a, b, c = (synthetic.generate(tmp_path / n, seed=s, **kw) for n, s in zip("abc", (5, 5, 6)))
    fa, fb, fc = (_files(tmp_path / n) for n in "abc")
    assert a == b and fa == fb  # byte-identical, truth.json and npz timestamps included
    assert len(fa) == 30 + 1 + 1 + 3 * 4 * 3
    assert fa["meta_all.csv"] != fc["meta_all.csv"]
    assert fa["all/data_00001.npz"] != fc["all/data_00001.npz"]


def test_truth_json_has_parameters_counts_and_oracle(small_set: tuple[Path, dict]) -> None:
    out, truth = small_set
    assert json.loads((out / "truth.json").read_text()) == json.loads(json.dumps(truth))
    assert truth["params"] == synthetic.generator_params(seed=3, **SMALL)
    assert set(truth["sites"]) == {"site1", "site2", "site3"}
    for site in truth["sites"].values():
        assert {"gamma", "brightness", "blur", "noise", "prevalence", "male_share",
                "race_mix", "language_mix", "ethnicity_mix"} <= set(site)
    assert set(truth["races"]) == {"Asian", "Black", "White"}
    total = sum(c[s]["all"] for c in truth["counts"].values() for s in ("train", "test"))
    assert total == 120
    for k in (1, 2, 3):
        o = truth["oracle"][f"site{k}"]
        for key in ("oracle_auc", "blind_cup_auc"):
            assert set(o[key]) == {"all", "Asian", "Black", "White"}
            assert all(v is None or 0.0 <= v <= 1.0 for v in o[key].values())
        assert o["oracle_auc"]["all"] > 0.9
        assert o["oracle_gap"] is None or o["oracle_gap"] >= 0
    mean = truth["oracle_mean_over_sites"]
    assert set(mean["oracle_auc"]) == {"all", "Asian", "Black", "White"} and mean["oracle_gap"] >= 0


def test_mechanisms_in_the_latents() -> None:
    """Large latent-only draw: the oracle is group-fair, a blind size rule is not."""
    df = synthetic._draw_latents(synthetic.generator_params(patients=30000, test_fraction=0.5))
    by_race = df.groupby("race")
    assert by_race["disc_area"].mean()[1] > by_race["disc_area"].mean()[2] + 0.5  # Black > White
    assert by_race["pigment"].mean().idxmax() == 1
    # Prevalence does not depend on race (no label shortcut in the group).
    assert np.ptp(by_race["glaucoma"].mean()) < 0.03
    oracle = synthetic._oracle(df)
    for o in oracle.values():
        assert min(o["oracle_auc"][r] for r in ("Asian", "Black", "White")) > 0.97
        assert o["oracle_gap"] < 0.01
        fpr = o["blind_cup_fpr_at_white_threshold"]
        assert fpr["Black"] > 2 * fpr["White"]  # a majority-tuned size rule over-calls Black


def test_generator_params_validate() -> None:
    assert synthetic.generator_params()["patients"] == synthetic.DEFAULT_PATIENTS
    for bad in ({"patients": 5}, {"test_fraction": 1.0}, {"fundus_size": 8},
                {"oct_shape": (4, 4)}, {"empty_fraction": -0.1}):
        with pytest.raises(ValueError):
            synthetic.generator_params(**bad)


def test_cli_refuses_to_overwrite_without_force(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "set"
    args = ["--out", str(out), "--patients", "24", "--fundus-size", "32", "--seed", "1"]
    assert synthetic.main(args) == 0
    printed = capsys.readouterr().out
    assert "site1 test" in printed and "oracle AUC" in printed
    before = _files(out)
    (out / "notes.txt").write_text("mine")
    (out / "all" / "data_99999.npz").write_bytes(b"stale")
    assert synthetic.main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert synthetic.main([*args, "--force"]) == 0
    after = _files(out)
    assert after.pop("notes.txt") == b"mine"  # files it did not write are left alone
    assert after == before  # stale generated files are replaced
