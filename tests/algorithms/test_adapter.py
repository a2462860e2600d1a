"""`adapter` (AdaptFormer's parallel bottleneck adapters; raysim's stand-in for FairFedMed's
ViT-Adapter row): one adapter beside every transformer block's MLP of the image tower, the
adapted model starts as the pretrained one, only adapters (and a timm head) train and travel,
hosts without transformer blocks are refused in one line."""

from __future__ import annotations

import re

import pytest
import torch

from raysim.algorithms import build
from raysim.config import ConfigError
from raysim.models.adapters import ParallelAdapter
from raysim.models.backbones import build_model

from helpers import load_config


class Source:
    class_names, num_classes, channels, volume_slices, channel_split = ("NOT Glaucoma", "Glaucoma"), 2, 1, None, (1,)


def adapted(model_name: str, *extra: str):  # type: ignore[no-untyped-def]
    cfg = load_config(None, ["algorithm.name=adapter", "data.name=synthetic", f"model.name={model_name}", "model.img_size=32", *extra])
    algorithm = build(cfg)
    return algorithm, cfg, algorithm.build_model(Source())


def test_a_clip_vit_gets_one_adapter_per_image_block_and_starts_as_the_pretrained_model() -> None:
    algorithm, cfg, model = adapted("clip:RaySim-Tiny-ViT")
    placed = [n for n, m in model.named_modules() if isinstance(m, ParallelAdapter)]
    assert placed == [f"visual.transformer.resblocks.{i}.mlp" for i in range(4)]  # image tower only; CLIP's text head is fixed
    plain = build_model(cfg.model, num_classes=2, in_chans=1, seed=cfg.seed, class_names=Source.class_names)
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), plain(x), atol=1e-6)  # up = 0: the pretrained function
    sent = algorithm.communicated(model)
    assert sent and all(re.fullmatch(r"visual\.transformer\.resblocks\.\d\.mlp\.(down|up)\.(weight|bias)", k) for k in sent)
    assert model.get_submodule(placed[0]).down.weight.shape == (64, 128)  # AdaptFormer's bottleneck 64


def test_a_timm_vit_trains_its_adapters_and_head_and_norms_only_with_train_norm() -> None:
    algorithm, _, model = adapted("test_vit", "algorithm.bottleneck=8")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".mlp.down." in n or ".mlp.up." in n or n.startswith("head.") for n in trained)
    _, _, with_norms = adapted("test_vit", "algorithm.bottleneck=8", "algorithm.train_norm=true")
    assert any(".norm" in n for n, p in with_norms.named_parameters() if p.requires_grad)


@pytest.mark.parametrize(("extra", "message"), [(["model.name=clip:RN50"], "model.name=clip:RN50 has none (use a ViT"), (["model.name=clip:RaySim-Tiny-ViT", "algorithm.bottleneck=0"], "algorithm.bottleneck must be an integer >= 1")])
def test_bad_hosts_and_settings_are_one_line(extra: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        adapted(*extra[:1][0].split("=", 1)[1:], *extra[1:])
