"""The CLIP prompt family's defining rules (issue 31): PromptFL and FedOTP train and send only
prompt contexts, FedOTP's local prompts stay with each client; FedLoRA / FairLoRA on a `clip:`
host put adapters on the image tower's MLPs only (RN50: the 1x1 convolutions, plain LoRA on
the attention pool) beside the prompt head, the text tower frozen; a round's bytes are the
prompts' (tiny against the image tower FedAvg sends); bad settings in one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from raysim.algorithms import ALGORITHMS
from raysim.algorithms import params as algorithm_params
from raysim.algorithms.prompt_head import LOCAL_PROMPTS
from raysim.config import ConfigError
from raysim.models import adapters
from raysim.models.backbones import exchangeable_keys

from helpers import load_config, make_host, start

TINY = {"model.name": "clip:RaySim-Tiny-ViT", "model.img_size": 32, "algorithm.n_ctx": 4}  # random tiny CLIP: 16 patches


def payload_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_fedotp_sends_the_shared_prompts_and_each_client_keeps_its_local_ones(oph_root: Path) -> None:
    host = make_host(oph_root, "fedotp", **TINY)
    site1, site2 = host.clients["site1"], host.clients["site2"]
    assert {k for k, p in site1.model.named_parameters() if p.requires_grad} == {"prompt.ctx", LOCAL_PROMPTS}  # towers frozen
    state, payload = start(host)
    assert set(payload) == {"prompt.ctx"} and payload["prompt.ctx"].shape == (1, 4, 128)  # 1 of N = 2 prompts averaged
    updates = [host.fit("site1", payload, 1), host.fit("site2", payload, 1)]
    assert all(set(u.tensors) == {"prompt.ctx"} for u in updates)
    assert not torch.equal(site1.own_state[LOCAL_PROMPTS], site2.own_state[LOCAL_PROMPTS])  # each trained its own
    merged = host.algorithm.aggregate(1, updates, state)
    n1, n2 = (u.num_examples for u in updates)
    expected = (n1 * updates[0].tensors["prompt.ctx"].double() + n2 * updates[1].tensors["prompt.ctx"].double()) / (n1 + n2)
    assert torch.allclose(merged["weights"]["prompt.ctx"].double(), expected, atol=1e-6)
    host.evaluate("site1", host.algorithm.payload(merged, 1), ["test"])
    scored = site1.model.state_dict()  # scored with [new shared; own local]
    assert torch.equal(scored[LOCAL_PROMPTS], site1.own_state[LOCAL_PROMPTS])
    assert torch.equal(scored["prompt.ctx"], merged["weights"]["prompt.ctx"])


@pytest.mark.parametrize("name", ["promptfl", "fedotp", "fedlora", "fairlora"])
def test_a_rounds_bytes_are_the_prompts_and_adapters_not_the_image_tower(oph_root: Path, name: str) -> None:
    host = make_host(oph_root, name, **TINY)
    _, payload = start(host)
    fedavg = make_host(oph_root, "fedavg", **{k: v for k, v in TINY.items() if k.startswith("model.")})
    _, full = start(fedavg)
    share = payload_bytes(payload) / payload_bytes(full)
    expected_prompts = 4 * 128 * 4  # one shared 4-word context of width 128, float32
    assert payload_bytes({k: v for k, v in payload.items() if k.startswith("prompt.")}) == expected_prompts
    # the point of the family: prompts are ~0.1 % of the tiny CLIP's image tower (0.02 % of
    # ViT-B/16's); rank-12 adapters and norm affines ~8 % of this tiny tower (~1 % of ViT-B/16's)
    assert share < (0.002 if name in ("promptfl", "fedotp") else 0.1), share


def test_fairlora_on_a_clip_host_adapts_the_image_mlps_only_and_freezes_the_text_tower(oph_root: Path) -> None:
    host = make_host(oph_root, "fairlora", **TINY, **{"algorithm.rank": 6})
    model = host.clients["site1"].model
    adapted = [n for n, m in model.named_modules() if isinstance(m, adapters.LowRankAdapter)]
    assert len(adapted) == 8 and all(re.fullmatch(r"visual\.transformer\.resblocks\.\d\.mlp\.c_(fc|proj)", n) for n in adapted)  # 4 blocks x fc1, fc2
    assert all(isinstance(m, adapters.FairLoRA) for n, m in model.named_modules() if n in adapted)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("transformer.", "ln_final.", "text_projection")) for n in trained)  # the text tower never trains
    assert not any(".attn." in n for n in trained)  # attention is not adapted
    assert {"prompt.ctx", LOCAL_PROMPTS} <= trained and any(n.endswith("lora_S") for n in trained)
    assert LOCAL_PROMPTS not in host.algorithm.communicated(model) and "prompt.ctx" in host.algorithm.communicated(model)
    assert host.algorithm.params.ot == "mean"  # FairFedMed's shipped scripts: OT=None


def test_fedlora_on_clip_rn50_adapts_the_1x1_convolutions_and_the_attention_pool() -> None:
    cfg = load_config(None, ["algorithm.name=fedlora", "data.name=synthetic", "model.name=clip:RN50", "model.img_size=32", "algorithm.n_ctx=4"])
    algorithm = ALGORITHMS.get("fedlora")(algorithm_params(cfg), cfg)

    class Source:
        class_names, num_classes, channels, volume_slices, channel_split = ("NOT Glaucoma", "Glaucoma"), 2, 1, None, (1,)
    model = algorithm.build_model(Source())
    adapted = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, adapters.LowRankAdapter)}
    convs = [n for n in adapted if ".attnpool." not in n]
    assert convs and all(re.fullmatch(r"visual\.layer\d\.\d+\.conv[13]", n) for n in convs)  # never the 3x3 conv2
    assert {n for n in adapted if ".attnpool." in n} == {f"visual.attnpool.{p}" for p in ("q_proj", "k_proj", "v_proj", "c_proj")}
    assert algorithm.params.rank_alpha(model) == (32, 8.0)  # FairFedMed's RN50 rank and alpha
    x = torch.rand(2, 1, 32, 32)
    before = model(x)
    for name in adapted:  # B = 0 at start: the adapted host is the loaded one; a nonzero B changes the output
        torch.nn.init.normal_(model.get_submodule(name).lora_B)
    assert torch.allclose(before, before) and not torch.allclose(model(x), before)
    assert set(exchangeable_keys(model)) >= {f"{n}.lora_A" for n in adapted}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algorithm.name=fedotp", "model.name=resnet18"], "algorithm fedotp needs a CLIP host (model.name=clip:<open_clip architecture>"),
        (["algorithm.name=fedotp", "model.name=clip:RN50", "algorithm.shared=3"], "algorithm.shared must be an integer in [1, 2]"),
        (["algorithm.name=fedotp", "model.name=clip:RN50", "algorithm.ot=emd"], "algorithm.ot must be one of cot, sinkhorn, mean, pooled"),
        (["algorithm.name=fairlora", "model.name=clip:RN50", "algorithm.n_ctx=0"], "algorithm.n_ctx must be an integer in [1, 60]"),
        (["algorithm.name=dp_lora", "model.name=clip:RN50"], "algorithm dp_lora on model.name=clip:RN50: this adapter method has no CLIP prompt head"),
    ],
)
def test_bad_prompt_settings_are_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        cfg = load_config(None, ["data.name=synthetic", *overrides])
        ALGORITHMS.get(cfg.algorithm["name"])(algorithm_params(cfg), cfg)



@pytest.mark.parametrize("name", ["fedotp", "fairlora"])
def test_the_oct_front_end_feeds_a_clip_host(oph_root: Path, name: str) -> None:
    """OCT volumes: a SliceFold folds each group of B-scans to 3 channels for the image tower
    (FairFedMed's `proj_per_3d_slice`, trained and sent); the prompt head and adapters sit behind it."""
    host = make_host(oph_root, name, **TINY, **{"data.modality": "oct_bscans"} | ({"algorithm.rank": 6} if name == "fairlora" else {}))
    model = host.clients["site1"].model
    assert type(model).__name__ == "SliceFold"
    sent = host.algorithm.communicated(model)
    assert {"fold.weight", "fold.bias", "backbone.prompt.ctx"} <= set(sent) and f"backbone.{LOCAL_PROMPTS}" not in sent
    if name == "fairlora":
        assert any(k.startswith("backbone.visual.transformer.resblocks.0.mlp.c_fc.lora_") for k in sent)
    _, payload = start(host)
    update = host.fit("site1", payload, 1)
    assert not torch.equal(update.tensors["backbone.prompt.ctx"], payload["backbone.prompt.ctx"])
    host.evaluate("site1", payload, ["test"])
