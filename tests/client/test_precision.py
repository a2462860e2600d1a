"""`federation.precision` (issue 30): fp32 changes nothing, bf16 / fp16 run under autocast (fp16
with a gradient scaler), keep float32 weights and score from float32; a CPU actor refuses
them; a GPU actor's staged splits give the same batches as the memory map. On the CPU, as CI
runs them (`python -m raysim.doctor` runs lower precision in actors on a GPU node)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from raysim.client import precision
from raysim.client.training import Batch, full_gradient, train_epochs
from raysim.config import ConfigError
from raysim.engine.client_actor import memory_format, stage_budget
from raysim.models.kinds import JointOutput
from raysim.outputs import resume_check

from helpers import load_config, make_host, tiny_overrides


def mlp_run(mode: str, made: list[object] | None = None) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Two local epochs of a small MLP under `mode` on the CPU (the mechanism; a CPU actor refuses
    lower precision, `test_a_cpu_actor_refuses_lower_precision_in_one_line`)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    g = torch.Generator().manual_seed(1)
    batches = [Batch(torch.randn(8, 3, 2, 2, generator=g), torch.randint(0, 2, (8,), generator=g), {}, torch.arange(8)) for _ in range(4)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with precision.autocast(torch.device("cpu"), mode):
        if made is not None:
            made.append(precision.grad_scaler())
        stats = train_epochs(model, [batches, batches], optimizer)
    return stats, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fp32_is_the_default_and_enters_no_autocast(oph_root: Path) -> None:
    cfg = load_config(None, tiny_overrides(oph_root))
    assert cfg.federation.precision == "fp32"
    with precision.autocast(torch.device("cpu"), "fp32"):
        assert not torch.is_autocast_enabled("cpu") and precision.grad_scaler() is None


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_lower_precision_trains_under_autocast_and_keeps_float32_weights(mode: str) -> None:
    _, fp32 = mlp_run("fp32")
    stats, low = mlp_run(mode)
    assert stats["steps"] == 8 and math.isfinite(stats["loss"])
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in low.values())
    assert any(not torch.equal(low[k], fp32[k]) for k in fp32)  # autocast was on: other numbers than fp32's
    assert all(torch.allclose(low[k], fp32[k], atol=0.05) for k in fp32)  # and close to them


def test_fp16_training_goes_through_a_fresh_gradient_scaler(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[torch.amp.GradScaler] = []
    real = precision.grad_scaler

    def counting() -> torch.amp.GradScaler | None:
        scaler = real()
        if scaler is not None:
            made.append(scaler)
        return scaler

    monkeypatch.setattr(precision, "grad_scaler", counting)
    mlp_run("fp16")
    assert len(made) == 1 and made[0]._scale is not None  # used (its scale set by a step), one per local training call
    made.clear()
    mlp_run("bf16")
    assert made == []  # bf16 has float32's range: no scaler


def test_scores_are_computed_from_float32_outputs() -> None:
    logits = torch.randn(4, 3).to(torch.bfloat16)
    joint = JointOutput(torch.randn(2, 3, 4, 4, dtype=torch.float16), logits)
    assert precision.as_float(logits).dtype == torch.float32
    cast = precision.as_float(joint)
    assert isinstance(cast, JointOutput) and cast.masks.dtype == cast.grade.dtype == torch.float32
    assert precision.as_float(torch.arange(3)).dtype == torch.int64


def test_a_cpu_actor_refuses_lower_precision_in_one_line(oph_root: Path) -> None:
    with pytest.raises(ConfigError, match=r"federation.precision=bf16 needs client actors on a GPU \(resources.num_gpus > 0\)"):
        load_config(None, tiny_overrides(oph_root, **{"federation.precision": "bf16"}))
    if torch.cuda.is_available():
        return  # the actor's own check is for a GPU share on a node without CUDA
    with pytest.raises(ConfigError, match="federation.precision=fp16: this client actor sees no CUDA device"):
        make_host(oph_root, "fedavg", **{"federation.precision": "fp16", "resources.num_gpus": 0.5})


def test_the_full_gradient_under_fp16_is_unscaled() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    batch = Batch(torch.randn(8, 4), torch.randint(0, 2, (8,)), {}, torch.arange(8))
    _, plain = full_gradient(model, [batch])
    with precision.autocast(torch.device("cpu"), "fp16"):
        _, scaled = full_gradient(model, [batch])
    assert all(torch.allclose(plain[k], scaled[k], rtol=0.05, atol=1e-3) for k in plain)  # not 65,536 times larger


def test_an_unknown_precision_is_one_line() -> None:
    with pytest.raises(ConfigError, match="federation.precision must be one of fp32, bf16, fp16; got 'fp8'"):
        load_config(None, ["federation.precision=fp8"])


def test_a_run_started_before_the_key_resumes_in_fp32_only(oph_root: Path, tmp_path: Path) -> None:
    cfg = load_config(None, tiny_overrides(oph_root))
    saved = resume_check.record(cfg, tmp_path)
    del saved["keys"]["federation.precision"]  # what a run started before the key existed kept
    resume_check.check(saved, cfg, tmp_path)
    bf16 = load_config(None, tiny_overrides(oph_root, **{"federation.precision": "bf16", "resources.num_gpus": 0.5}))
    with pytest.raises(ConfigError, match="federation.precision differs"):
        resume_check.check(saved, bf16, tmp_path)


def test_staged_splits_give_the_memory_maps_batches(oph_root: Path) -> None:
    host = make_host(oph_root, "fedavg")
    client = host.clients["site1"]
    shard, index = client.shards["train"], torch.tensor([3, 0, 7, 1])
    plain = client.batch_of(shard, index)
    client.stage_bytes = shard.images.nbytes  # what a GPU actor sets (here on the CPU: the same path, device tensors)
    with client.staged(["train", "val"]):
        assert len(client._staged) == 2
        staged = client.batch_of(shard, index)
    assert client._staged == {}  # only for the call
    assert torch.equal(plain.x, staged.x) and torch.equal(plain.y, staged.y)
    client.stage_bytes = shard.images.nbytes - 1  # too large for the device; on the CPU nothing is pinned
    with client.staged(["train"]):
        assert client._staged == {}


def test_the_cpu_keeps_its_layout_and_stages_nothing() -> None:
    assert memory_format(torch.device("cpu")) == torch.contiguous_format
    assert stage_budget(torch.device("cpu"), 0.25) == 0


def test_the_fold_on_a_named_device_is_the_default_fold_and_comes_back_on_the_cpu() -> None:
    from raysim.algorithms.aggregation import WeightedSum

    g = torch.Generator().manual_seed(0)
    updates = [{"w": torch.randn(1000, generator=g), "n": torch.tensor(3 + i)} for i in range(5)]
    folds = [WeightedSum(), WeightedSum(device=torch.device("cpu"))]
    for fold in folds:
        for i, update in enumerate(updates):
            fold.add(update, 10.0 + i, f"c{i}")
    plain, placed = (fold.mean() for fold in folds)
    assert all(torch.equal(plain[k], placed[k]) and placed[k].device.type == "cpu" for k in plain)


def test_gpu_fold_needs_a_driver_gpu_and_a_resume_keeps_it(oph_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"resources.gpu_fold=true needs a GPU share for the driver"):
        load_config(None, tiny_overrides(oph_root, **{"resources.gpu_fold": True}))
    cpu_fold = load_config(None, tiny_overrides(oph_root, **{"resources.driver_gpus": 0.5}))
    gpu_fold = load_config(None, tiny_overrides(oph_root, **{"resources.driver_gpus": 0.5, "resources.gpu_fold": True}))
    saved = resume_check.record(cpu_fold, tmp_path)
    with pytest.raises(ConfigError, match="resources.gpu_fold differs"):
        resume_check.check(saved, gpu_fold, tmp_path)
    del saved["keys"]["resources.gpu_fold"]  # a run started before the key: it folded on the CPU
    resume_check.check(saved, cpu_fold, tmp_path)
