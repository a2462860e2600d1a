"""Model building: a weights file that does not fit its model fails in one line, for every method."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from raysim.config import ConfigError, ModelConfig
from raysim.models import build_model


def weights_of(tmp_path: Path, name: str, **kwargs: object) -> Path:
    path = tmp_path / f"{name}.pth"
    torch.save(timm.create_model(name, **kwargs).state_dict(), path)
    return path


def test_a_fitting_file_loads_with_another_head_and_stem_width(tmp_path: Path) -> None:
    path = weights_of(tmp_path, "test_resnet", num_classes=5, in_chans=3)
    model = build_model(ModelConfig(name="test_resnet", weights=str(path)), num_classes=2, in_chans=1, seed=0)
    saved = torch.load(path)
    assert torch.equal(model.state_dict()["layer1.0.conv1.weight"], saved["layer1.0.conv1.weight"])


@pytest.mark.parametrize("other", ["test_vit", "resnet10t"])  # test_vit: no key in common, which timm alone loads silently
def test_a_file_of_another_model_fails_naming_key_file_and_model(tmp_path: Path, other: str) -> None:
    path = weights_of(tmp_path, other, num_classes=2, **({"img_size": 16} if other == "test_vit" else {}))
    with pytest.raises(ConfigError, match=rf"^model.weights={path} does not fit test_resnet: \S"):
        build_model(ModelConfig(name="test_resnet", weights=str(path)), num_classes=2, in_chans=1, seed=0)


@pytest.mark.parametrize("content", [b"not a state dict", None])
def test_a_file_that_is_no_weights_file_is_named(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "notes.pth"
    if content is None:  # a pickle that is no state dict: refused by the safe loader
        torch.save({"model": object()}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"^model.weights={path} is not a weights file"):
        build_model(ModelConfig(name="test_resnet", weights=str(path)), num_classes=2, in_chans=1, seed=0)
