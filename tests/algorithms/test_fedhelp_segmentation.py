"""FedHelp's segmentation variant (specs/fedhelp.md): per-pixel KD and ranking, U-Nets for both
models, per-pixel foundation-model maps, the FM term off without a map-answering foundation
model, and one round through real Ray actors on the synthetic twin."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fedhelp_seg_fm import brightness_maps

from raysim.algorithms import ALGORITHMS
from raysim.algorithms import params as algorithm_params
from raysim.algorithms.fedhelp import LARGE, MAPS_FILE, FedHelpParams, backward_kd_loss, forward_kd_loss, kd, public_kd_loss, rank_loss
from raysim.client.training import Batch, segmentation_loss
from raysim.config import ConfigError
from raysim.datasets import DATASETS
from raysim.engine import checkpoints
from raysim.engine.client_actor import ClientHost
from raysim.models import foundation
from raysim.models.backbones import build_model
from raysim.seeding import derive_seed

from helpers import load_config, make_driver, tiny_overrides

SEG_FM = "{backend: callable, target: 'fedhelp_seg_fm:brightness_maps'}"
SEG_FEDHELP = {
    "data.name": "synthetic",
    "model.name": "unet:test_resnet",  # the small U-Net (algorithm.small_model null: model.name)
    "algorithm.name": "fedhelp",
    "algorithm.large_model": "unet:resnet10t",  # ~3x the small one's parameters
    "algorithm.top_n": 1,
}


def hand_kl(teacher: torch.Tensor, student: torch.Tensor, t: float) -> float:
    """T² · mean over (batch, pixels) of Σ_c p_c log(p_c / q_c), pixel by pixel in plain Python."""
    b, k, h, w = teacher.shape
    total = 0.0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                p = torch.softmax(teacher[i, :, y, x].double() / t, 0)
                q = torch.softmax(student[i, :, y, x].double() / t, 0)
                total += sum(float(p[c] * (p[c].log() - q[c].log())) for c in range(k))
    return t**2 * total / (b * h * w)


def test_per_pixel_kd_ranking_and_supervised_terms_match_a_hand_computation() -> None:
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    assert kd(teacher, student, 2.0).item() == pytest.approx(hand_kl(teacher, student, 2.0), rel=1e-5)
    targets = torch.softmax(teacher / 2.0, dim=1)  # the foundation model's maps: the same KL against given probabilities
    assert public_kd_loss(student, targets, 2.0).item() == pytest.approx(hand_kl(teacher, student, 2.0), rel=1e-5)
    # ranking per pixel: proxy's top-1 is class 0 at one pixel, class 2 at the other; (1/2k) Σ ReLU(z_j - z_top), mean over the 2 pixels
    proxy = torch.tensor([[3.0, 0.0, 1.0], [0.0, 1.0, 3.0]]).T.reshape(1, 3, 1, 2)
    large = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 5.0]]).T.reshape(1, 3, 1, 2)
    assert rank_loss(large, proxy, k=1).item() == pytest.approx(((2.0 - 1.0) / 2 + 0.0) / 2)
    # forward / backward: the task's supervised loss (CE + soft Dice) + the per-pixel terms, each training its own model
    mask = torch.randint(0, 3, (2, 4, 5))
    batch = Batch(torch.zeros(2, 1, 4, 5), torch.zeros(2, dtype=torch.long), {}, torch.arange(2), mask=mask)
    p = FedHelpParams(temperature=2.0, lambda_rank=0.5)
    proxy_logits, large_logits = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    expected = segmentation_loss(proxy_logits, mask) + hand_kl(teacher, student, 2.0)
    assert forward_kd_loss(proxy_logits, large_logits, batch, p).item() == pytest.approx(expected.item(), rel=1e-5)
    backward = segmentation_loss(large_logits, mask) + hand_kl(student, teacher, 2.0) + 0.5 * rank_loss(teacher, student, 2)
    assert backward_kd_loss(proxy_logits, large_logits, batch, p, 2).item() == pytest.approx(backward.item(), rel=1e-5)
    backward_kd_loss(proxy_logits, large_logits, batch, p, 2).backward()
    assert proxy_logits.grad is None and large_logits.grad.abs().sum() > 0  # the proxy is the detached teacher


def seg_host(root: Path, tmp_path: Path, lines: list[str], **extra: object) -> ClientHost:
    cfg = load_config(None, tiny_overrides(root, **{**SEG_FEDHELP, **extra}))
    source = DATASETS.get("synthetic")(cfg.data, img_size=16, seed=0)
    algorithm = ALGORITHMS.get("fedhelp")(algorithm_params(cfg), cfg)
    specs = algorithm.arrange_clients(source.client_specs())
    return ClientHost(cfg, specs, algorithm.prepare_run(source, specs, tmp_path, lines.append))


def test_without_a_map_answering_foundation_model_the_fm_term_is_off_and_small_clients_train_as_fedavg(oph_root: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    host = seg_host(oph_root, tmp_path, lines)  # the default foundation model: timm, a classifier
    assert len(lines) == 1 and "answers one class distribution per image, not per-pixel maps" in lines[0] and "FM term is off (kd_public = 0)" in lines[0]
    assert not list(tmp_path.iterdir()) and host.algorithm.context["public"] is None  # nothing asked, no D_pub
    small = next(cid for cid, c in host.clients.items() if c.spec.role == "small")
    payload = host.algorithm.payload(host.algorithm.init_state(host.clients[small].model), 1)
    update = host.fit(small, payload, 1)
    # FedAvg on the same U-Net (small_model null: model.name) gets bit-identical weights: no FM term, no public batch
    fedavg_cfg = load_config(None, tiny_overrides(oph_root, **{"data.name": "synthetic", "model.name": "unet:test_resnet"}))
    fedavg = ClientHost(fedavg_cfg, [host.clients[small].spec])
    reference = fedavg.fit(small, fedavg.algorithm.payload(fedavg.algorithm.init_state(fedavg.clients[small].model), 1), 1)
    assert update.tensors.keys() == {f"net.{k}" for k in reference.tensors}
    assert all(torch.equal(update.tensors[f"net.{k}"], v) for k, v in reference.tensors.items())


def test_a_large_or_small_model_of_the_other_task_refuses_in_one_line(oph_root: Path) -> None:
    for extra, message in [
        ({"algorithm.large_model": "resnet50"}, "algorithm.large_model=resnet50 is a classification model, but model.name=unet:test_resnet makes this a segmentation run: FedHelp's large model must be a segmentation model of the same mask classes (e.g. unet:resnet50)"),
        ({"algorithm.small_model": "resnet10t"}, "algorithm.small_model=resnet10t is a classification model"),
        ({"model.name": "test_resnet", "data.name": "fairfedmed_oph"}, "algorithm.large_model=unet:resnet10t is a segmentation model, but model.name=test_resnet makes this a classification run"),
    ]:
        cfg = load_config(None, tiny_overrides(oph_root, **{**SEG_FEDHELP, **extra}))
        with pytest.raises(ConfigError) as err:
            ALGORITHMS.get("fedhelp")(algorithm_params(cfg), cfg)
        assert message in str(err.value) and "\n" not in str(err.value)


def test_maps_are_validated_stored_once_and_read_back_in_any_order(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 1, 4, 4), dtype=np.uint8)
    ids = np.array([f"s{i}" for i in range(5)])
    calls: list[int] = []

    def factory() -> foundation.FoundationModel:
        calls.append(1)
        return foundation.build_foundation_model("callable", {"target": "fedhelp_seg_fm:brightness_maps"})

    maps = foundation.soft_target_maps(tmp_path / MAPS_FILE, factory, images, ids, 3)
    assert maps.shape == (5, 3, 4, 4) and maps.dtype == np.float32 and np.allclose(maps.sum(axis=1), 1, atol=1e-6)
    again = foundation.soft_target_maps(tmp_path / MAPS_FILE, factory, images[::-1], ids[::-1], 3)
    assert calls == [1] and np.array_equal(again, maps[::-1])  # read back, reordered, never asked again
    classifier = foundation.build_foundation_model("callable", {"target": "fedhelp_fm:brightness"})
    with pytest.raises(foundation.FoundationModelError, match=r"returned shape \(5, 3\); expected \(5, 3, 4, 4\)"):
        foundation.predict_probability_maps(classifier, images, 3)
    bad = brightness_maps(images, 3)
    bad[2, :, 1, 3] = [0.5, 0.5, 0.5]
    with pytest.raises(foundation.FoundationModelError, match=r"image 2, pixel \(1, 3\) sums to 1.5"):
        foundation.check_probability_maps(bad, n=5, num_classes=3, size=(4, 4), source="x")


class MapsHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # http.server dispatches on this name
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        images = np.frombuffer(base64.b64decode(request["data"]), np.uint8).reshape(request["shape"])
        assert request["output"] == "maps"
        body = json.dumps({"probabilities": brightness_maps(images, request["num_classes"]).tolist()}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def maps_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), MapsHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/maps"
    server.shutdown()


def test_http_answers_maps_per_batch(maps_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    images = np.random.default_rng(1).integers(0, 256, (5, 1, 4, 4), dtype=np.uint8)
    model = foundation.build_foundation_model("http", {"url": maps_url, "batch_size": 2})
    assert np.allclose(foundation.predict_probability_maps(model, images, 3), brightness_maps(images, 3))


def test_one_round_through_ray_actors_trains_proxy_and_large_model_and_only_the_proxy_travels(ray_session, oph_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "fm_calls.txt"
    monkeypatch.setenv("RAYSIM_TEST_FM_LOG", str(log))
    run_dir, lines = tmp_path / "run", []
    # site3 held out as D_pub: one large and one small client; the foundation model answers maps
    extra = {"algorithm.foundation": SEG_FM, "algorithm.public": "{site: site3}", "federation.rounds": 1, "eval.predictions": "none", "checkpoint.every": 1, "resources.clients_per_actor": 2}
    make_driver(oph_root, run_dir, lines, **{**SEG_FEDHELP, **extra}).run()
    maps = np.load(run_dir / MAPS_FILE)["probabilities"]
    assert log.read_text() == f"{len(maps)}\n" and maps.shape[1:] == (3, 16, 16)  # asked once, per-pixel maps
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    dice = metrics[(metrics["split"] == "test") & (metrics["metric"] == "dice_disc") & (metrics["attribute"] == "")].set_index("client")
    assert set(dice.index) == {"site1", "site2", "mean", "mean:large", "mean:small"} and dice["value"].between(0, 1).all()
    large, small = (dice.index[(dice["role"] == r) & dice.index.str.startswith("site")][0] for r in ("large", "small"))
    assert dice.loc["mean:large", "value"] == dice.loc[large, "value"]
    # the proxy only: a large client uploads exactly what a small one does, far less than its large U-Net
    cfg = load_config(run_dir / "config.yaml", [])
    algorithm = ALGORITHMS.get("fedhelp")(algorithm_params(cfg), cfg)
    large_net = build_model(algorithm._large_cfg(), num_classes=3, in_chans=1, seed=derive_seed(cfg.seed, "large"))
    up = metrics[(metrics["split"] == "train") & (metrics["metric"] == "bytes_up")].set_index("client")["value"]
    assert up[large] == up[small] < 0.5 * sum(t.numel() * t.element_size() for t in large_net.state_dict().values())
    # the large model trained and never left its actor: it is in the client's own checkpoint
    folder = checkpoints.folder(run_dir, 1)
    saved = checkpoints.load(folder.parent / checkpoints.load_manifest(folder)["clients"][large])[large]["memory"][LARGE]
    assert any(not torch.equal(saved[k], v) for k, v in large_net.state_dict().items() if v.is_floating_point())
    # the averaged proxy moved; the public head never travelled
    server, _ = checkpoints.load_server(folder)
    initial = algorithm.init_state(algorithm.build_model(DATASETS.get("synthetic")(cfg.data, img_size=16, seed=0)))["weights"]
    assert server["weights"].keys() == initial.keys() and not any(k.startswith("public_head.") for k in initial)
    assert any(not torch.equal(server["weights"][k], v) for k, v in initial.items() if v.is_floating_point())


def test_the_preset_is_a_segmentation_run_with_the_specs_three_clients() -> None:
    cfg = load_config("fedhelp_segmentation", [])
    algorithm = ALGORITHMS.get("fedhelp")(algorithm_params(cfg), cfg)  # both models checked: U-Nets of the run's task
    assert algorithm.task.name == "segmentation" and cfg.model.img_size <= 64 and cfg.data.ratios == [0.45, 0.45, 0.1]
    assert algorithm._small_name() == cfg.model.name and algorithm._large_name() == "unet:resnet18"
