"""Foundation-model backends and the once-per-run soft targets (no Ray, no network beyond 127.0.0.1)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
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
from raysim.models.backbones import normalization
from raysim.models.foundation import (
    FOUNDATION_MODELS,
    FoundationModelError,
    build_foundation_model,
    predict_probabilities,
    soft_targets,
)

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
    seen: list[tuple[str, str, float]] = []  # (path, a digest of the batch, time) of every request
    token = "Bearer s3cret-token-value"

    def do_POST(self) -> None:  # http.server dispatches on this name
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        request = json.loads(raw)
        digest = hashlib.sha256(raw).hexdigest()[:12]
        path = self.path.partition("?")[0]
        Handler.seen.append((path, digest, time.monotonic()))
        if path == "/fail":
            return self._reply(500, b"model exploded")
        if path == "/garbage":
            return self._reply(200, b"<html>not json</html>")
        if path == "/slow":
            time.sleep(0.5)
        if path == "/big":  # announced: refused before reading
            return self._reply(200, b"x" * 2000)
        if path == "/big-unannounced":  # no Content-Length: HTTP/1.0 ends the body by closing
            return self._reply(200, b"x" * 200_000, length=False)
        if path == "/trickle":  # a byte every 0.1 s: each read is quick, the whole never ends
            return self._trickle()
        if path == "/bad-request":  # echoes the request line, query string included
            return self._reply(400, f"shape not supported ({self.path})".encode())
        if path == "/flaky":  # the second batch fails once (503), everything else is answered
            batches = list(dict.fromkeys(d for p, d, _ in Handler.seen if p == "/flaky"))
            if len(batches) >= 2 and digest == batches[1] and [d for p, d, _ in Handler.seen].count(digest) == 1:
                return self._reply(503, b"warming up")
        if path == "/busy-once" and len(Handler.seen) == 1:
            return self._reply(429, b"slow down", headers={"Retry-After": "1"})
        if path == "/down-after-first" and len(Handler.seen) > 1:
            return self._reply(503, b"gone")
        if path == "/redirect":
            return self._reply(302, b"", headers={"Location": "/auth?sig=abcdef123456"})
        if path == "/auth":  # a careless server that echoes the header it got
            got = self.headers.get("Authorization")
            if got != Handler.token:
                return self._reply(401, f"bad Authorization: {got}".encode())
        assert request["dtype"] == "uint8"
        images = np.frombuffer(base64.b64decode(request["data"]), np.uint8).reshape(request["shape"])
        Handler.batches.append(len(images))
        probs = intensity_probs(images, request["num_classes"])
        self._reply(200, json.dumps({"probabilities": probs.tolist()}).encode())

    def _reply(self, status: int, body: bytes, *, length: bool = True, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if length:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout, size-cap and deadline tests)

    def _trickle(self) -> None:
        try:
            self.send_response(200)
            self.send_header("Content-Length", "40")
            self.end_headers()
            for _ in range(40):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args: object) -> None:
        pass


FAST = {"retry_delay": 0.001}  # retries without the default backoff (1 s, 2 s, 4 s)


def http_model(url: str, **options: object):  # type: ignore[no-untyped-def]
    Handler.seen.clear()
    return build_foundation_model("http", {"url": url, **FAST, **options})


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
    with pytest.raises(FoundationModelError, match=rf"{server_url}/fail \(images 0..1\): the server answered HTTP 500.*model exploded.*gave up after 2 tries"):
        predict_probabilities(build_foundation_model("http", {"url": server_url + "/fail", "retries": 1, **FAST}), images, K)
    with pytest.raises(FoundationModelError, match=rf"{server_url}/garbage \(images 0..1\) answered with invalid JSON"):
        predict_probabilities(build_foundation_model("http", {"url": server_url + "/garbage"}), images, K)
    with pytest.raises(FoundationModelError, match=rf"{server_url}/slow.*within 0.1 s"):
        predict_probabilities(build_foundation_model("http", {"url": server_url + "/slow", "timeout": 0.1, "retries": 0}), images, K)


def test_http_unreachable_url_is_a_clear_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/predict"  # closed now: nothing listens there
    with pytest.raises(FoundationModelError, match=rf"cannot reach {url} \(.*refused"):
        predict_probabilities(build_foundation_model("http", {"url": url, "timeout": 5, "retries": 1, **FAST}), images_for(2), K)
    with pytest.raises(ConfigError, match="http:// or https://"):
        build_foundation_model("http", {"url": "file:///etc/passwd"})


# --- http hardening: transport, secrets, limits, retries --------------------------------------


SECRET = "S3cr3tV4lue"


def test_redact_hides_credentials_and_query_secrets() -> None:
    from raysim.models import foundation

    cases = {
        f"https://alice:{SECRET}@fm.example.org/predict": "https://***@fm.example.org/predict",
        f"https://fm.example.org/predict?model=b&api_key={SECRET}": "https://fm.example.org/predict?model=b&api_key=***",
        f"https://fm.example.org/p?token={SECRET}&sig={SECRET}#access_token={SECRET}": "https://fm.example.org/p?token=***&sig=***#access_token=***",
        f"https://fm.example.org/p?X-Amz-Signature={SECRET}&keep=1": "https://fm.example.org/p?X-Amz-Signature=***&keep=1",
        "http://127.0.0.1:8000/predict?batch=4": "http://127.0.0.1:8000/predict?batch=4",
        f"//u:{SECRET}@[::1/broken?password={SECRET}": "//***@[::1/broken?password=***",  # urllib cannot parse it: redacted anyway
    }
    for url, shown in cases.items():
        assert foundation.redact(url) == shown


def test_http_label_repr_and_errors_never_show_url_secrets(server_url: str) -> None:
    remote = build_foundation_model("http", {"url": f"https://fm.example.org/predict?api_key={SECRET}"})
    for text in (remote.label, repr(remote), str(remote)):
        assert SECRET not in text and "api_key=***" in text
    with pytest.raises(ConfigError, match=r"carries credentials .* auth_env") as info:  # urllib never sent them anyway
        build_foundation_model("http", {"url": f"https://alice:{SECRET}@fm.example.org/predict"})
    assert SECRET not in str(info.value) and "***@fm.example.org" in str(info.value)
    with pytest.raises(ConfigError, match="http:// or https://") as info:
        build_foundation_model("http", {"url": f"ftp://alice:{SECRET}@fm.example.org/"})
    assert SECRET not in str(info.value)
    # A failing request: the url's secret is redacted in the message, as is the server's echo of it.
    with pytest.raises(FoundationModelError, match=r"/bad-request\?token=\*\*\* \(images 0..1\): the server answered HTTP 400.*\(/bad-request\?token=\*\*\*\)") as info:
        predict_probabilities(http_model(f"{server_url}/bad-request?token={SECRET}"), images_for(2), K)
    assert SECRET not in str(info.value)


def test_http_needs_https_unless_the_host_is_loopback() -> None:
    for url in ("http://fm.example.org/predict", "http://10.0.0.7:8000/predict", "http://[2001:db8::1]/p"):
        with pytest.raises(ConfigError, match=r"is plain http to .*not loopback.*Use https://"):
            build_foundation_model("http", {"url": url})
    for url in ("https://fm.example.org/predict", "http://localhost:8000/p", "http://127.0.0.2:8000/p", "http://[::1]:8000/p"):
        build_foundation_model("http", {"url": url})  # nothing is contacted


def test_http_options_are_checked_one_line_naming_the_option() -> None:
    url = "https://fm.example.org/predict"
    for key, value in [("max_response_mb", 0), ("deadline", -1), ("retries", -1), ("retries", 1.5), ("retry_delay", -1), ("batch_size", 2.5), ("timeout", "soon")]:
        with pytest.raises(ConfigError, match=rf"option {key} must be"):
            build_foundation_model("http", {"url": url, key: value})
    with pytest.raises(ConfigError, match="auth_env must be the name of an environment variable") as info:
        build_foundation_model("http", {"url": url, "auth_env": f"Bearer {SECRET}"})  # the value where its name belongs
    assert SECRET not in str(info.value)
    build_foundation_model("http", {"url": url, "deadline": None, "retries": 0, "retry_delay": 0})


def test_http_answer_over_the_size_cap_is_refused(server_url: str) -> None:
    images = images_for(2)
    with pytest.raises(FoundationModelError, match=r"announced an answer of 2000 bytes \(Content-Length\), over the 0.001 MB cap \(option max_response_mb\); not read"):
        predict_probabilities(http_model(server_url + "/big", max_response_mb=0.001), images, K)
    with pytest.raises(FoundationModelError, match=r"answer is over the 0.001 MB cap \(option max_response_mb\); stopped reading after 1001 bytes"):
        predict_probabilities(http_model(server_url + "/big-unannounced", max_response_mb=0.001), images, K)
    assert len(Handler.seen) == 1  # refused, not retried


def test_http_retries_only_the_failed_batch_and_keeps_the_answered_ones(server_url: str) -> None:
    images = images_for(10, channels=1, size=8, seed=3)
    model = http_model(server_url + "/flaky", batch_size=4)
    probs = predict_probabilities(model, images, K)
    np.testing.assert_array_equal(probs, intensity_probs(images, K))
    order = [digest for _, digest, _ in Handler.seen]
    assert len(order) == 4 and len(set(order)) == 3  # 3 batches, the second asked twice
    assert order.count(order[0]) == 1 and order[1] == order[2] != order[3]
    # A batch that keeps failing: the error says how far the answers got.
    with pytest.raises(FoundationModelError, match=r"images 4..7\): the server answered HTTP 503.*gave up after 3 tries \(option retries=2\); 1 of 3 batches had been answered \(images 0..3\)"):
        predict_probabilities(http_model(server_url + "/down-after-first", batch_size=4, retries=2), images, K)
    assert len(Handler.seen) == 4


def test_http_429_waits_as_long_as_retry_after_says(server_url: str) -> None:
    probs = predict_probabilities(http_model(server_url + "/busy-once"), images_for(2), K)
    assert probs.shape == (2, K) and len(Handler.seen) == 2
    assert Handler.seen[1][2] - Handler.seen[0][2] >= 0.95  # Retry-After: 1, not retry_delay (0.001)


def test_http_client_errors_are_not_retried(server_url: str) -> None:
    with pytest.raises(FoundationModelError, match=r"\(images 0..1\): the server answered HTTP 400 Bad Request: 'shape not supported \(/bad-request\)'; 0 of 1 batches had been answered$"):
        predict_probabilities(http_model(server_url + "/bad-request", retries=3), images_for(2), K)
    assert len(Handler.seen) == 1


def test_http_redirects_are_not_followed(server_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FM_TOKEN", Handler.token)
    with pytest.raises(FoundationModelError, match=r"HTTP 302.*redirects are not followed.*\(/auth\?sig=\*\*\*\)"):
        predict_probabilities(http_model(server_url + "/redirect", auth_env="FM_TOKEN"), images_for(2), K)
    assert [path for path, _, _ in Handler.seen] == ["/redirect"]  # the token never went to the new address


@pytest.mark.exclusive  # timed
def test_http_deadline_bounds_all_batches_and_a_trickling_answer(server_url: str) -> None:
    started = time.monotonic()
    with pytest.raises(FoundationModelError, match=r"images 1..1\).*deadline of 0.8 s for all batches passed \(option deadline\); 1 of 4 batches had been answered"):
        predict_probabilities(http_model(server_url + "/slow", batch_size=1, timeout=5, deadline=0.8), images_for(4), K)
    assert time.monotonic() - started < 1.5  # not 4 x 0.5 s
    started = time.monotonic()
    with pytest.raises(FoundationModelError, match=r"deadline of 0.5 s for all batches passed \(option deadline\); 0 of 1 batches"):
        predict_probabilities(http_model(server_url + "/trickle", timeout=5, deadline=0.5), images_for(2), K)
    assert time.monotonic() - started < 1.5  # each byte came within timeout; the whole answer would take 4 s


def test_http_sends_the_authorization_header_from_the_environment(server_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    images = images_for(3)
    monkeypatch.delenv("FM_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"option auth_env names the environment variable FM_TOKEN, which is not set in this process"):
        http_model(server_url + "/auth", auth_env="FM_TOKEN")
    monkeypatch.setenv("FM_TOKEN", Handler.token)
    model = http_model(server_url + "/auth", auth_env="FM_TOKEN")
    np.testing.assert_array_equal(predict_probabilities(model, images, K), intensity_probs(images, K))
    assert "s3cret" not in repr(model) + model.label + repr(dataclasses.asdict(model))  # only the variable's name is kept
    # A wrong token: 401 is not retried, and the server's echo of the header is blanked out.
    monkeypatch.setenv("FM_TOKEN", "Bearer wrong-but-still-secret")
    with pytest.raises(FoundationModelError, match=r"HTTP 401 Unauthorized: 'bad Authorization: \*\*\*'; 0 of 1 batches") as info:
        predict_probabilities(http_model(server_url + "/auth", auth_env="FM_TOKEN"), images, K)
    assert "wrong-but-still-secret" not in str(info.value) and len(Handler.seen) == 1


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
