"""Segmentation data: the twin's masks and ONH cube (version 2), the FairSeg reader, the inspector's mask table."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raysim.config import DataConfig
from raysim.datasets import DataError, synthetic, synthetic_render
from raysim.datasets.fairseg import FairSeg, mask_to_classes, resize_mask
from raysim.datasets.inspect import format_summary, inspect
from raysim.datasets.synthetic import SyntheticOph
from raysim.metrics import segmentation as segmetrics

from helpers import LOADER, RACES, disc_cup_codes, write_fairseg, write_patient

ROOT = Path(__file__).resolve().parents[2]
VERSION1_COMMIT = "2eadb2e5aecae743ae649b4242a25d731d849ba8"  # the generator's last version-1 change
SMALL = {"patients": 36, "seed": 5, "fundus_size": 64, "oct_shape": (4, 16, 16), "empty_fraction": 0.1}


# --- the synthetic twin ------------------------------------------------------------------------


def _git_show(path: str) -> str:
    if shutil.which("git") is None:
        pytest.skip("git is not installed: cannot read the version-1 generator")
    proc = subprocess.run(["git", "show", f"{VERSION1_COMMIT}:{path}"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"version-1 generator not in this checkout's history ({proc.stderr.strip()})")
    return proc.stdout


def _version1(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The generator as it was at version 1, imported from git under private module names."""
    render = types.ModuleType("_v1_synthetic_render")
    monkeypatch.setitem(sys.modules, render.__name__, render)  # dataclasses look their module up
    exec(compile(_git_show("datasets/synthetic_render.py"), "v1/synthetic_render.py", "exec"), render.__dict__)
    source = _git_show("datasets/synthetic.py").split("# --- registered data source")[0]  # not "synthetic" twice
    source = source.replace("from raysim.datasets import synthetic_render as render\n", "")
    source = source.replace("from raysim.datasets.synthetic_render import (", f"from {render.__name__} import (")
    generator = types.ModuleType("_v1_synthetic")
    generator.__dict__["render"] = render
    monkeypatch.setitem(sys.modules, generator.__name__, generator)
    exec(compile(source, "v1/synthetic.py", "exec"), generator.__dict__)
    assert generator.GENERATOR_VERSION == 1
    return generator


def _arrays(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    with np.load(path) as z:
        return {k: (z[k].dtype.str, z[k].shape, z[k].tobytes()) for k in z.files}


@pytest.mark.parametrize("population", ["clinical", "public"])
def test_version1_arrays_csvs_and_draws_are_byte_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, population: str) -> None:
    old = _version1(monkeypatch).generate(tmp_path / "v1", population=population, **SMALL)
    new = synthetic.generate(tmp_path / "v2", population=population, **SMALL)
    files = sorted((tmp_path / "v1" / "all").glob("*.npz"))
    assert len(files) == SMALL["patients"]
    for f in files:
        before, after = _arrays(f), _arrays(tmp_path / "v2" / "all" / f.name)
        assert set(after) == {*before, synthetic.MASK_KEY, synthetic.ONH_KEY}
        for key, value in before.items():
            assert after[key] == value, (f.name, key)
    for csv in sorted((tmp_path / "v1").glob("*.csv")):
        assert csv.read_bytes() == (tmp_path / "v2" / csv.name).read_bytes(), csv.name
    assert old["params"]["version"] == 1 and new["params"]["version"] == synthetic.GENERATOR_VERSION == 2
    new["label_model"].pop("onh_oct")
    assert {**new, "params": {**new["params"], "version": 1}} == old  # counts, oracle, empties: the same draws


@pytest.fixture(scope="module")
def big_fundus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("syn128")
    return root, synthetic.generate(root, patients=24, seed=2, fundus_size=128, oct_shape=(8, 32, 32), empty_fraction=0.0)


def _geometry(params: dict, i: int) -> synthetic_render.DiscGeometry:
    """Redraw patient i's fundus to recover the geometry it drew (same stream, same values)."""
    row = list(synthetic._draw_latents(params).itertuples(index=False))[i]
    rng = np.random.default_rng([params["seed"], 1, i])
    return synthetic_render.fundus_and_geometry(row, synthetic.SITES[row.site], params["fundus_size"], rng)[1]


def test_masks_follow_the_drawn_disc_and_cup(big_fundus: tuple[Path, dict]) -> None:
    root, truth = big_fundus
    latents = synthetic._draw_latents(truth["params"])
    checked = 0
    for i, row in enumerate(latents.itertuples(index=False)):
        with np.load(root / "all" / row.filename) as z:
            raw, fundus = z["disc_cup_mask"], z["slo_fundus"]
        assert raw.dtype == np.int8 and raw.shape == fundus.shape and set(np.unique(raw)) == {0, -1, -2}
        labels = mask_to_classes(raw, Path(row.filename), "disc_cup_mask")
        assert fundus[labels >= 1].mean() > fundus[labels == 0].mean() + 20  # the mask sits on the bright disc
        g = _geometry(truth["params"], i)
        assert g.cdr == pytest.approx(row.cdr)
        disc_rows = 128 * g.ry  # the disc's vertical extent in pixels (half-width 64 px per unit)
        assert (labels >= 1).sum() == pytest.approx(np.pi * (64 * g.rx) * (64 * g.ry), rel=0.1)
        if abs(g.oy - g.cy) + g.cdr * g.ry <= g.ry:  # the cup lies inside the disc, so nothing clipped it
            assert segmetrics.vertical_cdr(labels) == pytest.approx(row.cdr, abs=2.5 / disc_rows)  # rasterisation: a row each end
            checked += 1
    assert checked >= 20


def _onh_surface(cdr: float, rnfl: float = 1.0) -> tuple[float, float]:
    """(depth of the surface at the cup centre, NFL pixels far from the disc) of a noise-free ONH cube."""
    site = synthetic_render.SiteStyle(1.0, 0.0, 0.0, 0.0, 0.5, 0.5, (1, 1, 1), (1, 1, 1), (1, 1, 1, 1), (1,) * 6)
    geometry = synthetic_render.DiscGeometry(0.4, 0.0, 0.19, 0.2, 0.4, 0.0, cdr)
    cube = synthetic_render.onh_volume(types.SimpleNamespace(rnfl=rnfl), geometry, site, (9, 96, 63), np.random.default_rng(0)).astype(float)
    centre = cube[4, :, 31]
    surface = int(np.argmax(centre > 0.3 * 255))
    edge = cube[:, :, :3]  # far from the disc: vitreous, then the NFL band (the brightest above the RPE)
    nfl = np.median(((edge > 0.6 * 255) & (np.arange(96)[None, :, None] < 0.6 * 96)).sum(axis=1))
    return surface, float(nfl)


def test_onh_cube_follows_the_same_cdr() -> None:
    small_cup, large_cup = _onh_surface(0.3), _onh_surface(0.8)
    assert large_cup[0] > small_cup[0] + 5  # a larger CDR, a deeper cup
    assert large_cup[1] < small_cup[1]  # and a thinner nerve-fibre layer around the disc
    assert _onh_surface(0.3, rnfl=0.6)[1] < small_cup[1]  # rnfl still thins it (the label's own effect)


def test_synthetic_source_masks(big_fundus: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = big_fundus
    source = SyntheticOph(DataConfig(name="synthetic", root=str(root), keep_unknown=True), img_size=32, seed=0)
    assert source.mask_classes == ("background", "disc", "cup")
    spec = source.client_specs()[0]
    shard = source.load(spec, "test")
    masks = source.load_masks(spec, "test", shard.table.sample_ids)
    assert masks.shape == (len(shard.table), 32, 32) and masks.dtype == np.uint8 and set(np.unique(masks)) == {0, 1, 2}
    with np.load(root / "all" / shard.table.sample_ids[0]) as z:
        expected = resize_mask(mask_to_classes(z["disc_cup_mask"], root, "disc_cup_mask"), 32)
    assert np.array_equal(masks[0], expected)
    old = tmp_path / "v1"
    shutil.copytree(root, old)
    truth = json.loads((old / "truth.json").read_text())
    truth["params"]["version"] = 1
    (old / "truth.json").write_text(json.dumps(truth))
    source = SyntheticOph(DataConfig(name="synthetic", root=str(old), keep_unknown=True), img_size=32, seed=0)
    with pytest.raises(DataError, match="generator version 1, which has no disc/cup masks; regenerate it"):
        source.load_masks(spec, "test", shard.table.sample_ids)


def test_classification_sources_have_no_masks(oph_root: Path) -> None:
    from raysim.datasets.fairfedmed_oph import FairFedMedOph

    source = FairFedMedOph(DataConfig(name="fairfedmed_oph", root=str(oph_root)), img_size=16, seed=0)
    assert source.mask_classes == () and source.label_name == "glaucoma" and source.num_classes == 2
    spec = source.client_specs()[0]
    with pytest.raises(DataError, match="fairfedmed_oph has no segmentation masks"):
        source.load_masks(spec, "test", spec.splits["test"].sample_ids)


# --- the FairSeg reader ------------------------------------------------------------------------

RELEASE = {"image": "slo_fundus", "mask": "disc_cup_mask", "race": {"Asian": 0, "Black": 1, "White": 2}}








def fairseg(root: Path, **kw: object) -> FairSeg:
    return FairSeg(DataConfig(name="fairseg", root=str(root), **kw), img_size=20, seed=0)


@pytest.mark.parametrize("family", [LOADER, RELEASE], ids=["fundus_slo", "slo_fundus"])
def test_reads_both_key_families(tmp_path: Path, family: dict) -> None:
    names = write_fairseg(tmp_path, family)
    source = fairseg(tmp_path)
    specs = source.client_specs()
    assert [s.id for s in specs] == ["client1", "client2", "client3"]  # IID over 3 by default
    assert sorted(n for s in specs for split in ("train", "val") for n in s.splits[split].sample_ids) == names[:9]
    assert sorted(n for s in specs for n in s.splits["test"].sample_ids) == names[9:]
    assert [len(s.splits["test"]) for s in specs] == [2, 2, 2]
    test = {n: i for s in specs for i, n in enumerate(s.splits["test"].sample_ids)}
    for spec in specs:
        table = spec.splits["test"]
        for k, name in enumerate(table.sample_ids):
            i = names.index(name)
            assert RACES[table.attributes["race"][k]] == RACES[i % 3]
            assert table.attributes["age"][k] == (0 if i % 2 else 1)  # days / 365 against 60 years
            assert table.attributes["gender"][k] == 1 and table.attributes["language"][k] == -1
        shard = source.load(spec, "test")
        assert shard.images.shape == (len(table), 1, 20, 20) and shard.images.dtype == np.uint8
        masks = source.load_masks(spec, "test", shard.table.sample_ids)
        assert masks.shape == (len(table), 20, 20) and set(np.unique(masks)) == {0, 1, 2}
        assert np.array_equal(masks[0], resize_mask(mask_to_classes(disc_cup_codes(), tmp_path, "m"), 20))
        assert (masks[0] == 2).sum() < (masks[0] == 1).sum()  # codes -1 -> 1 (rim), -2 -> 2 (cup)
    assert len(test) == 6 and source.group_names["age"] == {0: "<60", 1: "60+"}


def test_mask_codes_and_mapping() -> None:
    raw = np.array([[0, -1], [-2, 0]], dtype=np.float32)
    assert mask_to_classes(raw, Path("x.npz"), "disc_cup").tolist() == [[0, 1], [2, 0]]
    for bad, shown in ((np.array([[0, 1], [2, -1]]), "1, 2"), (np.array([[0.5, -1]]), "0.5"), (np.array([[255, 0]], np.uint8), "255")):
        with pytest.raises(DataError) as err:
            mask_to_classes(bad, Path("/d/data_000007.npz"), "disc_cup")
        message = str(err.value)
        assert message == f"/d/data_000007.npz: disc_cup holds {shown}; expected FairSeg's mask codes 0 (background), -1 (neuroretinal rim), -2 (optic cup)"
    with pytest.raises(DataError, match="must be a 2D numeric mask"):
        mask_to_classes(np.zeros((2, 2, 2)), Path("x.npz"), "disc_cup")


def test_bad_files_are_one_line_errors_naming_the_file(tmp_path: Path) -> None:
    names = write_fairseg(tmp_path)
    source = fairseg(tmp_path)
    spec = source.client_specs()[0]
    victim = spec.splits["test"].sample_ids[0]
    write_patient(tmp_path / victim, LOADER, "White", mask=np.where(disc_cup_codes() == -2, 2, 0).astype(np.int8))
    with pytest.raises(DataError) as err:
        source.load_masks(spec, "test", spec.splits["test"].sample_ids)
    assert str(err.value).startswith(f"{tmp_path / victim}: disc_cup holds 2;") and "\n" not in str(err.value)
    write_patient(tmp_path / victim, LOADER, "White", mask=np.zeros((30, 30), np.int8), image=np.zeros((40, 40), np.uint8))
    with pytest.raises(DataError, match=r"disc_cup has shape \(30, 30\) but fundus_slo has \(40, 40\)"):
        source.load_masks(spec, "test", spec.splits["test"].sample_ids)
    write_patient(tmp_path / names[0], LOADER, "White", race=np.array(1))  # 1 is no code of the fundus_slo copy
    with pytest.raises(DataError, match=r"data_000001.npz: race=1 is not one of \[2, 3, 7\] \(race codes of files with fundus_slo\) or -1"):
        source.client_specs()
    (tmp_path / names[1]).unlink()
    with pytest.raises(DataError, match="train.txt: 1 listed files are missing"):
        source.client_specs()
    with pytest.raises(DataError, match="data.modality='oct_bscans': FairSeg has SLO fundus images only"):
        fairseg(tmp_path, modality="oct_bscans").client_specs()


def test_no_classification_label(tmp_path: Path) -> None:
    write_fairseg(tmp_path)
    source = fairseg(tmp_path)
    assert source.label_name == "" and source.mask_classes == ("background", "disc", "cup")
    with pytest.raises(DataError, match="no classification label .* segmentation task"):
        source.num_classes  # noqa: B018  (the driver asks for it when it builds the model)
    assert all((s.splits["train"].labels == 0).all() for s in source.client_specs())


def test_summary_csv_text_wins_and_gives_splits(tmp_path: Path) -> None:
    names = write_fairseg(tmp_path, n_train=6, n_test=3)
    csv = pd.DataFrame({"filename": names, "age": ["65.5"] * 9, "race": ["black"] * 9, "gender": ["female"] * 9,
                        "use": ["training"] * 5 + ["validation"] + ["test"] * 3})
    (tmp_path / "ReadMe").mkdir()
    csv.to_csv(tmp_path / "ReadMe" / "data_summary.csv", index=False)
    specs = fairseg(tmp_path).client_specs()  # the lists still give the split; the CSV the text
    for spec in specs:
        for table in spec.splits.values():
            assert (table.attributes["race"] == 1).all() and (table.attributes["gender"] == 0).all()
            assert (table.attributes["age"] == 1).all()  # 65.5 years (the npz said 30 or 70 years in days)
            assert (table.attributes["language"] == -1).all()  # not in the CSV: the npz's code
    for lst in ("train.txt", "test.txt"):
        (tmp_path / lst).unlink()
    specs = fairseg(tmp_path).client_specs()
    assert sorted(n for s in specs for n in s.splits["test"].sample_ids) == names[6:]
    assert sum(len(s.splits["train"]) + len(s.splits["val"]) for s in specs) == 6  # validation rows train
    csv.drop(columns="use").to_csv(tmp_path / "ReadMe" / "data_summary.csv", index=False)
    with pytest.raises(DataError, match="no 'use' or 'split' column"):
        fairseg(tmp_path).client_specs()
    (tmp_path / "ReadMe" / "data_summary.csv").unlink()
    with pytest.raises(DataError, match="no split: expected train.txt and test.txt"):
        fairseg(tmp_path).client_specs()


def test_reads_the_synthetic_twin(big_fundus: tuple[Path, dict], tmp_path: Path) -> None:
    """The twin's npz files are FairSeg files of the slo_fundus family: the same reader reads them."""
    root, _ = big_fundus
    meta = pd.read_csv(root / "meta_all.csv", index_col=0, keep_default_na=False)
    names = [f"all/{f}" for f in meta["filename"]]
    (root / "train.txt").write_text("\n".join(names[:16]))
    (root / "test.txt").write_text("\n".join(names[16:]))
    try:
        source = FairSeg(DataConfig(name="fairseg", root=str(root), keep_unknown=True), img_size=32, seed=0)
        twin = SyntheticOph(DataConfig(name="synthetic", root=str(root), keep_unknown=True), img_size=32, seed=0)
        for spec in source.client_specs():
            table = spec.splits["test"]
            rows = meta.set_index("filename").loc[[n.removeprefix("all/") for n in table.sample_ids]]
            assert [RACES[c] for c in table.attributes["race"]] == [r.capitalize() for r in rows["race"]]
            assert np.array_equal(source.load_masks(spec, "test", table.sample_ids), twin.load_masks(spec, "test", np.array([n.removeprefix("all/") for n in table.sample_ids])))
    finally:
        for lst in ("train.txt", "test.txt"):
            (root / lst).unlink()


# --- the inspector -----------------------------------------------------------------------------


def test_inspector_mask_statistics(tmp_path: Path) -> None:
    names = write_fairseg(tmp_path)
    write_patient(tmp_path / names[0], LOADER, "Asian", mask=np.zeros((40, 40), np.int8))  # no disc at all
    summary, problems = inspect(fairseg(tmp_path, keep_unknown=True))
    assert problems == []
    masks = {c["id"]: c["masks"] for c in summary["clients"]}
    assert all("labels" not in c for c in summary["clients"])  # no classification label to count
    total = sum(m["all"]["n"] for m in masks.values())
    assert total == 15 and sum(m["all"]["empty"] for m in masks.values()) == 1
    for m in masks.values():
        assert m["all"]["n"] == sum(m[g]["n"] for g in RACES if g in m)
        for row in m.values():
            assert row["background"] + row["rim"] + row["cup"] == pytest.approx(1.0, abs=1e-3)
            assert row["cdr"] is None or row["cdr"] == pytest.approx(0.5, abs=0.05)  # 5 cup rows in 10 disc rows
    # 128 / 40 scaling: a 10-row disc is 32 rows, its 5 cup rows 16; 100 disc pixels of 1600 are 75 rim + 25 cup
    full = next(m["White"] for m in masks.values() if "White" in m)
    assert (full["rim"], full["cup"]) == pytest.approx((75 / 1600, 25 / 1600), abs=0.004)
    text = format_summary(summary)
    assert "masks: share of pixels per class" in text and "labels train" not in text
    assert "White" in text and "50.0%" not in text and "0.500" in text


def test_inspector_lists_bad_masks(tmp_path: Path) -> None:
    names = write_fairseg(tmp_path)
    for victim in names[:2]:
        write_patient(tmp_path / victim, LOADER, "White", mask=np.full((40, 40), 3, np.int8))
    summary, problems = inspect(fairseg(tmp_path, keep_unknown=True))
    assert len(problems) == 2 and all("disc_cup holds 3; expected FairSeg's mask codes" in p for p in problems)
    assert sum(c["masks"]["all"]["n"] for c in summary["clients"]) == 13


def test_inspector_on_the_synthetic_twin(big_fundus: tuple[Path, dict], capsys: pytest.CaptureFixture[str]) -> None:
    from raysim.datasets.inspect import main

    root, _ = big_fundus
    assert main(["--dataset", "synthetic", str(root)]) == 0
    out = capsys.readouterr().out
    assert "labels train" in out and "masks: share of pixels per class" in out
    assert main(["--dataset", "synthetic", str(root), "--json"]) == 0
    clients = json.loads(capsys.readouterr().out)["clients"]
    cdrs = [c["masks"]["all"]["cdr"] for c in clients]
    assert all(0.3 < cdr < 0.7 for cdr in cdrs)  # healthy CDR 0.35, glaucoma 0.63
