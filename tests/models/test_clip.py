"""The CLIP host (issue 31, item 1; in progress): `clip:<open_clip architecture>` from a local
checkpoint (a randomly initialised one written here: no download), classifying by the cosine
similarity of image features with one prompt per class; nothing of the text side is in the
state dict; bad input in one line."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch

from raysim.config import ConfigError, ModelConfig
from raysim.models.backbones import build_model, normalization
from raysim.models.clip import CLIP_MEAN, CLIPClassifier

from helpers import load_config

NAMES = ["NOT Glaucoma", "Glaucoma"]


@pytest.fixture(scope="module")
def vit_b16_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The paper's host, randomly initialised (seed 7), as an open_clip state-dict file."""
    torch.manual_seed(7)
    model = open_clip.create_model("ViT-B-16", pretrained=None)
    path = tmp_path_factory.mktemp("clip") / "vit_b16.pt"
    torch.save(model.state_dict(), path)
    return path


def test_the_papers_host_builds_from_a_local_checkpoint_and_classifies_by_prompts(vit_b16_checkpoint: Path) -> None:
    model = build_model(ModelConfig(name="clip:ViT-B-16", img_size=224, weights=str(vit_b16_checkpoint)), num_classes=2, in_chans=1, seed=0, class_names=NAMES)
    assert isinstance(model, CLIPClassifier) and model.num_classes == 2
    saved = torch.load(vit_b16_checkpoint, weights_only=True)
    assert all(torch.equal(v, saved[f"visual.{k}"]) for k, v in model.visual.state_dict().items())  # the file's image tower
    assert all(k.startswith("visual.") for k in model.state_dict())  # text features and logit scale are not state: never sent
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    full = open_clip.create_model("ViT-B-16", pretrained=str(vit_b16_checkpoint))
    with torch.no_grad():
        text = torch.nn.functional.normalize(full.encode_text(tokenizer(["a photo of NOT Glaucoma.", "a photo of Glaucoma."])), dim=-1)
        x = torch.rand(2, 1, 224, 224)
        image = torch.nn.functional.normalize(full.encode_image(x.expand(-1, 3, -1, -1)), dim=-1)
        expected = full.logit_scale.exp() * image @ text.t()
        assert torch.allclose(model(x), expected, atol=1e-5)  # CLIP's zero-shot logits, a grayscale image as 3 equal channels
    mean, _ = normalization(model, 3)
    assert torch.allclose(mean.flatten(), torch.tensor(CLIP_MEAN))


def test_the_same_seed_builds_the_same_random_host() -> None:
    cfg = ModelConfig(name="clip:RN50", img_size=64)
    a, b = (build_model(cfg, num_classes=2, in_chans=3, seed=3, class_names=NAMES) for _ in range(2))
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert a(torch.rand(1, 3, 64, 64)).shape == (1, 2)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"name": "clip:ViT-B-16", "pretrained": True}, "model.pretrained=true with model.name=clip:ViT-B-16: open_clip would download"),
        ({"name": "clip:ViT-Q-99"}, "'ViT-Q-99' is not an open_clip architecture"),
        ({"name": "clip:RN50", "weights": "/no/such/file.pt"}, "model.weights=/no/such/file.pt is not a file"),
    ],
)
def test_bad_clip_settings_are_one_line(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_model(ModelConfig(img_size=64, **settings), num_classes=2, in_chans=1, seed=0, class_names=NAMES)


def test_a_file_that_is_no_checkpoint_for_the_architecture_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pt"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ConfigError, match=f"model.weights={path}: not an open_clip checkpoint for RN50"):
        build_model(ModelConfig(name="clip:RN50", img_size=64, weights=str(path)), num_classes=2, in_chans=1, seed=0, class_names=NAMES)


def test_the_default_adapter_targets_of_clip_hosts_are_the_papers() -> None:
    """specs/fairfedmed.md: ViT-B/16, every MLP linear of all 12 blocks (attention not adapted);
    RN50, the 1x1 convolutions conv1 and conv3 of every bottleneck."""
    from raysim.models.adapters import default_rank, default_targets

    vit = build_model(ModelConfig(name="clip:ViT-B-16", img_size=32), num_classes=2, in_chans=3, seed=0, class_names=NAMES)
    targets = default_targets(vit)
    assert targets == [f"visual.transformer.resblocks.{i}.mlp.{fc}" for i in range(12) for fc in ("c_fc", "c_proj")]
    assert default_rank(vit) == (12, 2.0)
    rn50 = build_model(ModelConfig(name="clip:RN50", img_size=64), num_classes=2, in_chans=3, seed=0, class_names=NAMES)
    convs = default_targets(rn50)
    assert len(convs) == 2 * 16 and all(n.endswith((".conv1", ".conv3")) for n in convs)
    assert all(rn50.get_submodule(n).kernel_size == (1, 1) for n in convs) and default_rank(rn50) == (32, 8.0)


def test_a_bad_clip_host_is_refused_before_any_actor_starts(tmp_path: Path) -> None:
    from raysim.engine.driver import Driver

    cfg = load_config(None, ["model.name=clip:ViT-Q-99", "report.html=false"])
    (tmp_path / "run").mkdir()
    with pytest.raises(ConfigError, match="'ViT-Q-99' is not an open_clip architecture"):
        Driver(cfg, tmp_path / "run")  # what the CLI builds before Ray starts


# --- PromptFL (issue 31, item 2) ---------------------------------------------------------------


def promptfl_host(root: Path, **extra: object):
    from helpers import make_host

    return make_host(root, "promptfl", **{"model.name": "clip:RN50", "model.img_size": 32, "algorithm.n_ctx": 4, **extra})


def test_promptfl_trains_and_sends_only_the_prompt_context(oph_root: Path) -> None:
    from helpers import start

    host = promptfl_host(oph_root)
    model = host.clients["site1"].model
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt.ctx"]
    assert host.algorithm.communicated(model) == ["prompt.ctx"]  # frozen towers, frozen BatchNorm statistics: nothing else travels
    state, payload = start(host)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    update = host.fit("site1", payload, 1)
    assert list(update.tensors) == ["prompt.ctx"] and update.tensors["prompt.ctx"].shape == (1, 4, 512)
    assert not torch.equal(update.tensors["prompt.ctx"], payload["prompt.ctx"])  # the context trained
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k != "prompt.ctx")  # the towers did not move
    assert update.tensors["prompt.ctx"].numel() * 4 < 10_000  # bytes a round: the point of the family


def test_the_class_features_follow_the_context() -> None:
    model = build_model(ModelConfig(name="clip:RN50", img_size=32), num_classes=2, in_chans=1, seed=0, class_names=NAMES)
    from raysim.models.clip import build_clip_classifier

    prompted = build_clip_classifier(ModelConfig(name="clip:RN50", img_size=32), class_names=NAMES, in_chans=1, seed=0, n_ctx=4)
    first = prompted.class_features().detach().clone()
    with torch.no_grad():
        prompted.prompt.ctx.add_(0.5)
    assert not torch.allclose(first, prompted.class_features())
    assert all(torch.equal(v, prompted.visual.state_dict()[k]) for k, v in model.visual.state_dict().items())  # the same seeded host


def test_promptfl_refuses_a_host_that_is_not_clip(oph_root: Path) -> None:
    from raysim.algorithms import build

    with pytest.raises(ConfigError, match="algorithm promptfl needs a CLIP host"):
        build(load_config(None, ["algorithm.name=promptfl"]))
    with pytest.raises(ConfigError, match=r"n_ctx must be an integer in \[1, 60\]"):
        build(load_config(None, ["algorithm.name=promptfl", "model.name=clip:RN50", "algorithm.n_ctx=0"]))


def test_the_fairfedmed_clip_preset_runs_end_to_end_on_the_small_clip(ray_session, oph_root: Path, small_clip: Path, tmp_path: Path) -> None:
    """`--config fairfedmed_clip` as a user runs it, on the tiny set at 32 px for 2 rounds."""
    import pandas as pd

    from raysim.run import main

    overrides = [f"model.weights={small_clip}", "model.img_size=32", "federation.rounds=2", "data.name=fairfedmed_oph", f"data.root={oph_root}", "resources.num_cpus=0.25", "report.html=false"]
    assert main(["--config", "fairfedmed_clip", "--out", str(tmp_path / "run"), *overrides]) == 0
    metrics = pd.read_parquet(tmp_path / "run" / "metrics.parquet")
    auc = metrics[(metrics["split"] == "test") & (metrics["metric"] == "auc") & (metrics["attribute"] == "") & (metrics["round"] == 2)]
    assert set(auc["client"]) == {"site1", "site2", "site3", "mean"}


def test_the_fairfedmed_clip_preset_with_a_vit_b16_file_builds_the_papers_host(vit_b16_checkpoint: Path) -> None:
    """model.name=clip:ViT-B-16 model.weights=FILE: FairLoRA (rank 12, alpha 2, one row of S per
    race group) on both MLP linears of all 12 blocks, 2 prompts of 4 words (one shared), the
    file's towers underneath."""
    from raysim.algorithms import build
    from raysim.models.adapters import FairLoRA

    cfg = load_config("fairfedmed_clip", ["model.name=clip:ViT-B-16", f"model.weights={vit_b16_checkpoint}", "model.img_size=224"])
    algorithm = build(cfg)

    class Race:  # what the model needs of the source: class names, channels, the target's groups
        class_names, num_classes, channels, volume_slices, channel_split = tuple(NAMES), 2, 1, None, (1,)
        attribute, group_names = "race", {"race": {0: "Asian", 1: "Black", 2: "White"}}
    model = algorithm.build_model(Race())
    fair = {n: m for n, m in model.named_modules() if isinstance(m, FairLoRA)}
    assert sorted(fair) == sorted(f"visual.transformer.resblocks.{i}.mlp.{fc}" for i in range(12) for fc in ("c_fc", "c_proj"))
    assert all(m.rank == 12 and m.scale == 2 / 12 and m.lora_S.shape == (3, 12) for m in fair.values())
    assert model.prompt.ctx.shape == (1, 4, 512) and model.prompt.local_ctx.shape == (1, 4, 512) and model.transport.kind == "mean"
    saved = torch.load(vit_b16_checkpoint, weights_only=True)
    assert torch.equal(model.visual.transformer.resblocks[0].mlp.c_fc.base.weight, saved["visual.transformer.resblocks.0.mlp.c_fc.weight"])
    assert torch.equal(model.transformer.resblocks[0].mlp.c_fc.weight, saved["transformer.resblocks.0.mlp.c_fc.weight"])  # the text tower, unadapted


def test_class_names_and_the_prompt_template_are_configurable() -> None:
    cfg = ModelConfig(name="clip:RN50", img_size=32, class_names=["healthy eye", "glaucomatous eye"], prompt="a fundus photograph of a {}.")
    model = build_model(cfg, num_classes=2, in_chans=1, seed=0, class_names=NAMES)
    torch.manual_seed(0)
    full = open_clip.create_model("RN50", pretrained=None, force_image_size=32)
    with torch.no_grad():
        text = torch.nn.functional.normalize(full.encode_text(open_clip.get_tokenizer("RN50")(["a fundus photograph of a healthy eye.", "a fundus photograph of a glaucomatous eye."])), dim=-1)
    assert torch.allclose(model.text_features, text, atol=1e-5)
    with pytest.raises(ConfigError, match=r"model.class_names: 3 class names for 2 classes"):
        build_model(ModelConfig(name="clip:RN50", img_size=32, class_names=["a", "b", "c"]), num_classes=2, in_chans=1, seed=0)
    with pytest.raises(ConfigError, match=r"model.prompt must hold \{\} exactly once"):
        load_config(None, ["model.prompt=a photo"])


def test_scoring_reuses_the_class_features_until_the_context_changes() -> None:
    """Without gradients the text tower runs once per state of the context, not once per batch."""
    from raysim.models.clip import build_clip_classifier

    model = build_clip_classifier(ModelConfig(name="clip:RN50", img_size=32), class_names=NAMES, in_chans=1, seed=0, n_ctx=4).eval()
    calls = []
    model.transformer.register_forward_hook(lambda *_: calls.append(1))
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        first = model(x)
        assert torch.equal(model(x), first) and len(calls) == 1
        model.load_state_dict({**model.state_dict(), "prompt.ctx": model.prompt.ctx + 0.5})
        moved = model(x)
    assert len(calls) == 2 and not torch.equal(moved, first)  # recomputed for the new context
    with torch.no_grad():
        assert torch.equal(model(x), moved)
    assert torch.allclose(model(x), moved, atol=1e-6) and len(calls) == 3  # with gradients: every pass runs the text tower
