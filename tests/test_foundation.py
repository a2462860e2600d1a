"""Foundation-model backends and the once-per-run soft targets (no Ray, no network beyond 127.0.0.1)."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch

from raysim.config import ConfigError
from raysim.foundation import (
    FOUNDATION_MODELS,
    FoundationModelError,
    build_foundation_model,
    predict_probabilities,
    soft_targets,
)
from raysim.models import normalization

K = 3
CALLS = {"count": 0}


def images_for(n: int, *, channels: int = 3, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, channels, size, size), dtype=np.uint8)


def intensity_probs(images: np.ndarray, num_classes: int) -> np.ndarray:
    """A deterministic 'model': a softmax over classes driven by each image's mean intensity."""
    mean = images.reshape(len(images), -1).mean(axis=1) / 255.0
    logits = np.outer(mean, np.arange(num_classes, dtype=np.float64) + 1.0)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def counted_model(images: np.ndarray, num_classes: int) -> np.ndarray:
    CALLS["count"] += 1
    return intensity_probs(images, num_classes)


def logits_model(images: np.ndarray, num_classes: int) -> np.ndarray:
    return np.ones((len(images), num_classes))  # rows sum to K, not 1


def nan_model(images: np.ndarray, num_classes: int) -> np.ndarray:
    probs = intensity_probs(images, num_classes)
    probs[1, 0] = np.nan
    return probs


def wrong_k_model(images: np.ndarray, num_classes: int) -> np.ndarray:
    return intensity_probs(images, num_classes + 1)


def callable_model(function_name: str):  # type: ignore[no-untyped-def]
    return build_foundation_model("callable", {"target": f"{__name__}:{function_name}"})


# --- soft_targets: once per run --------------------------------------------------------------


def test_callable_is_queried_once_and_parquet_is_reused(tmp_path: Path) -> None:
    images, ids = images_for(7), [f"pub-{i}" for i in range(7)]
    path = tmp_path / "run" / "soft_targets.parquet"
    CALLS["count"] = 0
    builds = []

    def factory():  # type: ignore[no-untyped-def]
        builds.append(1)
        return callable_model("counted_model")

    first = soft_targets(path, factory, images, ids, K)
    second = soft_targets(path, factory, images, ids, K)
    assert CALLS["count"] == 1 and len(builds) == 1
    np.testing.assert_array_equal(first, intensity_probs(images, K))
    np.testing.assert_array_equal(second, first)  # bit-exact round trip
    frame = pd.read_parquet(path)
    assert list(frame.columns) == ["sample_id", "p_0", "p_1", "p_2"] and list(frame["sample_id"]) == ids
    assert not list(path.parent.glob("*.tmp"))
    # The same samples in another order are reordered, still without a query.
    order = [6, 0, 3, 1, 5, 2, 4]
    np.testing.assert_array_equal(soft_targets(path, factory, images[order], [ids[i] for i in order], K), first[order])
    assert CALLS["count"] == 1


def test_existing_file_for_other_samples_or_k_is_an_error(tmp_path: Path) -> None:
    images, ids = images_for(4), ["a", "b", "c", "d"]
    path = tmp_path / "soft.parquet"
    soft_targets(path, lambda: callable_model("counted_model"), images, ids, K)
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="holds other samples"):
        soft_targets(path, lambda: callable_model("counted_model"), images, ["a", "b", "c", "x"], K)
    with pytest.raises(ConfigError, match=r"expected \['sample_id', 'p_0', 'p_1'\].*num_classes=2"):
        soft_targets(path, lambda: callable_model("counted_model"), images, ids, 2)
    assert path.read_bytes() == before  # never overwritten


def test_soft_targets_checks_its_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one per image"):
        soft_targets(tmp_path / "s.parquet", lambda: callable_model("counted_model"), images_for(3), ["a", "b"], K)
    with pytest.raises(ValueError, match="unique"):
        soft_targets(tmp_path / "s.parquet", lambda: callable_model("counted_model"), images_for(2), ["a", "a"], K)
    with pytest.raises(ValueError, match="uint8"):
        soft_targets(tmp_path / "s.parquet", lambda: callable_model("counted_model"), images_for(2).astype(np.float32), ["a", "b"], K)
    assert not (tmp_path / "s.parquet").exists()


# --- validation and the registry --------------------------------------------------------------


@pytest.mark.parametrize(
    ("function_name", "message"),
    [
        ("logits_model", "do not sum to 1"),
        ("nan_model", "NaN or infinite values"),
        ("wrong_k_model", r"returned shape \(5, 4\); expected \(5, 3\)"),
    ],
)
def test_invalid_answers_name_the_backend(function_name: str, message: str) -> None:
    model = callable_model(function_name)
    with pytest.raises(FoundationModelError, match=message) as info:
        predict_probabilities(model, images_for(5), K)
    assert f"'callable' ({__name__}:{function_name})" in str(info.value)


def test_callable_target_errors_name_the_target() -> None:
    with pytest.raises(ConfigError, match="no_such_module_xyz"):
        build_foundation_model("callable", {"target": "no_such_module_xyz:f"})
    with pytest.raises(ConfigError, match="has no attribute 'missing'"):
        build_foundation_model("callable", {"target": f"{__name__}:missing"})
    with pytest.raises(ConfigError, match="must look like"):
        build_foundation_model("callable", {"target": "no_colon"})


def test_unknown_backend_and_options_list_the_choices() -> None:
    with pytest.raises(ConfigError, match="unknown foundation model 'clip'; choose one of: callable, http, timm"):
        build_foundation_model("clip", {})
    with pytest.raises(ConfigError, match="unknown option.*colour.*valid options: url, timeout, batch_size"):
        build_foundation_model("http", {"url": "http://127.0.0.1:1/", "colour": "red"})
    with pytest.raises(ConfigError, match="needs option.*model"):
        build_foundation_model("timm", {})
    assert set(FOUNDATION_MODELS.names()) >= {"timm", "callable", "http"}


# --- http against a real local server ----------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    batches: list[int] = []

    def do_POST(self) -> None:  # http.server dispatches on this name
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/fail":
            return self._reply(500, b"model exploded")
        if self.path == "/garbage":
            return self._reply(200, b"<html>not json</html>")
        if self.path == "/slow":
            time.sleep(0.5)
        assert request["dtype"] == "uint8"
        images = np.frombuffer(base64.b64decode(request["data"]), np.uint8).reshape(request["shape"])
        Handler.batches.append(len(images))
        probs = intensity_probs(images, request["num_classes"])
        self._reply(200, json.dumps({"probabilities": probs.tolist()}).encode())

    def _reply(self, status: int, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # urllib honours proxy variables; a proxy must not stand between the test and 127.0.0.1.
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_http_matches_local_computation_and_batches(server_url: str) -> None:
    images = images_for(10, channels=1, size=8, seed=1)
    Handler.batches.clear()
    model = build_foundation_model("http", {"url": server_url + "/predict", "batch_size": 4})
    probs = predict_probabilities(model, images, K)
    assert Handler.batches == [4, 4, 2]
    np.testing.assert_array_equal(probs, intensity_probs(images, K))  # JSON floats round-trip exactly


def test_http_errors_name_the_url(server_url: str) -> None:
    images = images_for(2)
    with pytest.raises(FoundationModelError, match=rf"{server_url}/fail: the server answered HTTP 500.*model exploded"):
        predict_probabilities(build_foundation_model("http", {"url": server_url + "/fail"}), images, K)
    with pytest.raises(FoundationModelError, match=rf"{server_url}/garbage \(images 0..1\) answered with invalid JSON"):
        predict_probabilities(build_foundation_model("http", {"url": server_url + "/garbage"}), images, K)
    with pytest.raises(FoundationModelError, match=rf"{server_url}/slow.*within 0.1 s"):
        predict_probabilities(build_foundation_model("http", {"url": server_url + "/slow", "timeout": 0.1}), images, K)


def test_http_unreachable_url_is_a_clear_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/predict"  # closed now: nothing listens there
    with pytest.raises(FoundationModelError, match=rf"cannot reach {url} \(.*refused"):
        predict_probabilities(build_foundation_model("http", {"url": url, "timeout": 5}), images_for(2), K)
    with pytest.raises(ConfigError, match="http:// or https://"):
        build_foundation_model("http", {"url": "file:///etc/passwd"})


# --- timm ------------------------------------------------------------------------------------


def test_timm_gives_probabilities_and_honours_weights(tmp_path: Path) -> None:
    images = images_for(6, channels=3, size=16, seed=2)
    torch.manual_seed(5)
    source = timm.create_model("test_resnet", num_classes=K, in_chans=3).eval()
    path = tmp_path / "fm.pth"
    torch.save(source.state_dict(), path)
    mean, std = normalization(source, 3)
    with torch.no_grad():
        expected = torch.softmax(source((torch.from_numpy(images).float() / 255.0 - mean) / std).double(), dim=1).numpy()

    loaded = predict_probabilities(build_foundation_model("timm", {"model": "test_resnet", "weights": str(path), "device": "cpu"}), images, K)
    np.testing.assert_allclose(loaded, expected, rtol=0, atol=1e-6)
    random_init = predict_probabilities(build_foundation_model("timm", {"model": "test_resnet", "device": "cpu"}), images, K)
    assert not np.allclose(random_init, expected, atol=1e-3)  # the file, not the seed, decided the answer
    resized = predict_probabilities(build_foundation_model("timm", {"model": "test_resnet", "weights": str(path), "img_size": 24, "batch_size": 4, "device": "cpu"}), images, K)
    assert resized.shape == (6, K) and not np.allclose(resized, expected, atol=1e-6)


def test_timm_option_errors(tmp_path: Path) -> None:
    torch.save(timm.create_model("test_resnet", num_classes=5).state_dict(), tmp_path / "k5.pth")
    model = build_foundation_model("timm", {"model": "test_resnet", "weights": str(tmp_path / "k5.pth"), "device": "cpu"})
    with pytest.raises(ConfigError, match=r"k5.pth do not fit test_resnet with num_classes=3"):
        predict_probabilities(model, images_for(2), K)
    with pytest.raises(ConfigError, match="not a timm model"):
        build_foundation_model("timm", {"model": "no_such_net"})
    with pytest.raises(ConfigError, match="is not a file"):
        build_foundation_model("timm", {"model": "test_resnet", "weights": str(tmp_path / "missing.pth")})
