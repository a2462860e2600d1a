"""FairFedMed-Oph variants: 3D OCT volumes with slice folding, npz key families, gender coding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from raysim.config import DataConfig, ModelConfig
from raysim.datasets import DataError
from raysim.datasets.fairfedmed_oph import FairFedMedOph
from raysim.models.backbones import SliceFold, build_model


def source(root: Path, **kw) -> FairFedMedOph:
    return FairFedMedOph(DataConfig(name="fairfedmed_oph", root=str(root), **kw), img_size=16, seed=0)


def rewrite(path: Path, **changes) -> None:
    with np.load(path) as data:
        arrays = dict(data)
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    np.savez(path, **arrays)


def test_oct_volumes_keep_every_kth_bscan(oph_root: Path) -> None:
    src = source(oph_root, modality="oct_bscans", slice_step=2)  # the tiny set has 4 B-scans
    assert src.volume_depth == 4 and src.channels == 2 and src.volume_slices == 2
    spec = src.client_specs()[0]
    shard = src.load(spec, "test")
    assert shard.images.shape[1:] == (2, 16, 16) and shard.images.dtype == np.uint8
    with np.load(oph_root / "all" / shard.table.sample_ids[0]) as data:
        volume = data["oct_bscans"]
    # slice 1 of the shard is B-scan 2 of the file, resized from 8x8 to 16x16
    from raysim.datasets.imaging import resize_chw

    assert np.array_equal(shard.images[0, 1], resize_chw(volume[2], 16, 1)[0])
    assert source(oph_root).volume_slices is None  # fundus images are 2D


def test_a_volume_of_another_depth_is_named(oph_copy: Path) -> None:
    src = source(oph_copy, modality="oct_bscans", slice_step=1)
    spec = src.client_specs()[0]
    victim = spec.splits["test"].sample_ids[-1]
    rewrite(oph_copy / "all" / victim, oct_bscans=np.zeros((6, 8, 8), np.uint8))
    with pytest.raises(DataError, match=rf"{victim}: 6 B-scans, but the first volume had 4"):
        src.load(spec, "test")


def test_slice_fold_pads_folds_and_averages() -> None:
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model = SliceFold(backbone, slices=10, group=8)
    x = torch.randn(3, 10, 4, 4)
    out = model(x)
    padded = torch.cat([x, torch.zeros(3, 6, 4, 4)], dim=1)
    per_group = [backbone(model.fold(padded[:, 8 * g : 8 * g + 8])) for g in range(2)]
    assert torch.allclose(out, (per_group[0] + per_group[1]) / 2, atol=1e-6)
    timm_model = build_model(ModelConfig(name="test_resnet"), num_classes=2, in_chans=4, seed=0, slices=4)
    assert isinstance(timm_model, SliceFold) and timm_model(torch.randn(2, 4, 16, 16)).shape == (2, 2)


def test_key_families_and_gender_coding(oph_copy: Path) -> None:
    csv = oph_copy / "meta_site1_gender_train.csv"
    frame = pd.read_csv(csv)
    frame.drop(columns=["gender", "ethnicity"]).to_csv(csv, index=False)
    male_file, female_file = frame[frame["gender"] == "male"]["filename"].iloc[0], frame[frame["gender"] == "female"]["filename"].iloc[0]
    # family (a): `male` and `hispanic` instead of `gender` and `ethnicity`
    rewrite(oph_copy / "all" / male_file, gender=None, ethnicity=None, male=np.array(1), hispanic=np.array(1))

    def code(src: FairFedMedOph, filename: str, attr: str) -> int:
        spec = src.client_specs()[0]
        for table in (spec.splits["train"], spec.splits["val"]):
            ids = list(table.sample_ids)
            if filename in ids:
                return int(table.attributes[attr][ids.index(filename)])
        raise AssertionError(filename)

    default = source(oph_copy, attribute="gender")
    assert code(default, male_file, "gender") == 1 and code(default, male_file, "ethnicity") == 1
    assert code(default, female_file, "gender") == 0
    flipped = source(oph_copy, attribute="gender", gender_coding="male0")
    assert code(flipped, female_file, "gender") == 1  # its npz `gender` 0 now means Male
    assert code(flipped, male_file, "gender") == 1  # `male`=1 means Male whatever the coding


def test_oct_run_through_ray(ray_session, oph_root: Path, tmp_path: Path) -> None:
    from raysim.engine.driver import Driver

    from helpers import load_config, tiny_overrides

    cfg = load_config(None, tiny_overrides(oph_root, **{"data.modality": "oct_bscans", "data.slice_step": 1, "federation.rounds": 1, "resources.clients_per_actor": 3}))
    metrics = Driver(cfg, tmp_path, echo=lambda _: None).run()
    mean_auc = metrics[(metrics["client"] == "mean") & (metrics["metric"] == "auc") & (metrics["attribute"] == "")]
    assert len(mean_auc) == 2 and mean_auc["value"].notna().all()
