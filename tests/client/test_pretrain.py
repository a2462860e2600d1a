"""The public pool of the synthetic generator and `raysim.pretrain` (checkpoint, cache, resolve_weights)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from raysim import algorithms
from raysim import pretrain as pretrain_command
from raysim.algorithms import Algorithm, register_algorithm
from raysim.client import pretraining as pretrain
from raysim.config import ExperimentConfig, ModelConfig
from raysim.datasets import synthetic
from raysim.models.backbones import build_model

POOL = {"patients": 300, "fundus_size": 16, "oct_shape": (4, 4, 4)}
TINY = {"patients": 60, "epochs": 1}  # PretrainSettings overrides: a checkpoint in about a second


@register_algorithm("test_pretrain_needs_backbone")
class NeedsBackbone(Algorithm):
    """A throwaway adapter-style method: only its flag matters here."""

    needs_pretrained = True


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    clinical, public = tmp_path_factory.mktemp("clinical"), tmp_path_factory.mktemp("public")
    synthetic.generate(clinical, **POOL)
    synthetic.generate(public, population="public", **POOL)
    return clinical, public


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (root / "all").glob("*.npz")}


def test_public_pool_is_disjoint_from_the_clinical_set(two_sets: tuple[Path, Path]) -> None:
    clinical, public = (_files(root) for root in two_sets)
    assert len(public) == len(clinical) == 300
    assert all(name.startswith("public_") for name in public) and not set(public) & set(clinical)
    assert not {hashlib.sha256(b).digest() for b in public.values()} & {hashlib.sha256(b).digest() for b in clinical.values()}
    meta = [pd.read_csv(root / "meta_all.csv", index_col=0) for root in two_sets]
    assert not np.array_equal(meta[0]["age"].to_numpy(), meta[1]["age"].to_numpy())  # other patient draws


def test_public_pool_has_its_own_sites_and_majority_mix_but_the_same_disease(two_sets: tuple[Path, Path]) -> None:
    truth = [json.loads((root / "truth.json").read_text()) for root in two_sets]
    assert truth[1]["params"]["population"] == "public" and "population" not in truth[0]["params"]
    style = lambda s: (s["gamma"], s["brightness"], s["blur"], s["noise"])  # noqa: E731
    assert not {style(s) for s in truth[0]["sites"].values()} & {style(s) for s in truth[1]["sites"].values()}
    assert truth[0]["label_model"] == truth[1]["label_model"] and truth[0]["races"] == truth[1]["races"]
    race = pd.read_csv(two_sets[1] / "meta_all.csv", index_col=0)["race"]
    assert race.value_counts(normalize=True)["white"] >= 0.8


def test_clinical_parameters_and_cache_key_are_unchanged() -> None:
    params = synthetic.generator_params()
    assert list(params) == ["version", "patients", "seed", "fundus_size", "oct_shape", "test_fraction", "empty_fraction"]
    assert synthetic.generator_params(population="clinical") == params
    # Recorded at generator version 2 (the disc/cup masks); version 1's, from before the pool existed, was 500240878514.
    assert hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12] == "a878f2ee135a"
    assert synthetic.cached_root().name == "synthetic-oph-a878f2ee135a"
    public = synthetic.generator_params(population="public")
    assert public == {**params, "population": "public"} and synthetic.cached_root(population="public") != synthetic.cached_root()
    with pytest.raises(ValueError, match="population must be one of"):
        synthetic.generator_params(population="elsewhere")


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_checkpoint_loads_through_model_weights(tmp_path: Path) -> None:
    lines: list[str] = []
    path = tmp_path / "backbone.pth"
    meta = pretrain.pretrain(pretrain.PretrainSettings(model="test_resnet", img_size=16, **TINY), path, echo=lines.append)
    assert any("epoch 1/1" in line and "AUC" in line for line in lines)
    sidecar = json.loads(path.with_name("backbone.pth.json").read_text())
    assert sidecar == json.loads(json.dumps(meta)) and sidecar["model"] == "test_resnet" and sidecar["img_size"] == 16
    assert sidecar["pool"]["population"] == "public" and 0 <= sidecar["final"]["pool_auc"] <= 1
    saved = _state(path)
    for in_chans in (3, 1):
        model = build_model(ModelConfig(name="test_resnet", img_size=16, weights=str(path)), num_classes=2, in_chans=in_chans, seed=7)
        loaded = model.state_dict()
        assert set(loaded) == set(saved)
        for key, value in saved.items():
            if key.startswith("fc."):
                continue  # the head is dropped by timm and initialised from the run's seed
            expected = value.sum(dim=1, keepdim=True) if in_chans == 1 and key == "conv1.0.weight" else value
            assert torch.equal(loaded[key], expected), key


def test_same_seed_same_checkpoint(tmp_path: Path) -> None:
    assert pretrain_command.main(["--model", "test_resnet", "--img-size", "16", "--patients", "60", "--epochs", "1", "--out", str(tmp_path / "a.pth")]) == 0
    settings = pretrain.PretrainSettings(model="test_resnet", img_size=16, **TINY)
    pretrain.pretrain(settings, tmp_path / "b.pth", echo=lambda _: None)
    pretrain.pretrain(dataclasses.replace(settings, seed=1), tmp_path / "c.pth", echo=lambda _: None)
    a, b, c = (_state(tmp_path / f"{n}.pth") for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.0.weight"], c["conv1.0.weight"])


def test_cli_rejects_an_unknown_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert pretrain_command.main(["--model", "no_such_net", "--out", str(tmp_path / "x.pth")]) == 2
    assert "not a timm model" in capsys.readouterr().err and not (tmp_path / "x.pth").exists()


def test_ensure_pretrained_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYSIM_CACHE", str(tmp_path))
    builds: list[Path] = []
    real = pretrain.pretrain
    monkeypatch.setattr(pretrain, "pretrain", lambda s, out, echo: builds.append(out) or real(s, out, echo=echo))
    model_cfg = ModelConfig(name="test_resnet", img_size=16)
    first = pretrain.ensure_pretrained(model_cfg, echo=lambda _: None, **TINY)
    assert first.is_file() and first.parent == tmp_path / "pretrained" and len(builds) == 1
    stamp = first.stat().st_mtime_ns
    assert pretrain.ensure_pretrained(model_cfg, echo=lambda _: None, **TINY) == first
    assert len(builds) == 1 and first.stat().st_mtime_ns == stamp
    assert pretrain.ensure_pretrained(model_cfg, echo=lambda _: None, **{**TINY, "epochs": 2}) != first  # settings are the key
    assert not list(first.parent.glob("*.tmp"))


def test_resolve_weights_only_for_methods_that_need_a_backbone(tmp_path: Path) -> None:
    model = ModelConfig(name="test_resnet", img_size=16)
    lines: list[str] = []
    for cfg in (
        ExperimentConfig(model=model),  # fedavg
        ExperimentConfig(model=dataclasses.replace(model, weights=str(tmp_path / "mine.pth")), algorithm={"name": NeedsBackbone.name}),
        ExperimentConfig(model=dataclasses.replace(model, pretrained=True), algorithm={"name": NeedsBackbone.name}),
    ):
        assert algorithms.with_backbone(cfg, echo=lines.append) is cfg
    assert lines == []
    cfg = ExperimentConfig(model=model, algorithm={"name": NeedsBackbone.name})
    resolved = algorithms.with_backbone(cfg, echo=lines.append)  # the defaults tests' full runs get (shared session cache)
    path = Path(resolved.model.weights)
    assert path.is_file() and cfg.model.weights is None and resolved.model.name == "test_resnet"
    assert sum(str(path) in line and "raysim.pretrain" in line for line in lines) == 1
    assert algorithms.with_backbone(cfg, echo=lines.append).model.weights == str(path)
