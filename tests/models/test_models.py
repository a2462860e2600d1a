"""Model building: a weights file that does not fit its model fails in one line, for every method."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from raysim.config import ConfigError, ModelConfig
from raysim.models.backbones import build_model


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


class _Touch:
    """Unpickling this runs code: it creates `marker` (what an attacker's file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_a_weights_file_that_would_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = weights_of(tmp_path, "test_resnet", num_classes=2, in_chans=1)
    state = torch.load(path, weights_only=True)
    torch.save({**state, "payload": _Touch(marker)}, path)
    with pytest.raises(ConfigError, match=rf"^model.weights={path} is not a weights file"):
        build_model(ModelConfig(name="test_resnet", weights=str(path)), num_classes=2, in_chans=1, seed=0)
    assert not marker.exists()


def test_safetensors_weights_load(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "test_resnet.safetensors"
    state = timm.create_model("test_resnet", num_classes=5, in_chans=3).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = build_model(ModelConfig(name="test_resnet", weights=str(path)), num_classes=2, in_chans=1, seed=0)
    assert torch.equal(model.state_dict()["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])


def test_dependency_floors_exclude_unsafe_loaders() -> None:
    """torch < 2.6 ran code from a `weights_only=True` load (CVE-2025-32434); timm < 1.0.26 loads
    local weight files with weights_only=False; pyarrow < 14.0.1 deserialised arbitrary Python
    (CVE-2023-47248); Ray < 2.52 has no token authentication."""
    import configparser
    import re

    requires = configparser.ConfigParser()
    requires.read(Path(__file__).parents[2] / "setup.cfg")
    floors = dict(re.match(r"([A-Za-z0-9_\-]+)(?:\[[^\]]*\])?>=([0-9.]+)", line.strip()).groups() for line in requires["options"]["install_requires"].strip().splitlines())
    version = lambda text: tuple(int(x) for x in text.split("."))  # noqa: E731
    wanted = {"torch": "2.6", "timm": "1.0.26", "pyarrow": "14.0.1", "ray": "2.52", "torchvision": "0.21", "pillow": "10.3"}
    assert {name: floors.get(name) for name in wanted} == {name: floors.get(name) if floors.get(name) and version(floors[name]) >= version(v) else f"below {v}" for name, v in wanted.items()}
