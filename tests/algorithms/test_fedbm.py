"""FedBM (algorithms/fedbm.py, fedbm_concepts.py): the frozen concept classifier and its loss, the
server's generator, the clients' pseudo-data, and where the class concepts come from. Plain torch
and real clients of the tiny set, no Ray (the registry loop runs FedBM through Ray actors)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from raysim.algorithms.fedbm import PREFIX, ConceptGenerator, FedBM, diversity_loss, split_payload, train_generator
from raysim.algorithms.fedbm_concepts import (
    ConceptHead,
    attach_concept_head,
    concept_head,
    concept_loss,
    concept_stats,
    encode_prompts,
    load_embeddings,
    synthetic_embeddings,
)
from raysim.config import ConfigError

from helpers import load_config, make_host, start

SYNTHETIC = {"algorithm.embeddings": "synthetic"}
SMALL_GENERATOR = {"algorithm.generator_every": 1, "algorithm.generator_steps": 2, "algorithm.generator_batch": 8, "algorithm.pseudo_batch": 4}


def small_stats(seed: int = 0, classes: int = 2):  # type: ignore[no-untyped-def]
    return concept_stats(synthetic_embeddings(classes, seed, dim=8, prompts=4))


class Net(nn.Module):
    """conv -> BatchNorm -> pool -> fc, with timm's get_classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Linear(16, 2)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


# --- the classifier -------------------------------------------------------------------------------


def test_the_head_is_built_from_the_concepts_and_stays_frozen_in_a_local_round(oph_root: Path) -> None:
    host = make_host(oph_root, "fedbm", **SYNTHETIC)
    model = host.clients["site1"].model
    head = concept_head(model)
    expected = concept_stats(synthetic_embeddings(2, host.cfg.seed))
    assert torch.equal(head.mu, expected.mean) and torch.equal(head.var, expected.var)
    assert head.mu.shape == (2, 512)  # the stand-in's width: the projection maps the features there
    assert all(p is not head.mu and p is not head.var for p in model.parameters()) and not head.mu.requires_grad
    state, payload = start(host)
    assert [k for k in payload if k.startswith("fc.")] == ["fc.proj.weight", "fc.proj.bias"]  # μ, σ² never travel
    mu, var = head.mu.clone(), head.var.clone()
    update = host.fit("site1", payload, 1)
    assert torch.equal(head.mu, mu) and torch.equal(head.var, var) and head.mu.grad is None
    assert not torch.equal(update.tensors["fc.proj.weight"], payload["fc.proj.weight"])  # the projection trains
    h = torch.randn(5, head.proj.in_features)
    with torch.no_grad():
        f, t = F.normalize(head.proj(h), dim=1), head.temperature
        torch.testing.assert_close(head(h), t * f @ mu.T + 0.5 * t * t * (f * f) @ var.T)


def test_the_loss_is_the_bound_on_the_cross_entropy_expected_over_the_concept_classifiers() -> None:
    stats = small_stats()
    stats.var *= 20  # a spread the Monte-Carlo estimate below tells apart from the bound
    head = ConceptHead(6, stats, temperature=2.0)
    h, y = torch.randn(7, 6, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 1, 0, 1, 0, 0])
    with torch.no_grad():
        loss = concept_loss(head(h), head, y)
        f = F.normalize(head.proj(h), dim=1)
        z = head(h)
        head.pop_variance()
        torch.testing.assert_close(loss, (torch.logsumexp(z, dim=1) - 2.0 * (f * stats.mean[y]).sum(1)).mean())
        w = stats.mean + stats.var.sqrt() * torch.randn(20000, *stats.mean.shape, generator=torch.Generator().manual_seed(1))
        expected_ce = F.cross_entropy(2.0 * torch.einsum("scd,bd->sbc", w, f).reshape(-1, 2), y.repeat(20000))
    assert expected_ce < loss  # an upper bound (Jensen), as the paper derives
    stats.var.zero_()  # no spread: a cosine classifier with the class means as weights, plain cross-entropy
    exact = ConceptHead(6, stats, temperature=2.0)
    exact.load_state_dict(head.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(concept_loss(exact(h), exact, y), F.cross_entropy(2.0 * f @ stats.mean.T, y))


def test_a_head_that_is_not_linear_or_has_another_class_count_is_refused() -> None:
    with pytest.raises(ValueError, match="the class concepts hold 3 classes; the model has 2"):
        attach_concept_head(Net(), small_stats(classes=3), 1.0)
    net = Net()
    net.fc = nn.Identity()  # type: ignore[assignment]
    with pytest.raises(ValueError, match="linear classifier head; Net's is Identity"):
        attach_concept_head(net, small_stats(), 1.0)


# --- the server's generator -----------------------------------------------------------------------


def run_generator(seed: int, lr: float) -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model, generator = Net(), ConceptGenerator(8, 3, 8, width=4)
    attach_concept_head(model, small_stats(), temperature=12.5)
    objective = train_generator(generator, model, steps=30, batch_size=16, lr=lr, lambda_div=1.0, lambda_dis=0.1, seed=seed, mean=torch.zeros(1, 3, 1, 1), std=torch.ones(1, 3, 1, 1))
    return objective, generator.state_dict()


def test_the_generator_training_is_deterministic_and_lowers_its_objective() -> None:
    first, weights = run_generator(seed=1, lr=1e-2)
    again, same = run_generator(seed=1, lr=1e-2)
    assert first == again and all(torch.equal(weights[k], same[k]) for k in weights)
    assert run_generator(seed=2, lr=1e-2)[0] != first  # the draws come from the seed
    untrained, _ = run_generator(seed=1, lr=0.0)  # the same draws, the generator left as it was
    assert np.mean(first[-10:]) < 0.9 * np.mean(untrained[-10:])


def test_the_diversity_term_is_the_mean_inverse_distance_ratio_within_each_class() -> None:
    gen = torch.Generator().manual_seed(0)
    codes, images, labels = torch.randn(7, 4, generator=gen), torch.rand(7, 1, 3, 3, generator=gen), torch.tensor([0, 1, 0, 0, 1, 2, 0])
    per_class = [(1 / (F.pdist(images[labels == c].flatten(1), p=1) / F.pdist(codes[labels == c], p=1) + 1e-5)).mean() for c in (0, 1)]
    torch.testing.assert_close(diversity_loss(codes, images, labels, 3), sum(per_class) / 3)  # class 2 has one sample: no pair


def test_the_generator_makes_images_of_the_input_size_for_any_size() -> None:
    for size in (8, 16, 28):
        assert ConceptGenerator(8, 1, size, width=2)(torch.randn(3, 8)).shape == (3, 1, size, size)


# --- the round: server and clients ---------------------------------------------------------------


def test_clients_calibrate_with_the_generator_the_server_trained(oph_root: Path) -> None:
    host = make_host(oph_root, "fedbm", **SYNTHETIC, **SMALL_GENERATOR)
    algorithm = host.algorithm
    state, payload = start(host)
    assert state["generator"] == {} and not any(k.startswith(PREFIX) for k in payload)  # none before its first training
    updates = [host.fit(cid, payload, 1) for cid in sorted(host.clients)]
    new = algorithm.aggregate(1, updates, state)
    repeat = algorithm.aggregate(1, updates, state)
    assert new["generator"] and all(torch.equal(new["generator"][k], repeat["generator"][k]) for k in new["generator"])
    assert len(new["generator_objective"]) == 2 and new["generator_objective"] == repeat["generator_objective"]
    assert algorithm.server_metrics(1, new) == {"generator_loss": new["generator_objective"][-1]}
    assert algorithm.aggregate(2, updates, new)["generator"] is new["generator"]  # not after the last round
    payload = dict(algorithm.payload(new, 2))
    weights, generator = split_payload(payload)
    assert generator.keys() == new["generator"].keys()

    client = host.clients["site1"]
    saved = client.snapshot()
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def recorded(model: nn.Module, batch):  # type: ignore[no-untyped-def]
        seen.append((len(batch.y), batch.index[-4:].clone(), batch.y[-4:].clone()))
        return FedBM.loss(algorithm, model, batch)

    algorithm.loss = recorded  # type: ignore[method-assign]
    calibrated = host.fit("site1", payload, 2)
    with_pseudo, seen[:] = list(seen), []
    client.set_state(saved)
    assert all(torch.equal(v, calibrated.tensors[k]) for k, v in host.fit("site1", payload, 2).tensors.items())  # repeatable
    seen.clear()
    client.set_state(saved)
    plain = host.fit("site1", weights, 2)
    assert [n + 4 for n, _, _ in seen] == [n for n, _, _ in with_pseudo]  # every batch got 4 pseudo-samples
    assert all((index == -1).all() and ((labels >= 0) & (labels < 2)).all() for _, index, labels in with_pseudo)
    assert any(not torch.equal(plain.tensors[k], calibrated.tensors[k]) for k in plain.tensors)
    assert len(host.evaluate("site1", payload, ["test"])[0].scores) > 0  # the generator keys stay out of the model


# --- where the concepts come from -----------------------------------------------------------------


def test_the_synthetic_stand_in_is_a_function_of_its_seed() -> None:
    a, b, c = synthetic_embeddings(3, 7), synthetic_embeddings(3, 7), synthetic_embeddings(3, 8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and not np.array_equal(a[0], c[0])
    assert [x.shape for x in a] == [(24, 512)] * 3
    stats = concept_stats(a)
    cosine = F.normalize(stats.mean, dim=1) @ F.normalize(stats.mean, dim=1).T
    assert 0.6 < float(cosine[0, 1]) < 0.95  # classes of one domain: close, not identical
    assert torch.isfinite(stats.var).all() and (stats.var > 0).all()


def test_precomputed_embeddings_load_from_npy_parquet_and_a_directory(oph_root: Path, tmp_path: Path) -> None:
    gen = np.random.default_rng(0)
    per_class = [gen.standard_normal((5, 8)), gen.standard_normal((3, 8))]
    table = pd.DataFrame({"label": [0] * 5 + [1] * 3, "embedding": [list(r) for e in per_class for r in e]})
    table.to_parquet(tmp_path / "table.parquet")
    (tmp_path / "classes").mkdir()
    np.save(tmp_path / "classes" / "class_0.npy", per_class[0])
    pd.DataFrame({"embedding": [list(r) for r in per_class[1]]}).to_parquet(tmp_path / "classes" / "class_1.parquet")
    np.save(tmp_path / "one.npy", np.stack([per_class[0][:3], per_class[1]]))
    for path, expected in (("table.parquet", per_class), ("classes", per_class), ("one.npy", [per_class[0][:3], per_class[1]])):
        loaded = load_embeddings(tmp_path / path, 2)
        assert all(np.array_equal(x, y) for x, y in zip(loaded, expected)), path
    host = make_host(oph_root, "fedbm", **{"algorithm.embeddings": str(tmp_path / "table.parquet")})
    assert torch.equal(concept_head(host.clients["site1"].model).mu, concept_stats(per_class).mean)  # the run uses them


def malformed(tmp_path: Path, case: str) -> Path:
    gen = np.random.default_rng(0)
    path = tmp_path / {"directory": "dir", "text": "e.npy", "csv": "e.csv"}.get(case, "e.parquet" if case.startswith("parquet") else "e.npy")
    if case == "2d":
        np.save(path, gen.standard_normal((2, 8)))
    elif case == "classes":
        np.save(path, gen.standard_normal((3, 4, 8)))
    elif case == "one prompt":
        np.save(path, gen.standard_normal((2, 1, 8)))
    elif case == "nan":
        np.save(path, np.full((2, 3, 8), np.nan))
    elif case == "text":
        path.write_text("not an array")
    elif case == "csv":
        path.write_text("label,embedding\n")
    elif case == "parquet column":
        pd.DataFrame({"class": [0, 1], "embedding": [[1.0], [2.0]]}).to_parquet(path)
    elif case == "parquet label":
        pd.DataFrame({"label": [0, 5], "embedding": [[1.0], [2.0]]}).to_parquet(path)
    elif case == "parquet ragged":
        pd.DataFrame({"label": [0, 0, 1, 1], "embedding": [[1.0], [1.0, 2.0], [1.0], [2.0]]}).to_parquet(path)
    elif case == "directory":
        path.mkdir()
        np.save(path / "class_0.npy", gen.standard_normal((3, 8)))
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("2d", r"expected a float array of shape \(classes, prompts>=2, dim\), got float64 of shape \(2, 8\)"),
        ("classes", r"expected a float array of shape \(classes=2, prompts>=2, dim\), got shape \(3, 4, 8\)"),
        ("one prompt", "class 0 has 1 prompt embedding"),
        ("nan", "class 0's embeddings must be finite and non-zero"),
        ("text", "not a readable .npy array"),
        ("csv", "expected a .npy or .parquet file or a directory, got a .csv file"),
        ("parquet column", r"expected the columns \['label', 'embedding'\], missing \['label'\]"),
        ("parquet label", "column 'label' must hold integer class indices 0..1"),
        ("parquet ragged", "column 'embedding' must hold lists of floats of one length"),
        ("directory", "expected exactly one of class_1.npy / class_1.parquet"),
        ("missing", "no such file or directory"),
    ],
)
def test_malformed_embeddings_are_one_line_errors_naming_the_file(tmp_path: Path, case: str, message: str) -> None:
    path = malformed(tmp_path, case) if case != "missing" else tmp_path / "absent.npy"
    with pytest.raises(ConfigError, match=message) as info:
        load_embeddings(path, 2)
    assert str(info.value).startswith(f"algorithm.embeddings={path}: ") and "\n" not in str(info.value)


def test_a_real_data_set_without_concepts_is_a_config_error_before_training(oph_root: Path) -> None:
    with pytest.raises(ConfigError, match=r"algorithm.embeddings: fedbm needs class-concept embeddings for data.name=fairfedmed_oph"):
        make_host(oph_root, "fedbm")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"embeddings": "e.npy", "text_encoder": "enc"}, "set one of them, not both"),
        ({"text_encoder": "enc"}, "algorithm.class_concepts: expected one concept per class"),
        ({"class_concepts": ["a", "b"]}, "expected only with algorithm.text_encoder"),
        ({"text_encoder": "enc", "class_concepts": ["a"], "templates": ["no slot"]}, "algorithm.templates: expected '{}'"),
        ({"temperature": 0}, "algorithm.temperature must be a number > 0"),
        ({"generator_steps": 0}, "algorithm.generator_steps must be an integer >= 1"),
        ({"pseudo_batch": 1.5}, "algorithm.pseudo_batch must be an integer >= 1"),
        ({"lambda_div": -1}, "algorithm.lambda_div must be a number >= 0"),
    ],
)
def test_bad_parameters_name_their_key(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["algorithm.name=fedbm", *(f"algorithm.{k}={json.dumps(v)}" for k, v in settings.items())]).algorithm_params()


# --- a local text encoder (tiny, randomly initialised, saved to a temporary directory) -------------

PROMPTS = ["an image of {}.", "a photo of {}."]


def test_a_hugging_face_encoder_directory_embeds_the_prompts(oph_root: Path, tmp_path: Path) -> None:
    import transformers  # the `test` extra installs it (and open_clip): these tests never skip
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "an", "image", "of", "a", "photo", "glaucoma", "no", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(words))
    transformers.BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "bert")
    torch.manual_seed(0)
    config_ = transformers.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    transformers.BertModel(config_).save_pretrained(tmp_path / "bert")
    embedded = encode_prompts(tmp_path / "bert", ["glaucoma", "no glaucoma"], PROMPTS, 2)
    assert [e.shape for e in embedded] == [(2, 16), (2, 16)] and not np.allclose(embedded[0], embedded[1])
    settings = {"algorithm.text_encoder": str(tmp_path / "bert"), "algorithm.class_concepts": '["glaucoma", "no glaucoma"]', "algorithm.templates": json.dumps(PROMPTS)}
    host = make_host(oph_root, "fedbm", **settings)
    assert torch.equal(concept_head(host.clients["site1"].model).mu, concept_stats(embedded).mean)


def test_an_open_clip_encoder_directory_embeds_the_prompts(tmp_path: Path) -> None:
    import open_clip
    from safetensors.torch import save_file

    text = {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}
    cfg = {"model_cfg": {"embed_dim": 8, "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "patch_size": 8, "head_width": 8}, "text_cfg": text}}
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="no weights file"):
        encode_prompts(tmp_path / "clip", ["glaucoma", "no glaucoma"], PROMPTS, 2)
    torch.manual_seed(0)
    save_file(open_clip.create_model(f"local-dir:{tmp_path / 'clip'}").state_dict(), str(tmp_path / "clip" / "open_clip_model.safetensors"))
    embedded = encode_prompts(tmp_path / "clip", ["glaucoma", "no glaucoma"], PROMPTS, 2)
    assert [e.shape for e in embedded] == [(2, 8), (2, 8)] and not np.allclose(embedded[0], embedded[1])


def test_an_encoder_whose_library_is_missing_is_a_one_line_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    with pytest.raises(ConfigError, match=r"needs the transformers package, which is not installed \(pip install transformers\)"):
        encode_prompts(tmp_path, ["a", "b"], PROMPTS, 2)
    with pytest.raises(ConfigError, match="expected 2 concepts"):
        encode_prompts(tmp_path, ["a"], PROMPTS, 2)
