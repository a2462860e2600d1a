"""Every registered method runs 2 rounds through real Ray actors (the registry is the test list)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from helpers import BUILT_IN, FM, make_driver

# Methods whose defaults are too big for CI get tiny settings here (their own tests cover the rest).
TINY_SETTINGS = {"fedhelp": {"algorithm.top_n": 1, "algorithm.small_model": "test_resnet", "algorithm.large_model": "test_vit", "algorithm.foundation": FM}}
# FedBM: the seeded concept stand-in on this real-format set; its generator trained after round 1 and used in round 2
# The CLIP prompt family on the small synthetic CLIP (the `small_clip` fixture's checkpoint), 4 context words
ON_SMALL_CLIP = {"model.name": "clip:RaySim-Tiny-ViT", "model.img_size": 32, "algorithm.n_ctx": 4}
TINY_SETTINGS["promptfl"] = TINY_SETTINGS["fedotp"] = ON_SMALL_CLIP
TINY_SETTINGS["adapter"] = {"model.name": "clip:RaySim-Tiny-ViT", "model.img_size": 32}  # AdaptFormer's adapters need transformer blocks
CLIP_HOSTED = {"promptfl", "fedotp", "adapter"}
TINY_SETTINGS["fedbuff"] = {"system.simulate": True, "algorithm.buffer_size": 3, "algorithm.refill": "step"}  # every client each round
TINY_SETTINGS["fedasync"] = {"system.simulate": True}  # one update per round
PER_ROUND = {"fedasync": 1}  # updates per round where not every client's
TINY_SETTINGS["fedbm"] = {"algorithm.embeddings": "synthetic", "algorithm.generator_every": 1, "algorithm.generator_steps": 2, "algorithm.generator_batch": 8, "algorithm.pseudo_batch": 4}


def run_method(name: str, root: Path, run_dir: Path, **extra: object) -> tuple[pd.DataFrame, list[str]]:
    lines: list[str] = []
    # one actor for all three clients keeps the runs cheap; eval only after the last round
    settings = {"algorithm.name": name, "resources.clients_per_actor": 3, "eval.every": 2, "federation.rounds": 2, **TINY_SETTINGS.get(name, {}), **extra}
    make_driver(root, run_dir, lines, **settings).run()
    return pd.read_parquet(run_dir / "metrics.parquet"), lines


def traffic(metrics: pd.DataFrame, metric: str) -> pd.Series:
    rows = metrics[(metrics["split"] == "train") & (metrics["metric"] == metric) & ~metrics["client"].str.startswith("mean")]
    return rows.set_index(["round", "client"])["value"]


def test_the_registry_holds_every_method_of_the_issue() -> None:
    expected = {"fedhelp", "fedavg", "fedprox", "fedbn", "silobn", "fedper", "ditto", "fedadam", "fedyogi", "fedadagrad", "fednova", "fedlora", "fairlora", "fairfed", "qffl", "fedrdn", "local"}
    expected |= {"deer", "dp_lora", "ffa_lora", "pfa", "det", "pfl_resfim", "fedbm", "cksp", "afl", "fedfb"}  # issue 15
    assert expected <= set(BUILT_IN)


@pytest.mark.parametrize("name", BUILT_IN)
def test_method_runs_two_rounds_through_ray_actors(name: str, ray_session, oph_root: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    weights = {"model.weights": str(request.getfixturevalue("small_clip"))} if name in CLIP_HOSTED else {}
    metrics, lines = run_method(name, oph_root, tmp_path / name, **weights)
    test = metrics[(metrics["round"] == 2) & (metrics["split"] == "test") & (metrics["metric"] == "auc") & (metrics["attribute"] == "")]
    roles = {f"mean:{r}" for r in test["role"] if r}  # FedHelp adds mean:large / mean:small
    assert set(test["client"]) == {"site1", "site2", "site3", "mean"} | roles
    assert test["value"].between(0, 1).all()
    down, up = traffic(metrics, "bytes_down"), traffic(metrics, "bytes_up")
    assert set(down.index.get_level_values("round")) == {1, 2} and len(down) == len(up) == 2 * PER_ROUND.get(name, 3)
    if name == "local":  # no federation: nothing travels
        assert (down == 0).all() and (up == 0).all()
    else:
        assert (down > 0).all() and (up > 0).all()
    assert any(line.startswith("communication: ") for line in lines)


@pytest.mark.parametrize("name", ["fedlora", "fairlora"])
def test_lora_methods_run_with_the_clip_prompt_head_on_the_small_clip(name: str, ray_session, oph_root: Path, tmp_path: Path, small_clip: Path) -> None:
    """FairFedMed's host (GLP_OT_SVLoRA): prompt head + adapters on the image MLPs, 2 rounds through Ray."""
    metrics, _ = run_method(name, oph_root, tmp_path / name, **ON_SMALL_CLIP, **{"model.weights": str(small_clip), "algorithm.rank": 6})
    test = metrics[(metrics["round"] == 2) & (metrics["split"] == "test") & (metrics["metric"] == "auc") & (metrics["attribute"] == "")]
    assert set(test["client"]) == {"site1", "site2", "site3", "mean"} and test["value"].between(0, 1).all()
    fedavg, _ = run_method("fedavg", oph_root, tmp_path / "fedavg", **{k: v for k, v in ON_SMALL_CLIP.items() if k.startswith("model.")}, **{"model.weights": str(small_clip)})
    assert traffic(metrics, "bytes_up").max() < 0.1 * traffic(fedavg, "bytes_up").min()  # prompts + adapters, not the image tower


def test_fairlora_sends_a_fraction_of_fedavgs_bytes(ray_session, oph_root: Path, tmp_path: Path) -> None:
    fedavg, _ = run_method("fedavg", oph_root, tmp_path / "fedavg")
    fairlora, _ = run_method("fairlora", oph_root, tmp_path / "fairlora")
    assert traffic(fairlora, "bytes_up").max() < 0.5 * traffic(fedavg, "bytes_up").min()
