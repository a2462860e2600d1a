"""The MedMNIST loader on small files in the exact MedMNIST npz format, bad input, one Ray run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raysim import config
from raysim.config import DataConfig
from raysim.datasets import DATASETS, DataError
from raysim.datasets.medmnist import KEYS, MedMNIST
from raysim.engine.driver import Driver

from helpers import fake_medmnist, load_config, tiny_overrides


@pytest.fixture(scope="module")
def gray_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pneumonia")
    fake_medmnist(root / "pneumoniamnist.npz", classes=2, rgb=False)
    return root


@pytest.fixture(scope="module")
def rgb_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("derma")
    fake_medmnist(root / "dermamnist.npz", classes=7, rgb=True, label_shape="N", compressed=True, sizes={"train": 84, "val": 21, "test": 42})
    return root


def source(root: Path, seed: int = 0, **kw: object) -> MedMNIST:
    return MedMNIST(DataConfig(name="medmnist", root=str(root), **kw), img_size=16, seed=seed)


def ids(specs: list, split: str) -> list[str]:
    return sorted(i for s in specs for i in s.splits[split].sample_ids)


def test_registered() -> None:
    assert DATASETS.get("medmnist") is MedMNIST


def test_reads_labels_counts_and_splits_clients(gray_root: Path) -> None:
    data = np.load(gray_root / "pneumoniamnist.npz")
    src = source(gray_root)
    assert (src.num_classes, src.channels, src.group_names, src.attribute) == (2, 1, {}, None)
    specs = src.client_specs()
    assert [s.id for s in specs] == ["client0", "client1", "client2"]
    # val is carved from each client's train part; together they are the official train split
    assert sorted(ids(specs, "train") + ids(specs, "val")) == [f"train_{i:06d}" for i in range(60)]
    assert ids(specs, "test") == [f"test_{i:06d}" for i in range(30)]
    assert not set(ids(specs, "train")) & set(ids(specs, "val"))
    for spec in specs:
        assert all(len(t) > 0 for t in spec.splits.values())
        for split, table in spec.splits.items():
            rows = [int(i.split("_")[1]) for i in table.sample_ids]
            official = "test" if split == "test" else "train"
            assert list(table.labels) == list(data[f"{official}_labels"][rows, 0])
            assert table.labels.dtype == np.int64 and dict(table.attributes) == {}
    # the official test split is spread IID: sizes differ by at most one
    test_sizes = [len(s.splits["test"]) for s in specs]
    assert max(test_sizes) - min(test_sizes) <= 1


def test_load_picks_the_rows_and_resizes(gray_root: Path, rgb_root: Path) -> None:
    spec = source(gray_root).client_specs()[1]
    for split in ("train", "val", "test"):
        shard = source(gray_root).load(spec, split)  # a fresh instance, as in the actor
        rows = np.array([int(i.split("_")[1]) for i in spec.splits[split].sample_ids])
        assert shard.images.shape == (len(rows), 1, 16, 16) and shard.images.dtype == np.uint8
        assert np.array_equal(shard.images[:, 0, 5, 5], rows % 251)
        assert shard.table is spec.splits[split]
    rgb = source(rgb_root)
    shard = rgb.load(rgb.client_specs()[0], "test")
    rows = np.array([int(i.split("_")[1]) for i in shard.table.sample_ids])
    assert shard.images.shape == (len(rows), 3, 16, 16)
    assert np.array_equal(shard.images[:, :, 3, 3], (rows % 251)[:, None] + np.arange(3))


def test_rgb_seven_classes_with_flat_labels(rgb_root: Path) -> None:
    src = source(rgb_root, num_clients=4)
    assert (src.num_classes, src.channels) == (7, 3)
    specs = src.client_specs()
    assert len(specs) == 4 and sorted(np.concatenate([s.splits[k].labels for s in specs for k in ("train", "val")])) == sorted(np.arange(84) % 7)


def test_num_classes_is_at_least_two_and_read_over_all_splits(tmp_path: Path) -> None:
    fake_medmnist(tmp_path / "a" / "onemnist.npz", classes=1, rgb=False)
    assert source(tmp_path / "a").num_classes == 2
    fake_medmnist(tmp_path / "b" / "retinamnist.npz", classes=3, rgb=False, test_labels=np.full((30, 1), 4, dtype=np.uint8))
    assert source(tmp_path / "b").num_classes == 5


def test_partition_is_seeded_and_follows_the_config(gray_root: Path) -> None:
    a, b, other = (source(gray_root, seed=s).client_specs() for s in (0, 0, 1))
    assert [list(s.splits["train"].sample_ids) for s in a] == [list(s.splits["train"].sample_ids) for s in b]
    assert [list(s.splits["train"].sample_ids) for s in a] != [list(s.splits["train"].sample_ids) for s in other]
    specs = source(gray_root, partition="quantity", num_clients=2, ratios=[0.75, 0.25]).client_specs()
    assert [len(s.splits["train"]) + len(s.splits["val"]) for s in specs] == [45, 15]
    specs = source(gray_root, partition="iid", num_clients=12).client_specs()
    assert [s.id for s in specs][:3] == ["client00", "client01", "client02"] and all(len(s.splits["val"]) >= 1 for s in specs)


def test_impossible_partition_is_a_data_error(gray_root: Path) -> None:
    with pytest.raises(DataError, match="cannot split 30 samples into 40"):
        source(gray_root, partition="iid", num_clients=40).client_specs()
    with pytest.raises(DataError, match="num_clients=3 but ratios has 2 shares"):
        source(gray_root, partition="quantity", ratios=[0.5, 0.5], num_clients=3).client_specs()
    assert len(source(gray_root, partition="quantity", ratios=[0.5, 0.5]).client_specs()) == 2  # one client per share


def test_flag_picks_the_file_and_the_default_needs_exactly_one(tmp_path: Path) -> None:
    fake_medmnist(tmp_path / "pneumoniamnist.npz", classes=2, rgb=False)
    (tmp_path / "notes.npz").write_bytes(b"")  # not MedMNIST-looking: ignored by the default
    assert source(tmp_path).path.name == "pneumoniamnist.npz"
    fake_medmnist(tmp_path / "dermamnist_64.npz", classes=7, rgb=True)
    with pytest.raises(DataError, match=r"2 MedMNIST npz files \(dermamnist_64.npz, pneumoniamnist.npz\); set data.flag"):
        source(tmp_path).client_specs()
    assert source(tmp_path, flag="dermamnist_64").channels == 3
    assert source(tmp_path, flag="pneumoniamnist").channels == 1
    with pytest.raises(DataError, match="data.flag='bloodmnist'.*bloodmnist.npz not found.*dermamnist_64.npz"):
        source(tmp_path, flag="bloodmnist").client_specs()
    with pytest.raises(DataError, match="no MedMNIST npz file"):
        source(_empty(tmp_path)).client_specs()
    with pytest.raises(DataError, match="data.root is required"):
        MedMNIST(DataConfig(name="medmnist"), img_size=16, seed=0).client_specs()


def _empty(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir(exist_ok=True)
    return tmp_path / "empty"


@pytest.mark.parametrize(
    ("replace", "match"),
    [
        ({"train_labels": np.zeros((60, 14), dtype=np.uint8)}, r"train_labels has shape \(60, 14\): multi-label sets \(chestmnist\) are not supported"),
        ({"train_images": np.zeros((60, 28, 28, 28), dtype=np.uint8)}, r"train_images has shape \(60, 28, 28, 28\): 3D MedMNIST sets .* are not supported"),
        ({"val_images": np.zeros((20, 28, 28), dtype=np.float32)}, "val_images must be uint8 images"),
        ({"test_images": np.zeros((29, 28, 28), dtype=np.uint8)}, "test_images has 29 images but test_labels has 30 labels"),
        ({"val_images": np.zeros((20, 32, 32), dtype=np.uint8)}, "image shapes differ between splits"),
        ({"train_labels": np.full((60, 1), -1, dtype=np.int64)}, "negative label"),
    ],
)
def test_unsupported_or_inconsistent_files_are_data_errors(tmp_path: Path, replace: dict, match: str) -> None:
    fake_medmnist(tmp_path / "chestmnist.npz", classes=2, rgb=False, **replace)
    with pytest.raises(DataError, match=match) as info:
        source(tmp_path).client_specs()
    assert "chestmnist.npz" in str(info.value)


def test_missing_key_and_corrupt_file_name_the_file_and_the_keys(tmp_path: Path) -> None:
    arrays = fake_medmnist(tmp_path / "a" / "pneumoniamnist.npz", classes=2, rgb=False)
    np.savez(tmp_path / "a" / "pneumoniamnist.npz", **{k: v for k, v in arrays.items() if k != "test_labels"})
    with pytest.raises(DataError, match=r"pneumoniamnist.npz: missing keys test_labels; a MedMNIST npz has exactly " + ", ".join(KEYS)):
        source(tmp_path / "a").num_classes  # noqa: B018 -- the property reads the file
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "pneumoniamnist.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="pneumoniamnist.npz: not a readable npz file with keys train_images"):
        source(tmp_path / "b").client_specs()
    # a file damaged between the driver's metadata and the actor's load
    good = tmp_path / "c"
    fake_medmnist(good / "pneumoniamnist.npz", classes=2, rgb=False)
    spec = source(good).client_specs()[0]
    (good / "pneumoniamnist.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="pneumoniamnist.npz: not a readable npz file"):
        source(good, flag="pneumoniamnist").load(spec, "train")


def test_one_round_through_ray_actors_writes_multiclass_outputs(ray_session, rgb_root: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(rgb_root, **{"data.name": "medmnist", "federation.rounds": 1, "eval.bootstrap": 0, "resources.clients_per_actor": 3})
    cfg = load_config(None, overrides)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(config.dump(cfg))
    lines: list[str] = []
    Driver(cfg, run_dir, echo=lines.append).run()

    clients = {"client0", "client1", "client2"}
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert set(metrics["client"]) == clients | {"mean"}
    for split in ("val", "test"):
        rows = metrics[(metrics["split"] == split) & (metrics["attribute"] == "")]
        for metric in ("auc", "acc", "bacc"):
            assert set(rows[rows["metric"] == metric]["client"]) == clients | {"mean"}
    assert (metrics["attribute"] == "").all()  # no demographics, no fairness rows
    preds = pd.read_parquet(run_dir / "predictions.parquet")
    scores = [f"score_{k}" for k in range(7)]
    assert set(scores) <= set(preds.columns) and "score_7" not in preds.columns
    test = preds[preds["split"] == "test"]
    assert sorted(test["sample_id"]) == [f"test_{i:06d}" for i in range(42)]
    assert np.allclose(test[scores].sum(axis=1), 1.0)
    assert any("test metrics after round 1" in line for line in lines)


@pytest.mark.parametrize("shape,channels", [((28, 28), 1), ((16, 16, 3), 3)])
def test_an_image_already_at_its_size_is_only_transposed_and_gets_the_same_pixels(shape: tuple[int, ...], channels: int) -> None:
    """MedMNIST at its own size skips the float round trip (issue 29: 10,000 clients' decode);
    the pixels equal the general path's (the same values as int16 take it)."""
    from raysim.datasets.imaging import resize_chw

    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    got = resize_chw(image, shape[0], channels)
    assert got.dtype == np.uint8 and got.flags["C_CONTIGUOUS"] and got.shape == (channels, shape[0], shape[0])
    assert np.array_equal(got, resize_chw(image.astype(np.int16), shape[0], channels))
