"""The prompt head's image-to-prompt matching (raysim.models.prompt_transport): FedOTP's
unbalanced plan has its marginals and is POT's entropic partial transport; the balanced one is
POT's; an image's score does not depend on the batch around it; gradients pass through the
similarities only; the patch features are the towers' own."""

from __future__ import annotations

import numpy as np
import open_clip
import ot
import pytest
import torch
from torch.nn import functional as F

from raysim.models.clip import image_features
from raysim.models.prompt_transport import Transport, balanced_plan, class_scores, partial_plan


def costs(problems: int = 5, patches: int = 49, prompts: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(problems, patches, 16, generator=g), dim=-1)
    b = F.normalize(torch.randn(problems, prompts, 16, generator=g), dim=-1)
    return 1.0 - a @ b.transpose(1, 2)


@pytest.mark.parametrize("eps", [0.1, 0.01])  # FairFedMed's and FedOTP's ε
def test_the_cot_plan_has_fedotps_marginals_and_is_pots_partial_transport(eps: float) -> None:
    cost = costs(problems=2).double()  # POT solves one at a time, slowly at ε = 0.01 (3,000 sweeps to agree to 1e-7)
    plan = partial_plan(cost, Transport(eps=eps, max_iter=3000, thresh=1e-12))
    m, n = cost.shape[1:]
    assert torch.allclose(plan.sum(dim=1), torch.full((len(cost), n), 0.8 / n, dtype=plan.dtype), atol=1e-9)  # each prompt: top_percent / N
    assert bool((plan.sum(dim=2) <= 1.0 / m + 1e-7).all())  # each patch gives at most 1/M (the last projection is the prompts')
    assert torch.allclose(plan.sum(dim=(1, 2)), torch.full((len(cost),), 0.8, dtype=plan.dtype), atol=1e-9)
    for k in range(len(cost)):
        reference = ot.partial.entropic_partial_wasserstein(np.full(m, 1 / m), np.full(n, 0.8 / n), cost[k].numpy(), reg=eps, m=0.8, numItermax=3000, stopThr=1e-14, method="sinkhorn_log")
        assert np.abs(plan[k].numpy() - reference).max() < 1e-6


def test_the_balanced_plan_is_pots_sinkhorn() -> None:
    cost = costs().double()
    plan = balanced_plan(cost, Transport(kind="sinkhorn", eps=0.1, max_iter=2000))
    m, n = cost.shape[1:]
    for k in range(len(cost)):
        reference = ot.sinkhorn(np.full(m, 1 / m), np.full(n, 1 / n), cost[k].numpy(), reg=0.1, numItermax=20000, stopThr=1e-14, method="sinkhorn_log")
        assert np.abs(plan[k].numpy() - reference).max() < 1e-6


@pytest.mark.parametrize("kind", ["cot", "sinkhorn"])
def test_an_images_score_does_not_depend_on_its_batch(kind: str) -> None:
    patches = F.normalize(torch.randn(6, 16, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    prompts = F.normalize(torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(2)), dim=-1)
    transport = Transport(kind=kind, eps=0.05)
    together = class_scores(transport, patches, prompts)
    alone = torch.cat([class_scores(transport, patches[i : i + 1], prompts) for i in range(6)])
    # each problem stops on its own: equal up to the kernels' float rounding (a batch-wide
    # stopping rule would move scores by ~thresh)
    assert torch.allclose(together, alone, atol=1e-6, rtol=0)


def test_mean_is_the_mean_similarity_and_gradients_pass_through_the_similarities_only() -> None:
    patches = F.normalize(torch.randn(3, 4, 8), dim=-1).requires_grad_()
    prompts = F.normalize(torch.randn(2, 2, 8), dim=-1)
    sim = torch.einsum("bmd,ncd->bcmn", patches, prompts)
    assert torch.allclose(class_scores(Transport(kind="mean"), patches, prompts), sim.mean(dim=(2, 3)))
    scores = class_scores(Transport(kind="cot", eps=0.1), patches, prompts)
    (grad,) = torch.autograd.grad(scores[:, 1].sum(), patches)
    with torch.no_grad():  # the plan is a constant: d score / d patch_m = Σ_n T_mn · prompt_n
        plan = partial_plan((1.0 - sim).reshape(6, 4, 2), Transport(kind="cot", eps=0.1)).view(3, 2, 4, 2)
    assert torch.allclose(grad, torch.einsum("bmn,nd->bmd", plan[:, 1], prompts[:, 1]), atol=1e-6)


@pytest.mark.parametrize(("settings", "message"), [({"kind": "emd"}, "algorithm.ot must be one of"), ({"eps": 0.0}, "algorithm.ot_eps must be > 0"), ({"top_percent": 1.5}, "algorithm.top_percent must be in"), ({"max_iter": 0}, "algorithm.ot_iters")])
def test_bad_transport_settings_name_the_key(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Transport(**settings)


@pytest.mark.parametrize("arch", ["RN50", "ViT-B-32"])
def test_patch_features_come_with_the_towers_own_pooled_feature(arch: str) -> None:
    """ViT: the patch tokens through ln_post and the projection; RN50: the attention pool with
    every position as a query (its first output is open_clip's pooled feature)."""
    torch.manual_seed(0)
    visual = open_clip.create_model(arch, pretrained=None, force_image_size=64).visual.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        pooled, patches = image_features(visual, x)
        assert torch.allclose(pooled, visual(x), atol=1e-5)
    assert patches.shape[:2] == (2, 4) and patches.shape[2] == pooled.shape[1]  # 64 px / 32 = 2 x 2 positions
