"""The small CLIP (issue 31, item 4): `RaySim-Tiny-ViT` in open_clip's registry, trained
contrastively by `raysim.pretrain --clip` on captioned public-pool images (deterministic, cached,
loadable by open_clip and by a `clip:` host), its pool checked disjoint from the clients' data,
picked by `resolve_weights` for the tiny architecture only. Real builds, kept tiny (60 patients,
1 epoch, 32 px): about a second each."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch

from raysim import pretrain as pretrain_command
from raysim.client import clip_pretraining as clip_pre
from raysim.client import pretraining
from raysim.config import ConfigError, DataConfig, ExperimentConfig, ModelConfig
from raysim.datasets import synthetic
from raysim.models import clip_tiny
from raysim.models.backbones import build_model
from raysim.models.clip import CLIPClassifier

NAMES = ["NOT Glaucoma", "Glaucoma"]
TINY = {"img_size": 32, "patients": 60, "epochs": 1, "batch_size": 16}  # a checkpoint in about a second
TINY_FLAGS = ["--clip", "--img-size", "32", "--patients", "60", "--epochs", "1", "--batch-size", "16"]


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    lines: list[str] = []
    meta = clip_pre.pretrain(clip_pre.ClipPretrainSettings(**TINY), path, echo=lines.append)
    assert any("epoch 1/1" in line and "zero-shot AUC" in line for line in lines)
    return path, meta


def test_the_tiny_arch_is_registered_once_as_a_standard_open_clip_vit() -> None:
    assert clip_tiny.register() == clip_tiny.register() == clip_tiny.TINY_ARCH
    assert clip_tiny.TINY_ARCH in open_clip.list_models() and open_clip.list_models().count(clip_tiny.TINY_ARCH) == 1
    model = clip_pre.build(clip_tiny.TINY_ARCH, 32, seed=0)
    assert type(model.visual).__name__ == "VisionTransformer" and model.context_length == 77
    assert open_clip.get_tokenizer(clip_tiny.TINY_ARCH)(["a photo of Glaucoma."]).shape == (1, 77)  # open_clip's default tokenizer


def test_the_checkpoint_loads_into_the_open_clip_arch_and_the_clip_host(built: tuple[Path, dict]) -> None:
    path, meta = built
    sidecar = json.loads(Path(f"{path}.json").read_text())
    assert sidecar == json.loads(json.dumps(meta)) and sidecar["created_by"] == "raysim.pretrain" and sidecar["model"] == "clip:RaySim-Tiny-ViT"
    assert sidecar["pool"]["population"] == "public" and 0 <= sidecar["final"]["zero_shot_auc"] <= 1
    saved = _state(path)
    model = open_clip.create_model(clip_tiny.TINY_ARCH, pretrained=str(path), force_image_size=32)
    assert set(model.state_dict()) == set(saved) and all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    host = build_model(ModelConfig(name="clip:RaySim-Tiny-ViT", img_size=32, weights=str(path)), num_classes=2, in_chans=1, seed=5, class_names=NAMES)
    assert isinstance(host, CLIPClassifier) and all(torch.equal(v, saved[f"visual.{k}"]) for k, v in host.visual.state_dict().items())
    assert host(torch.rand(2, 1, 32, 32)).shape == (2, 2)


def test_same_settings_give_a_bit_identical_checkpoint(built: tuple[Path, dict], tmp_path: Path) -> None:
    assert pretrain_command.main([*TINY_FLAGS, "--out", str(tmp_path / "cli.pt")]) == 0  # the CLI, the same settings
    clip_pre.pretrain(dataclasses.replace(clip_pre.ClipPretrainSettings(**TINY), seed=1), tmp_path / "seed1.pt", echo=lambda _: None)
    first, again, other = _state(built[0]), _state(tmp_path / "cli.pt"), _state(tmp_path / "seed1.pt")
    assert set(first) == set(again) and all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["visual.conv1.weight"], other["visual.conv1.weight"])


def test_captions_are_a_deterministic_function_of_label_and_attributes() -> None:
    patient = {"age": "62.7", "race": "black", "gender": "female", "language": "english"}
    first = clip_pre.caption(1, patient)
    assert first == clip_pre.caption(1, dict(patient)) == "a fundus photo of Glaucoma, of a 63 year old black female patient."
    assert clip_pre.caption(0, patient).startswith("a fundus photo of NOT Glaucoma,")  # the source's class names
    assert clip_pre.caption(1, {**patient, "race": "unknown"}) == "a fundus photo of Glaucoma, of a 63 year old female patient."
    for template in range(len(clip_pre.TEMPLATES)):
        texts = [clip_pre.caption(label, patient, template) for label in (0, 1)]
        assert "NOT Glaucoma" in texts[0] and "Glaucoma" in texts[1] and "NOT" not in texts[1]
    assert clip_pre.CLASS_NAMES == tuple(NAMES)


def test_the_pool_captions_follow_its_rows(built: tuple[Path, dict]) -> None:
    split = clip_pre.load_pool(Path(built[1]["pool_root"]), 32)["train"]
    rows = split.rows.to_dict("records")
    assert split.captions(2) == [clip_pre.caption(int(row["glaucoma"] == "yes"), row, 2) for row in rows]
    assert split.captions(0) == clip_pre.load_pool(Path(built[1]["pool_root"]), 32)["train"].captions(0)


def test_the_cut_text_encoder_matches_open_clips(built: tuple[Path, dict]) -> None:
    model = open_clip.create_model(clip_tiny.TINY_ARCH, pretrained=str(built[0]), force_image_size=32)
    tokens = open_clip.get_tokenizer(clip_tiny.TINY_ARCH)(["a photo of NOT Glaucoma.", clip_pre.caption(1, {"age": 70, "race": "asian", "gender": "male"})])
    length = int((tokens != 0).sum(dim=1).max())
    with torch.no_grad():
        assert torch.allclose(clip_pre.encode_text(model, tokens[:, :length]), model.encode_text(tokens), atol=1e-5)


# --- disjoint from the clients -------------------------------------------------------------------


def test_the_pool_is_disjoint_from_a_clinical_set_and_not_from_its_own_copies(built: tuple[Path, dict], tmp_path: Path) -> None:
    from raysim.algorithms.fedhelp_public import Pool

    pool = clip_pre.pool_of_checkpoint(built[0])
    clinical = tmp_path / "clinical"
    synthetic.generate(clinical, patients=60, fundus_size=32, oct_shape=(4, 4, 4))
    clients = Pool("the run's data", clinical.resolve(), json.loads((clinical / "truth.json").read_text())["params"])
    clip_pre.check_disjoint(pool, clients)  # another population: no shared patient
    copied = sorted((pool.root / "all").glob("*.npz"))[:2]
    for file in copied:
        shutil.copy(file, clinical / "all" / file.name)  # the overlap, by hand: two pool images among the clients'
    with pytest.raises(ConfigError, match=f"overlaps the clients' data .*2 sample files are copies of the pool's \\(e.g. {copied[0].name}\\)"):
        clip_pre.check_disjoint(pool, clients)
    with pytest.raises(ConfigError, match="both are the synthetic public population drawn with generator seed 0"):
        clip_pre.check_disjoint(pool, Pool("elsewhere", tmp_path / "other", dict(pool.params)))  # the same patients, drawn again


def test_a_run_whose_data_is_the_pool_is_refused(built: tuple[Path, dict]) -> None:
    cfg = ExperimentConfig(model=ModelConfig(name="clip:RaySim-Tiny-ViT", img_size=32), data=DataConfig(name="fairfedmed_oph", root=built[1]["pool_root"]))
    with pytest.raises(ConfigError, match="the small CLIP's training pool .* overlaps the clients' data .*: both read"):
        clip_pre.check_clients(built[0], cfg)
    clip_pre.check_clients(built[0], dataclasses.replace(cfg, data=DataConfig()))  # the clinical twin


# --- the command ---------------------------------------------------------------------------------


def test_cli_clip_writes_the_checkpoint_and_its_sidecar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "clip.pt"
    assert pretrain_command.main([*TINY_FLAGS, "--out", str(out)]) == 0
    assert out.is_file() and Path(f"{out}.json").is_file()
    assert f"use it with model.name=clip:RaySim-Tiny-ViT model.weights={out}" in capsys.readouterr().out
    assert json.loads(Path(f"{out}.json").read_text())["training"]["epochs"] == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--clip", "--img-size", "0"], "pretrain img_size must be a positive finite number, got 0"),
        (["--clip", "--img-size", "4"], "pretrain img_size must be at least the RaySim-Tiny-ViT patch size (8 px), got 4"),
        (["--clip", "--model", "resnet18"], "pretrain arch 'resnet18' is not an open_clip architecture (the small CLIP is RaySim-Tiny-ViT)"),
        (["--clip", "--model", "RN50"], "pretrain arch 'RN50': the CLIP pretraining trains an open_clip ViT"),
        (["--clip", "--batch-size", "1"], "pretrain batch_size must be >= 2"),
    ],
)
def test_cli_bad_clip_input_is_one_line(flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert pretrain_command.main([*flags, "--out", str(tmp_path / "x" / "clip.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_cli_out_a_directory_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert pretrain_command.main([*TINY_FLAGS, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out {tmp_path} is a directory; give the checkpoint file to write\n"


# --- what runs use -------------------------------------------------------------------------------


def test_resolve_weights_picks_the_cached_small_clip_and_leaves_other_clip_hosts(built: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYSIM_CACHE", str(tmp_path))
    model = ModelConfig(name="clip:RaySim-Tiny-ViT", img_size=32)
    cached = clip_pre.ClipPretrainSettings(arch=model.name, img_size=32).cache_path()
    assert cached.parent == tmp_path / "pretrained" and cached.name.startswith("clip-RaySim-Tiny-ViT-32px-")
    cached.parent.mkdir(parents=True)
    for suffix in ("", ".json"):  # the tiny build stands in for the default one (about two minutes)
        shutil.copy(f"{built[0]}{suffix}", f"{cached}{suffix}")
    lines: list[str] = []
    cfg = ExperimentConfig(model=model)
    resolved = pretraining.resolve_weights(cfg, needs_pretrained=True, echo=lines.append)
    assert resolved.model.weights == str(cached) and cfg.model.weights is None
    assert len(lines) == 1 and str(cached) in lines[0] and "raysim.pretrain --clip" in lines[0]
    assert pretraining.resolve_weights(cfg, needs_pretrained=False, echo=lines.append).model.weights == str(cached)  # FedAvg fine-tunes the small CLIP too
    lines.pop()
    rn50 = ExperimentConfig(model=ModelConfig(name="clip:RN50", img_size=32))
    assert pretraining.resolve_weights(rn50, needs_pretrained=True, echo=lines.append) is rn50  # a seeded random host: nothing to download
    assert len(lines) == 1 and not list((tmp_path / "pretrained").glob("*RN50*"))


def test_ensure_clip_pretrained_builds_once_per_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYSIM_CACHE", str(tmp_path))
    model = ModelConfig(name="clip:RaySim-Tiny-ViT", img_size=32)
    settings = {k: v for k, v in TINY.items() if k != "img_size"}
    lines: list[str] = []
    first = clip_pre.ensure_clip_pretrained(model, echo=lines.append, **settings)
    stamp = first.stat().st_mtime_ns
    assert first.is_file() and first.parent == tmp_path / "pretrained" and sum("building it once" in line for line in lines) == 1
    assert clip_pre.ensure_clip_pretrained(model, echo=lines.append, **settings) == first and first.stat().st_mtime_ns == stamp
    assert sum("building it once" in line for line in lines) == 1 and not list(first.parent.glob("*.tmp"))
