"""Malformed input classes of issue 27 through `raysim.run.main`: one line, exit 2, nothing damaged.

The catalogue (`CASES`) uses `tests/cli/test_malformed_cli.py`'s `Case` and its contract check: exit
code 2, one `error: ...` line naming the file / key / value, no traceback, a fresh --out gone and
watched folders byte for byte as before. Classes covered: array sizes declared by `.npy` headers
(checked before a byte is allocated), file names normalised before the duplicate and overlap
checks, non-finite and malformed config values, files that are not what they claim, and keys
that contradict each other. Cases refused before Ray run without it (reaching Ray fails them);
the others share the session's Ray. Below the catalogue: the class-wide checks that need no CLI
(every float key of every section and method, every source's name normalisation).
"""

from __future__ import annotations

import io
import pickle
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import get_type_hints

import numpy as np
import pandas as pd
import pytest
import test_malformed_cli as cli
from test_malformed_cli import ONE_ACTOR, OPH_TEST, OPH_TRAIN, Case, Ctx, edit_csv, oph, oph_case, pristine, set_cell  # noqa: F401  (pristine: a fixture)

from raysim import config
from raysim.algorithms import ALGORITHMS
from raysim.config import ConfigError, DataConfig
from raysim.datasets import DataError
from raysim.datasets.arrays import load_npy, open_npz
from raysim.datasets.fairfedmed_chest import FairFedMedChest
from raysim.datasets.fairfedmed_oph import FairFedMedOph
from raysim.datasets.fairseg import FairSeg
from raysim.datasets.fed_isic2019 import FedISIC2019
from raysim.datasets.medmnist import MedMNIST

from helpers import load_config, write_chest, write_fairseg, write_isic

assert_contract = cli.test_bad_input_is_one_line_exit_2_and_nothing_damaged  # the one contract check, shared

HUGE = 10**12


# --- breaking files ------------------------------------------------------------------------------


def forged_npy(shape: tuple[int, ...], dtype: str = "<i8") -> bytes:
    """A .npy header declaring `shape` followed by a few bytes: what a zip bomb or a corrupt header looks like."""
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": dtype, "fortran_order": False, "shape": shape})
    return stream.getvalue() + bytes(64)


def npy_bytes(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array)
    return stream.getvalue()


def replace_member(npz: Path, member: str, data: bytes) -> None:
    with zipfile.ZipFile(npz) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    members[member] = data
    with zipfile.ZipFile(npz, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)


def csv_cell(path: Path, row: int, column: str = "filename") -> str:
    return str(pd.read_csv(path, dtype=str, keep_default_na=False)[column][row])


def oph_scalar_bomb(root: Path) -> None:
    """race comes from the npz (no CSV column), and one file's race declares 10^12 values."""
    for csv in (OPH_TRAIN, OPH_TEST):
        edit_csv(root / csv, lambda frame: frame.drop(columns=["race"]))
    replace_member(root / "all" / csv_cell(root / OPH_TRAIN, 0), "race.npy", forged_npy((HUGE,)))


def dot_slash_in_test(root: Path) -> None:
    set_cell(root / OPH_TEST, 0, "filename", "./" + csv_cell(root / OPH_TRAIN, 0))


def csv_is_a_directory(root: Path) -> None:
    (root / OPH_TEST).unlink()
    (root / OPH_TEST).mkdir()


def summary_row_twice(root: Path) -> None:
    """The splits from data_summary.csv's `use` column, one row listed twice (as ./name)."""
    names = [*(root / "train.txt").read_text().split(), *(root / "test.txt").read_text().split()]
    (root / "train.txt").unlink()
    (root / "test.txt").unlink()
    frame = pd.DataFrame({"filename": names, "use": ["training"] * 9 + ["test"] * 6})
    pd.concat([frame, frame.iloc[[2]].assign(filename="./" + names[2])]).to_csv(root / "data_summary.csv", index=False)


def fundus_in_unit_range(root: Path) -> None:
    """One fundus stored as floats in [0, 1] (rounding made it a black 0/1 image)."""
    victim = root / (root / "test.txt").read_text().split()[-1]
    with np.load(victim) as data:
        arrays = {key: data[key] for key in data.files}
    arrays["fundus_slo"] = arrays["fundus_slo"].astype(np.float32) / 255
    np.savez(victim, **arrays)


def shallower_volume(root: Path) -> None:
    """One OCT volume of 3 B-scans among volumes of 4: at slice_step 2 both keep 2."""
    victim = root / "all" / csv_cell(root / "meta_site3_race_test.csv", 0)
    with np.load(victim) as data:
        arrays = {key: data[key] for key in data.files}
    arrays["oct_bscans"] = arrays["oct_bscans"][:3]
    np.savez(victim, **arrays)


def embeddings_bomb(ctx: Ctx) -> list[str]:
    path = ctx.file("concepts.npy", forged_npy((2, 10**6, 10**6), "<f8"))
    return ctx.tiny(ctx.request.getfixturevalue("oph_root"), **{"algorithm.name": "fedbm", "algorithm.embeddings": str(path), **ONE_ACTOR})


def overrides(*items: str) -> Callable[[Ctx], list[str]]:
    return lambda ctx: ctx.fresh(*items)


FEDBM_PROMPTS = ("algorithm.name=fedbm", "algorithm.text_encoder=/nowhere", "algorithm.class_concepts=[healthy, glaucoma]")


def template(text: str) -> Callable[[Ctx], list[str]]:
    return overrides(*FEDBM_PROMPTS, f"algorithm.templates=[{text!r}]")


CASES = [
    # 1. sizes declared by .npy headers: checked before anything is allocated
    Case("oph-npz-scalar-declares-1e12-values", oph_case(oph_scalar_bomb), ("/all/data_", "race must be a scalar", "shape (1000000000000,)"), ray=True),
    Case("fedbm-embeddings-header-declares-16-tb", embeddings_bomb, ("algorithm.embeddings=", "concepts.npy is corrupt", "(2, 1000000, 1000000)"), ray=True),
    # 2. listed names normalised before the duplicate and overlap checks
    Case("oph-dot-slash-name-in-train-and-test", oph_case(dot_slash_in_test), ("1 files are in both train and test (first: data_",), ray=True),
    # 3. non-finite and malformed config values, refused before Ray
    Case("weight-decay-nan", overrides("federation.weight_decay=.nan"), ("federation.weight_decay must be a finite number, got nan",)),
    Case("weight-decay-inf", overrides("federation.weight_decay=.inf"), ("federation.weight_decay must be a finite number, got inf",)),
    Case("driver-cpus-inf", overrides("resources.driver_cpus=.inf"), ("resources.driver_cpus must be a finite number, got inf",)),
    Case("driver-gpus-nan", overrides("resources.driver_gpus=.nan"), ("resources.driver_gpus must be a finite number, got nan",)),
    Case("ratios-nan", overrides("data.partition=quantity", "data.ratios=[.nan, 0.5]"), ("data.ratios[0] must be a finite number, got nan",)),
    Case("fedbm-temperature-inf", overrides("algorithm.name=fedbm", "algorithm.temperature=.inf"), ("algorithm.temperature must be a number > 0, got inf",)),
    Case("fedbm-generator-lr-inf", overrides("algorithm.name=fedbm", "algorithm.generator_lr=.inf"), ("algorithm.generator_lr must be a finite number, got inf",)),
    Case("fedbm-lambda-div-inf", overrides("algorithm.name=fedbm", "algorithm.lambda_div=.inf"), ("algorithm.lambda_div must be a finite number, got inf",)),
    Case("fedbm-template-two-slots", template("a {} of {}"), ("algorithm.templates: expected '{}' (the concept) exactly once", "'a {} of {}'")),
    Case("fedbm-template-numbered-slot", template("a photo of {0}"), ("expected '{}' (the concept) exactly once", "'a photo of {0}'")),
    Case("fedbm-template-named-slot", template("a photo of {concept}"), ("expected '{}' (the concept) exactly once", "'a photo of {concept}'")),
    Case("fedbm-template-unmatched-brace", template("a photo of {} {"), ("expected '{}' (the concept) exactly once", "'a photo of {} {'")),
    # 4. files that are not what they claim
    # 5. keys that contradict each other, refused before Ray
    Case(
        "fedhelp-public-site-is-the-holdout-site",
        overrides("algorithm.name=fedhelp", "algorithm.public={site: site3}", "eval.holdout_site=site3"),
        ("eval.holdout_site=site3 and algorithm.public={site: site3} name the same client",),
    ),
    Case(
        "epsilon-max-below-one-round",
        overrides("algorithm.name=dp_lora", "algorithm.noise_multiplier=1.0", "algorithm.epsilon_max=0.5"),
        ("algorithm.epsilon_max=0.5 is below the ε = 4.729 that round 1 alone spends", "algorithm.noise_multiplier=1"),
    ),
    Case(  # sampled clients: q needs the data, so the driver refuses it before round 1
        "epsilon-max-below-one-sampled-round",
        oph(**{"algorithm.name": "dp_lora", "algorithm.noise_multiplier": 1.0, "algorithm.epsilon_max": 0.5, "federation.clients_per_round": 2, **ONE_ACTOR}),
        ("the run would stop before round 1, privacy budget: round 1 would spend ε = ", "> 0.5 (algorithm.epsilon_max"),
        ray=True,
    ),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.ray else []) for c in CASES])
def test_malformed_input_class(case: Case, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert_contract(case, tmp_path, request, monkeypatch, capsys)


def test_catalogue_covers_every_class() -> None:
    assert len({c.id for c in CASES}) == len(CASES)
    assert sum(not c.ray for c in CASES) >= 10  # most of it refused before Ray


# --- the classes beyond the catalogue: every float key, every source ----------------------------


def float_keys() -> list[str]:
    """Every float-typed key of every config section and of every registered method's Params."""
    keys = []
    for section in config.SECTIONS:
        cls = get_type_hints(config.ExperimentConfig)[section]
        keys += [f"{section}.{f.name}" for f, hint in ((f, get_type_hints(cls)[f.name]) for f in fields(cls)) if "float" in str(hint)]
    for name in ALGORITHMS.names():
        params = ALGORITHMS.get(name).Params
        keys += [f"algorithm.name={name} algorithm.{f.name}" for f in fields(params) if "float" in str(get_type_hints(params)[f.name])]
    return keys


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_no_float_key_accepts_a_non_finite_value(value: str) -> None:
    """A future float key is covered by being declared: the config layer refuses NaN and ±inf for all of them."""
    keys = float_keys()
    assert "federation.weight_decay" in keys and "algorithm.name=fedbm algorithm.temperature" in keys
    for key in keys:
        *extra, leaf = key.split()
        item = f"{leaf}=[{value}]" if leaf == "data.ratios" else f"{leaf}={value}"
        with pytest.raises(ConfigError) as err:
            load_config(None, [*extra, item])
        assert leaf in str(err.value) or leaf.removeprefix("algorithm.") in str(err.value), (key, str(err.value))


def oph_twice(root: Path) -> Callable[[], object]:
    csv = root / OPH_TRAIN
    edit_csv(csv, lambda frame: pd.concat([frame, frame.iloc[[0]].assign(filename="./" + frame["filename"][0])]))
    return FairFedMedOph(DataConfig(name="fairfedmed_oph", root=str(root)), img_size=16, seed=0).client_specs


def chest_twice(root: Path) -> Callable[[], object]:
    write_chest(root)
    edit_csv(root / "meta_chexpert_race_train.csv", lambda frame: pd.concat([frame, frame.iloc[[0]].assign(filename=frame["filename"][0].replace("/", "//", 1))]))
    return FairFedMedChest(DataConfig(name="fairfedmed_chest", root=str(root)), img_size=16, seed=0).client_specs


def isic_twice(root: Path) -> Callable[[], object]:
    write_isic(root)
    edit_csv(root / "train_test_split", lambda frame: pd.concat([frame, frame.iloc[[0]].assign(image="./" + frame["image"][0])]))
    return FedISIC2019(DataConfig(name="fed_isic2019", root=str(root)), img_size=16, seed=0).client_specs


def fairseg_twice(root: Path) -> Callable[[], object]:
    names = write_fairseg(root)
    (root / "test.txt").write_text("\n".join([*names[9:], "./" + names[9]]) + "\n")
    return FairSeg(DataConfig(name="fairseg", root=str(root)), img_size=16, seed=0).client_specs


@pytest.mark.parametrize("source", [oph_twice, chest_twice, isic_twice, fairseg_twice], ids=["fairfedmed_oph", "fairfedmed_chest", "fed_isic2019", "fairseg"])
def test_every_source_normalises_listed_names_before_the_duplicate_check(source: Callable[[Path], Callable[[], object]], oph_copy: Path, tmp_path: Path) -> None:
    """`./x` or `a//x` and `x` are one file: listed twice, never two samples."""
    client_specs = source(oph_copy if source is oph_twice else tmp_path / "data")
    with pytest.raises(DataError, match="listed more than once"):
        client_specs()


@pytest.mark.parametrize("content", [pickle.dumps({"a": 1}), b"not an archive", None], ids=["pickle", "text", "npy"])
def test_an_npz_that_is_not_a_zip_never_suggests_allow_pickle(content: bytes | None, tmp_path: Path) -> None:
    path = tmp_path / "x.npz"
    path.write_bytes(npy_bytes(np.zeros(3)) if content is None else content)
    with pytest.raises(DataError) as err:
        open_npz(path)
    assert str(err.value) == f"{path}: not a readable npz file (File is not a zip file)"


def test_a_npy_header_is_checked_against_the_file_and_memory(tmp_path: Path) -> None:
    small = tmp_path / "small.npy"
    np.save(small, np.arange(6.0).reshape(2, 3))
    assert load_npy(small).shape == (2, 3)
    bomb = tmp_path / "bomb.npy"
    bomb.write_bytes(forged_npy((HUGE,), "<f8"))
    with pytest.raises(DataError, match=rf"bomb.npy is corrupt \(its header declares shape \({HUGE},\) of float64 = {8 * HUGE} bytes, but the file holds 64"):
        load_npy(bomb)


def test_a_run_its_method_stops_early_keeps_its_last_rounds_predictions(ray_session, oph_root: Path, tmp_path: Path) -> None:
    """eval.predictions=final: a run stopped by its privacy budget after round 1 of 3 (evaluations
    due every 5 rounds) evaluates round 1 as its last and writes those predictions."""
    from raysim.algorithms import dp

    from helpers import make_driver

    e1, e2 = (dp.spent([(1.0, 1.0, steps)], 1e-5) for steps in (1, 2))
    settings = {"algorithm.name": "dp_lora", "algorithm.rank": 4, "algorithm.noise_multiplier": 1.0, "algorithm.epsilon_max": (e1 + e2) / 2}
    lines: list[str] = []
    run_dir = tmp_path / "run"
    make_driver(oph_root, run_dir, lines, **settings, **{"federation.rounds": 3, "eval.every": 5, "eval.predictions": "final", "resources.clients_per_actor": 3}).run()
    assert any(line.startswith("stopped before round 2: privacy budget") for line in lines), lines
    predictions = pd.read_parquet(run_dir / "predictions.parquet")
    assert set(predictions["round"]) == {1} and "test" in set(predictions["split"])


def victim_split(specs: list, name: str) -> tuple[object, str]:
    """The client spec and split whose rows hold sample `name`."""
    return next((spec, split) for spec in specs for split, table in spec.splits.items() if name in set(table.sample_ids))


def test_oct_volumes_that_differ_in_depth_are_refused_even_when_they_keep_as_many_slices(oph_copy: Path) -> None:
    """Found by a client actor's `load` (the CLI path of an actor's DataError: tests/cli/test_malformed_cli.py)."""
    shallower_volume(oph_copy)
    source = FairFedMedOph(DataConfig(name="fairfedmed_oph", root=str(oph_copy), modality="oct_bscans", slice_step=2), img_size=16, seed=0)
    victim = csv_cell(oph_copy / "meta_site3_race_test.csv", 0)
    spec, split = victim_split(source.client_specs(), victim)
    with pytest.raises(DataError, match=rf"{victim}: 3 B-scans, but the first volume had 4 \(all volumes must match\)"):
        source.load(spec, split)


def test_a_fairseg_fundus_in_0_1_is_refused_not_rounded_to_black(tmp_path: Path) -> None:
    write_fairseg(tmp_path)
    fundus_in_unit_range(tmp_path)
    source = FairSeg(DataConfig(name="fairseg", root=str(tmp_path)), img_size=16, seed=0)
    spec, split = victim_split(source.client_specs(), "data_000015.npz")
    with pytest.raises(DataError, match=r"data_000015.npz: fundus_slo holds fractions in \[0\.\d+, 0\.\d+\] \(a 0\.\.1 scale\); expected pixel values 0\.\.255"):
        source.load(spec, split)


SOURCE_CASES = {  # driver-side refusals (metadata): the CLI path of such a DataError is test_malformed_cli's
    "medmnist-labels-declare-1e12": (
        "medmnist",
        lambda root: replace_member(root / "pneumoniamnist.npz", "train_labels.npy", forged_npy((HUGE, 1), "|u1")),
        r"pneumoniamnist.npz: array 'train_labels' is corrupt \(its header declares shape \(1000000000000, 1\) of uint8 = 1000000000000 bytes",
    ),
    "medmnist-image-over-pixel-limit": (
        "medmnist",
        lambda root: replace_member(root / "pneumoniamnist.npz", "train_images.npy", forged_npy((24, 20000, 20000), "|u1")),
        r"pneumoniamnist.npz: train_images declares shape \(24, 20000, 20000\) = 400000000 values per image, over the limit of 89478485",
    ),
    "medmnist-npz-is-a-pickle": (
        "medmnist",
        lambda root: (root / "pneumoniamnist.npz").write_bytes(pickle.dumps({"train_images": [1]})),
        r"pneumoniamnist.npz: not a readable npz file with keys train_images, .* \(File is not a zip file\)$",
    ),
    "oph-csv-is-a-directory": ("oph", csv_is_a_directory, rf"{OPH_TEST}: a directory, not a CSV file"),
    "fairseg-summary-row-listed-twice": ("fairseg", summary_row_twice, r"data_summary.csv: 1 filenames listed more than once \(first: data_000003.npz\)"),
}


def source_of(kind: str, root: Path) -> Callable[[], object]:
    cfg = {"medmnist": "medmnist", "oph": "fairfedmed_oph", "fairseg": "fairseg"}[kind]
    cls = {"medmnist": MedMNIST, "oph": FairFedMedOph, "fairseg": FairSeg}[kind]
    return cls(DataConfig(name=cfg, root=str(root)), img_size=16, seed=0).client_specs


@pytest.mark.parametrize("case", list(SOURCE_CASES))
def test_metadata_refusals_name_the_file(case: str, pristine: dict[str, Path], oph_copy: Path, tmp_path: Path) -> None:  # noqa: F811
    kind, change, pattern = SOURCE_CASES[case]
    if kind == "medmnist":
        root = Path(shutil.copytree(pristine["medmnist"], tmp_path / "medmnist"))
    elif kind == "fairseg":
        root = tmp_path / "fairseg"
        write_fairseg(root)
    else:
        root = oph_copy
    change(root)
    with pytest.raises(DataError, match=pattern) as err:
        source_of(kind, root)()
    assert "\n" not in str(err.value) and "allow_pickle" not in str(err.value)
