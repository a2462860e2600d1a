"""Segmentation through the engine (issue 17): the task axis, the U-Net, the loss, masks through
the cache, every method that supports segmentation for one round through real Ray actors, the
metric rows recomputed from predictions.parquet, and the methods that refuse in one line."""

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
from raysim.datasets.cache import load_cached
from raysim.datasets.synthetic import SyntheticOph
from raysim.metrics import segmentation as segmetrics
from raysim.models import adapters
from raysim.models.backbones import build_model
from raysim.outputs import runs
from raysim.seeding import derive_seed

from helpers import BUILT_IN, load_config, make_driver

SEGMENTING = [n for n in BUILT_IN if "segmentation" in ALGORITHMS.get(n).tasks]
REFUSING = [n for n in BUILT_IN if "segmentation" not in ALGORITHMS.get(n).tasks]
SEG = {"data.name": "synthetic", "model.name": "unet:test_resnet", "resources.clients_per_actor": 3, "federation.rounds": 1, "eval.every": 1}
SITES = {"site1", "site2", "site3"}


def run_segmentation(root: Path, run_dir: Path, **extra: object) -> tuple[pd.DataFrame, list[str]]:
    lines: list[str] = []
    make_driver(root, run_dir, lines, **{**SEG, **extra}).run()
    return pd.read_parquet(run_dir / "metrics.parquet"), lines


# --- the task axis and the model ------------------------------------------------------------------


def test_the_model_chooses_the_task() -> None:
    assert tasks.task_of(ModelConfig(name="resnet18")).name == "classification"
    assert tasks.task_of(ModelConfig(name="unet:resnet18")).name == "segmentation"
    assert {"fedavg", "fedbn", "fedprox", "ditto", "fedper", "silobn", "fedrdn", "fednova", "fedadam", "fedlora", "fairlora", "local", "fedhelp"} <= set(SEGMENTING)
    assert {"fedbm", "fairfed", "qffl"} <= set(REFUSING)


def test_unet_is_seeded_and_adapters_touch_only_its_encoder() -> None:
    cfg = ModelConfig(name="unet:test_resnet", img_size=16)
    one, same, other = (build_model(cfg, num_classes=3, in_chans=1, seed=s) for s in (0, 0, 1))
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), same.state_dict().values(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), other.state_dict().values(), strict=True))
    assert one(torch.zeros(2, 1, 16, 16)).shape == (2, 3, 16, 16)
    assert one.get_classifier() is one.segmentation_head and "mean" in one.pretrained_cfg
    with pytest.raises(ConfigError, match="multiple of 16"):
        build_model(ModelConfig(name="unet:test_resnet", img_size=24), num_classes=3, in_chans=1, seed=0)
    with pytest.raises(ConfigError, match="not a timm model"):
        build_model(ModelConfig(name="unet:no_such_net", img_size=16), num_classes=3, in_chans=1, seed=0)
    replaced = adapters.inject(one, adapters.default_targets(one), adapters.LoRA, rank=4, alpha=4.0)
    assert replaced and all(name.startswith("encoder.") for name in replaced)
    adapters.freeze_backbone(one)
    trainable = {n for n, p in one.named_parameters() if p.requires_grad}
    norms = {f"{m}.{p}" for m, mod in one.named_modules() if isinstance(mod, torch.nn.BatchNorm2d) for p, _ in mod.named_parameters(recurse=False)}
    assert {n for n in trainable if not n.startswith(("decoder.", "segmentation_head."))} == {n for n in trainable if "lora_" in n} | {n for n in norms if n.startswith("encoder.")}
    assert {n for n, _ in one.decoder.named_parameters(prefix="decoder")} <= trainable  # the decoder is new: trained whole
    decoder_norms = [m for m in one.decoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert decoder_norms and not any(getattr(m, "frozen_stats", False) for m in decoder_norms)


def test_encoder_weights_load_from_a_timm_checkpoint(tmp_path: Path) -> None:
    import timm

    classifier = timm.create_model("test_resnet", num_classes=2, in_chans=3)
    torch.save(classifier.state_dict(), tmp_path / "enc.pth")
    model = build_model(ModelConfig(name="unet:test_resnet", img_size=16, weights=str(tmp_path / "enc.pth")), num_classes=3, in_chans=1, seed=0)
    encoder = model.encoder.model.state_dict()
    assert torch.equal(encoder["layer1.0.conv1.weight"], classifier.state_dict()["layer1.0.conv1.weight"])
    assert encoder["conv1.0.weight"].shape[1] == 1  # the RGB stem adapted to one channel, as timm does
    torch.save({"unrelated.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match="does not fit the encoder"):
        build_model(ModelConfig(name="unet:test_resnet", img_size=16, weights=str(tmp_path / "bad.pth")), num_classes=3, in_chans=1, seed=0)


def test_segmentation_loss_is_cross_entropy_plus_soft_dice() -> None:
    torch.manual_seed(0)
    logits, mask = torch.randn(2, 3, 8, 8, requires_grad=True), torch.randint(0, 3, (2, 8, 8))
    probs, onehot = torch.softmax(logits, 1), torch.nn.functional.one_hot(mask, 3).permute(0, 3, 1, 2).float()
    dice = [(2 * (probs[:, c] * onehot[:, c]).sum() + 1) / (probs[:, c].sum() + onehot[:, c].sum() + 1) for c in (1, 2)]
    expected = torch.nn.functional.cross_entropy(logits, mask) + 1 - (dice[0] + dice[1]) / 2
    loss = segmentation_loss(logits, mask)
    assert torch.allclose(loss, expected)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    perfect = 20.0 * torch.nn.functional.one_hot(mask, 3).permute(0, 3, 1, 2).float()
    assert segmentation_loss(perfect, mask) < 1e-3
    batch = Batch(torch.zeros(2, 1), torch.tensor([0, 1]), {}, torch.arange(2))  # no mask: plain cross-entropy
    flat = torch.randn(2, 2)
    assert torch.equal(supervised_loss(flat, batch), torch.nn.functional.cross_entropy(flat, batch.y))
    assert torch.equal(supervised_loss(logits, Batch(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), {}, torch.arange(2), mask=mask)), loss)


def test_masks_survive_the_cache(oph_root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RAYSIM_CACHE", str(tmp_path / "cache"))
    source = SyntheticOph(DataConfig(name="synthetic", root=str(oph_root)), img_size=16, seed=0)
    for spec in source.client_specs():
        for split in spec.splits:
            images_only = load_cached(source, spec, split)  # a classification run wrote the folder first
            assert images_only.masks is None
            first = load_cached(source, spec, split, masks=True)  # masks.npy added beside the images
            expected = source.load_masks(spec, split, first.table.sample_ids, 16)
            assert first.masks.shape == (len(first.table), 16, 16) and np.array_equal(first.masks, expected)
            assert set(np.unique(first.masks)) <= {0, 1, 2}
    dropped = [(spec, split) for spec in source.client_specs() for split in spec.splits if load_cached(source, spec, split).dropped]
    assert dropped  # the tiny set drops empty fundus images: masks follow the kept rows

    def unreachable(*_args: object, **_kw: object) -> np.ndarray:
        raise AssertionError("masks were decoded again instead of read from the cache")

    monkeypatch.setattr(SyntheticOph, "load_masks", unreachable)
    spec, split = dropped[0]
    again = load_cached(source, spec, split, masks=True)
    assert isinstance(again.masks, np.memmap) and len(again.masks) == len(again.table)


# --- through the engine ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", SEGMENTING)
def test_segmentation_method_runs_one_round_through_ray_actors(name: str, ray_session, oph_root: Path, tmp_path: Path) -> None:
    clocked = {"system.simulate": True} if ALGORITHMS.get(name).asynchronous else {}  # FedBuff / FedAsync run on the simulated clock
    metrics, lines = run_segmentation(oph_root, tmp_path / name, **{"algorithm.name": name, "eval.predictions": "none", **clocked})
    assert not any("failed" in line for line in lines), lines
    dice = metrics[(metrics["split"] == "test") & (metrics["metric"].isin(["dice_disc", "dice_cup"])) & (metrics["attribute"] == "")]
    roles = {f"mean:{r}" for r in dice["role"] if r}  # FedHelp adds mean:large / mean:small
    assert set(dice["client"]) == SITES | {"mean"} | roles and dice["value"].between(0, 1).all() and len(dice) == 2 * (4 + len(roles))
    assert {"es_dice", "es_dice_disc", "cdr_error", "dice_gap", "dice_disc_lo", "loss", "bytes_up"} <= set(metrics["metric"])
    assert not {"auc", "acc"} & set(metrics["metric"])


@pytest.fixture(scope="module")
def fedavg_run(ray_session, oph_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    run_dir = tmp_path_factory.mktemp("seg") / "fedavg"
    _, lines = run_segmentation(oph_root, run_dir, **{"federation.rounds": 2, "eval.bootstrap": 30})
    return run_dir, lines


@pytest.mark.filterwarnings("ignore::raysim.metrics.UndefinedMetricWarning")  # the tiny set's empty groups
def test_dice_rows_are_recomputed_from_predictions(fedavg_run: tuple[Path, list[str]]) -> None:
    run_dir, _ = fedavg_run
    cfg = load_config(run_dir / "config.yaml", [])
    metrics, preds = pd.read_parquet(run_dir / "metrics.parquet"), pd.read_parquet(run_dir / "predictions.parquet")
    assert list(preds.columns[:4]) == ["round", "split", "client", "sample_id"] and "label" not in preds and "score" not in preds
    assert set(tasks.SEGMENTATION_COLUMNS) <= set(preds.columns)
    names = SyntheticOph(cfg.data, img_size=cfg.model.img_size, seed=cfg.seed).group_names
    attributes = [a for a in names if a in preds.columns]
    checked = 0
    for (round_, split, client), rows in preds.groupby(["round", "split", "client"]):
        seed = derive_seed(cfg.seed, "boot", int(round_), client, split)
        samples = {c: rows[c].to_numpy() for c in segmetrics.SAMPLE_COLUMNS}
        recomputed = segmetrics.client_segmentation_metrics(samples, {a: rows[a].to_numpy() for a in attributes}, {a: names[a] for a in attributes}, n_boot=cfg.eval.bootstrap, seed=seed)
        stored = metrics[(metrics["round"] == round_) & (metrics["split"] == split) & (metrics["client"] == client)]
        stored = {(r.attribute, r.group, r.metric): r.value for r in stored.itertuples()}
        for attr, group, metric, value in recomputed:
            assert np.isclose(stored[(attr, group, metric)], value, equal_nan=True), (round_, split, client, attr, group, metric)
            checked += 1
    assert checked > 100
    # the mean rows are the means over clients; the intervals have none
    test = metrics[(metrics["round"] == 2) & (metrics["split"] == "test") & (metrics["attribute"] == "")]
    per_client = test[test["client"].isin(SITES)].groupby("metric")["value"].mean()
    mean = test[test["client"] == "mean"].set_index("metric")["value"]
    assert np.isclose(mean["dice_disc"], per_client["dice_disc"]) and "dice_disc_lo" not in mean


def test_segmentation_console_and_selection(fedavg_run: tuple[Path, list[str]]) -> None:
    run_dir, lines = fedavg_run
    header = next(line for line in "\n".join(lines).splitlines() if line.startswith("client"))
    assert header.split()[:7] == ["client", "Dice", "disc", "Dice", "cup", "ES-Dice", "CDR"] and "Disc Black" in header
    selection = runs.read_run(run_dir).selection()
    assert selection.metric == "dice" and selection.round in (1, 2)
    mean = pd.read_parquet(run_dir / "metrics.parquet")
    at = lambda m: runs.value(mean, round_=selection.round, split="val", metric=m)  # noqa: E731
    assert np.isclose(selection.value, (at("dice_disc") + at("dice_cup")) / 2)


def test_segmentation_does_not_depend_on_placement(fedavg_run: tuple[Path, list[str]], oph_root: Path, tmp_path: Path) -> None:
    run_dir, _ = fedavg_run
    spread, _ = run_segmentation(oph_root, tmp_path / "spread", **{"federation.rounds": 2, "eval.bootstrap": 30, "resources.clients_per_actor": 1})
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "metrics.parquet"), spread)
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "predictions.parquet"), pd.read_parquet(tmp_path / "spread" / "predictions.parquet"))


@pytest.mark.parametrize("name", REFUSING)
def test_methods_without_a_segmentation_form_refuse_in_one_line(name: str, oph_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        make_driver(oph_root, tmp_path / name, **{**SEG, "algorithm.name": name})
    message = str(err.value)
    assert "\n" not in message and f"algorithm {name} does not support the segmentation task" in message and "fedavg" in message


def test_fairseg_segments_end_to_end_and_refuses_a_classifier(ray_session, tmp_path: Path) -> None:
    from helpers import write_fairseg

    write_fairseg(tmp_path / "fairseg", n_train=30, n_test=12)
    metrics, lines = run_segmentation(tmp_path / "fairseg", tmp_path / "run", **{"data.name": "fairseg", "eval.predictions": "none"})
    dice = metrics[(metrics["split"] == "test") & (metrics["metric"] == "dice_disc") & (metrics["attribute"] == "")]
    assert set(dice["client"]) == {"client1", "client2", "client3", "mean"} and dice["value"].between(0, 1).all(), lines
    with pytest.raises(DataError, match="data.name=fairseg has no classification label.*model.name=unet:") as err:
        make_driver(tmp_path / "fairseg", tmp_path / "cls", **{**SEG, "data.name": "fairseg", "model.name": "test_resnet"}).run()
    assert "\n" not in str(err.value)
