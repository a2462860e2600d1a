"""Joint segmentation + grading from fundus and OCT (issue 17): the stacked modalities, the
two-branch model and its mid-level fusion, the joint loss, a joint run through real Ray actors
(both tasks' rows, recomputed from predictions.parquet, predicted masks included), and the
task checks that refuse what does not fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from raysim.algorithms import ALGORITHMS
from raysim.client import tasks
from raysim.client.training import Batch, segmentation_loss, supervised_loss
from raysim.config import ConfigError, DataConfig, ModelConfig
from raysim.datasets import DataError
from raysim.datasets.synthetic import SyntheticOph
from raysim.metrics import classification as metrics
from raysim.metrics import segmentation as segmetrics
from raysim.models import adapters
from raysim.models.backbones import build_model
from raysim.models.joint import fused_stages
from raysim.models.kinds import JointOutput
from raysim.outputs import runs
from raysim.reports import compare
from raysim.seeding import derive_seed

from helpers import make_driver

FUSED = "slo_fundus+oct_onh_bscans"
JOINT = {"data.name": "synthetic", "data.modality": FUSED, "model.name": "joint:test_resnet", "resources.clients_per_actor": 3, "federation.rounds": 1, "eval.every": 1}
SITES = {"site1", "site2", "site3"}


def joint_model(slices: int | None, seed: int = 0, size: int = 16) -> torch.nn.Module:
    return build_model(ModelConfig(name="joint:test_resnet", img_size=size), num_classes=2, mask_classes=3, in_chans=1 + (slices or 0), slices=slices, seed=seed)


# --- data: the fundus image with its OCT cube stacked beside it ----------------------------------


def test_stacked_modalities_are_the_fundus_then_the_kept_bscans(oph_root: Path) -> None:
    fused = SyntheticOph(DataConfig(name="synthetic", root=str(oph_root), modality=FUSED, slice_step=2), img_size=16, seed=0)
    fundus = SyntheticOph(DataConfig(name="synthetic", root=str(oph_root)), img_size=16, seed=0)
    onh = SyntheticOph(DataConfig(name="synthetic", root=str(oph_root), modality="oct_onh_bscans", slice_step=2), img_size=16, seed=0)
    spec = fused.client_specs()[0]
    both, alone, cube = fused.load(spec, "val"), fundus.load(spec, "val"), onh.load(spec, "val")
    slices = onh.volume_slices
    assert fused.channel_split == (1, slices) and fused.channels == 1 + slices and fused.volume_slices == slices and not fused.is_volume
    assert onh.is_volume and onh.channel_split == (slices,) and fundus.channel_split == (1,)
    keep = np.isin(alone.table.sample_ids, both.table.sample_ids)  # a file is kept when both arrays are there
    assert np.array_equal(both.images[:, :1], alone.images[keep])
    assert np.array_equal(both.images[:, 1:], cube.images[np.isin(cube.table.sample_ids, both.table.sample_ids)])


@pytest.mark.parametrize(
    ("modality", "message"),
    [("oct_onh_bscans+slo_fundus", "a fundus image then a volume"), ("slo_fundus+oct_bscans+oct_onh_bscans", "a fundus image then a volume"), ("slo_fundus+retina", "choose one of")],
)
def test_a_bad_modality_stack_is_one_clear_error(oph_root: Path, modality: str, message: str) -> None:
    with pytest.raises(DataError, match=message) as err:
        SyntheticOph(DataConfig(name="synthetic", root=str(oph_root), modality=modality), img_size=16, seed=0).client_specs()
    assert "\n" not in str(err.value) and "data.modality=" in str(err.value)


# --- the model and the loss -------------------------------------------------------------------


def test_fusion_starts_as_the_identity_and_then_learns_from_the_oct_branch() -> None:
    torch.manual_seed(1)
    x = torch.randn(4, 1 + 4, 16, 16)
    fused, fundus_only = joint_model(4), joint_model(None)
    assert all(torch.equal(a, b) for a, b in zip(joint_model(4).state_dict().values(), fused.state_dict().values(), strict=True))  # seeded
    assert [int(k) for k in fused.fusion] == list(fused_stages(4)) == [3, 4]  # mid level: the deeper half of a 4-stage encoder
    fused.eval(), fundus_only.eval()
    out = fused(x)
    assert isinstance(out, JointOutput) and out.masks.shape == (4, 3, 16, 16) and out.grade.shape == (4, 2)
    # zero-initialised FiLM: the masks are the fundus-only model's (same seed, same fundus branch)
    assert torch.allclose(out.masks, fundus_only(x[:, :1]).masks, atol=1e-6)
    fused.train()
    batch = Batch(x, torch.tensor([0, 1, 0, 1]), {}, torch.arange(4), mask=torch.randint(0, 3, (4, 16, 16)))
    supervised_loss(fused(x), batch).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fused.fusion.parameters())
    assert fused.oct_encoder is not None and fused.fold is not None
    heads = fused.get_classifier()
    assert heads == (fused.unet.segmentation_head, fused.grade_head)


def test_joint_loss_is_the_segmentation_loss_plus_the_grade_cross_entropy() -> None:
    torch.manual_seed(0)
    masks, grade = torch.randn(2, 3, 8, 8), torch.randn(2, 2)
    mask, y = torch.randint(0, 3, (2, 8, 8)), torch.tensor([1, 0])
    batch = Batch(torch.zeros(2, 1), y, {}, torch.arange(2), mask=mask)
    expected = segmentation_loss(masks, mask) + torch.nn.functional.cross_entropy(grade, y)
    assert torch.allclose(supervised_loss(JointOutput(masks, grade), batch), expected)
    with pytest.raises(ValueError, match="needs masks"):
        supervised_loss(JointOutput(masks, grade), Batch(torch.zeros(2, 1), y, {}, torch.arange(2)))


def test_adapters_go_on_both_encoders_and_the_new_parts_train() -> None:
    model = joint_model(4)
    replaced = adapters.inject(model, adapters.default_targets(model), adapters.LoRA, rank=2, alpha=2.0)
    assert {name.split(".")[0] for name in replaced} == {"unet", "oct_encoder"} and all(".encoder." in n or n.startswith("oct_encoder.") for n in replaced)
    adapters.freeze_backbone(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for part in ("unet.decoder.", "unet.segmentation_head.", "grade_head.", "fusion.", "fold."):
        assert any(n.startswith(part) for n in trainable), part
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("unet.encoder.", "oct_encoder.")) for n in frozen)


# --- the task checks ------------------------------------------------------------------------------


def test_models_that_do_not_fit_the_stacked_modalities_refuse(oph_root: Path, tmp_path: Path) -> None:
    cases = {
        "test_resnet": (FUSED, "stacks two modalities"),
        "unet:test_resnet": (FUSED, "stacks two modalities"),
        "joint:test_resnet": ("oct_onh_bscans", "a volume alone"),
    }
    for model, (modality, message) in cases.items():
        driver = make_driver(oph_root, tmp_path / model.replace(":", "-"), **{**JOINT, "model.name": model, "data.modality": modality})
        with pytest.raises(ConfigError, match=message) as err:
            driver.algorithm.build_model(driver.source)  # Driver.start's first model, before any actor starts
        assert "\n" not in str(err.value)
    refusing = sorted(n for n in ALGORITHMS.names() if "joint" not in ALGORITHMS.get(n).tasks)
    assert {"qffl", "fedbm"} <= set(refusing)
    with pytest.raises(ConfigError, match="algorithm qffl does not support the joint task"):
        make_driver(oph_root, tmp_path / "qffl", **{**JOINT, "algorithm.name": "qffl"})


# --- through the engine ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def joint_run(ray_session, oph_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    run_dir = tmp_path_factory.mktemp("joint") / "fedavg"
    lines: list[str] = []
    make_driver(oph_root, run_dir, lines, **{**JOINT, "eval.bootstrap": 20, "eval.masks": "true"}).run()  # the masks check the per-sample Dice below
    return run_dir, lines


@pytest.mark.filterwarnings("ignore::raysim.metrics.UndefinedMetricWarning")  # the tiny set's empty groups
def test_a_joint_run_writes_both_tasks_rows_recomputable_from_its_predictions(joint_run: tuple[Path, list[str]], oph_root: Path) -> None:
    run_dir, lines = joint_run
    rows, preds = pd.read_parquet(run_dir / "metrics.parquet"), pd.read_parquet(run_dir / "predictions.parquet")
    assert {"auc", "es_auc", "eod", "dice_disc", "dice_cup", "es_dice", "cdr_error"} <= set(rows["metric"])
    assert not rows.duplicated(["round", "split", "client", "attribute", "group", "metric"]).any()
    assert {"label", "score", "mask", "mask_size", *tasks.SEGMENTATION_COLUMNS} <= set(preds.columns)
    header = next(line for line in "\n".join(lines).splitlines() if line.startswith("client"))
    assert header.split()[:3] == ["client", "AUC", "ES-AUC"] and "Dice" in header and "CDR" in header
    source = SyntheticOph(DataConfig(name="synthetic", root=str(oph_root), modality=FUSED), img_size=16, seed=0)
    names, specs = source.group_names, {s.id: s for s in source.client_specs()}
    for (split, client), got in preds[preds["round"] == 1].groupby(["split", "client"]):
        seed = derive_seed(0, "boot", 1, client, split)
        attributes = {a: got[a].to_numpy() for a in names if a in got}
        expected = metrics.client_metrics(got["label"], got["score"], attributes, {a: names[a] for a in attributes}, n_boot=20, seed=seed)
        expected += segmetrics.client_segmentation_metrics({c: got[c].to_numpy() for c in segmetrics.SAMPLE_COLUMNS}, attributes, {a: names[a] for a in attributes}, n_boot=20, seed=seed)
        stored = rows[(rows["round"] == 1) & (rows["split"] == split) & (rows["client"] == client)]
        stored = {(r.attribute, r.group, r.metric): r.value for r in stored.itertuples()}
        assert len(stored) == len(expected)
        for attr, group, metric, value in expected:
            assert np.isclose(stored[(attr, group, metric)], value, equal_nan=True), (split, client, metric)
        # the predicted masks give the per-sample Dice again, against the true masks in the source
        truth = source.load_masks(specs[client], split, got["sample_id"].to_numpy(), 16)
        predicted = np.stack([tasks.decode_mask(m, s) for m, s in zip(got["mask"], got["mask_size"])])
        again = segmetrics.sample_metrics(predicted, truth)
        assert np.allclose(again["dice_disc"], got["dice_disc"]) and np.allclose(again["dice_cup"], got["dice_cup"])
    assert set(preds["client"]) == SITES
    # selected by the mean of validation AUC and Dice (AUC alone saturates first)
    chosen = runs.read_run(run_dir).selection()
    at = lambda m: runs.value(rows, round_=chosen.round, split="val", metric=m)  # noqa: E731
    assert chosen.metric == "auc_dice" and np.isclose(chosen.value, (at("auc") + (at("dice_disc") + at("dice_cup")) / 2) / 2)
    # raysim.compare reads both halves of the real run at that round
    row = compare.compare([run_dir]).per_run.iloc[0]
    test = lambda m, a="", c=runs.MEAN: runs.value(rows, round_=chosen.round, split="test", metric=m, attribute=a, client=c)  # noqa: E731
    assert row["auc"] == test("auc") and row["es_auc"] == test("es_auc", "race") and row["dice_disc"] == test("dice_disc") and row["es_dice"] == test("es_dice", "race")
    assert np.isclose(row["worst_dice"], min((test("dice_disc", c=c) + test("dice_cup", c=c)) / 2 for c in SITES))


@pytest.mark.parametrize("name", ["fedper", "fairlora"])
def test_personal_and_adapter_methods_run_the_joint_task(name: str, ray_session, oph_root: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    make_driver(oph_root, tmp_path / name, lines, **{**JOINT, "algorithm.name": name, "eval.predictions": "none"}).run()
    rows = pd.read_parquet(tmp_path / name / "metrics.parquet")
    assert not any("failed" in line for line in lines), lines
    test = rows[(rows["split"] == "test") & (rows["attribute"] == "")]
    assert set(test[test["metric"] == "auc"]["client"]) == set(test[test["metric"] == "dice_disc"]["client"]) == SITES | {"mean"}
