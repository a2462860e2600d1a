"""FedBM's class concepts (LKCC, Linguistic Knowledge-based Classifier Construction): each class's
prompt embeddings, their statistics, and the frozen classifier built from them.

Where the prompt embeddings come from (FedBM's `algorithm.embeddings` / `algorithm.text_encoder`):

- **A precomputed file** (`algorithm.embeddings=PATH`), in one of three forms:
  - `.npy`: one float array of shape (C, N, D): row c holds the N ≥ 2 prompt embeddings of class c
    (classes in label order, 0..C−1), D dimensions each;
  - `.parquet`: one table, one row per prompt embedding, with the columns `label` (integer class
    index 0..C−1) and `embedding` (a list of D floats, the same D in every row); at least 2 rows
    per class;
  - a directory with one file per class, `class_<k>.npy` (a float array (N_k, D)) or
    `class_<k>.parquet` (a column `embedding` as above), k = 0..C−1; N_k ≥ 2 and may differ.
- **A local text encoder** (`algorithm.text_encoder=DIR`): every template (`algorithm.templates`,
  "{}" standing for the concept) filled with each class's concept (`algorithm.class_concepts`, one
  per class in label order) and embedded. DIR is an open_clip model directory
  (`open_clip_config.json` + weights, loaded as `local-dir:DIR`; needs open_clip_torch) or a
  Hugging Face model directory (`config.json` + weights + tokenizer files; needs transformers):
  CLIP-like models embed with `get_text_features`, others by the attention-masked mean of the
  last hidden states (the paper's BERT / RoBERTa variant). Nothing is downloaded.
- **The synthetic stand-in** (`algorithm.embeddings=synthetic`, the default for the synthetic data
  set): N = 24 prompt embeddings of D = 512 per class (BiomedCLIP's width), drawn from the seed:
  class centres sharing a common direction (cosine ≈ 0.8 between classes, as text embeddings of
  one domain do), prompts scattered around them (cosine ≈ 0.95 to their centre). Not language:
  it gives the method its shape, not its knowledge.

Every prompt embedding is L2-normalised (as the paper does with CLIP's); then per class c:
μ_c = the mean, σ²_c = the per-dimension unbiased variance (the diagonal of the prompts'
covariance Σ_c) and the rows (e_{c,n} − μ_c)/√(N_c − 1), with which μ_c + Σ_n ξ_n·row_n + 10⁻²·η
(ξ, η standard normal) samples N(μ_c, Σ_c + 10⁻⁴·I), the paper's generator condition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from raysim.config import ConfigError
from raysim.datasets.arrays import load_npy
from raysim.datasets.base import DataError
from raysim.seeding import rng

SYNTHETIC = "synthetic"
SYNTHETIC_DIM, SYNTHETIC_PROMPTS = 512, 24
SYNTHETIC_SHARED, SYNTHETIC_SPREAD = 0.8, 0.33  # centres' share of the common direction; prompts' scatter
COV_RIDGE = 1e-4  # added to Σ_c's diagonal for the generator's condition (the reference code's 0.0001·I)

# Prompts in the manner of CLIP's prompt engineering, as the paper uses them ("{}": the concept).
DEFAULT_TEMPLATES = (
    "an image of {}.",
    "a photo of {}.",
    "a medical image of {}.",
    "a scan of {}.",
    "this is an image of {}.",
    "this is a medical image of {}.",
    "{} presented in the image.",
    "{} presented in a medical image.",
    "the image shows {}.",
    "the medical image shows {}.",
    "the image shows the presence of {}.",
    "the presence of {} in the image.",
)


@dataclass
class ConceptStats:
    """The per-class statistics of the prompt embeddings (float32; C classes, D dimensions)."""

    mean: torch.Tensor  # (C, D) μ_c
    var: torch.Tensor  # (C, D) σ²_c, the diagonal of Σ_c
    spread: torch.Tensor  # (C, N_max, D) (e_{c,n} − μ_c)/√(N_c − 1), zero rows past N_c


def concept_stats(per_class: Sequence[np.ndarray]) -> ConceptStats:
    """μ_c, σ²_c and the spread rows of each class's prompt embeddings (each (N_c, D), N_c ≥ 2), normalised first."""
    rows = max(len(e) for e in per_class)
    dim = per_class[0].shape[1]
    mean, var, spread = np.zeros((len(per_class), dim)), np.zeros((len(per_class), dim)), np.zeros((len(per_class), rows, dim))
    for c, raw in enumerate(per_class):
        e = raw.astype(np.float64)
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        mean[c] = e.mean(axis=0)
        var[c] = e.var(axis=0, ddof=1)
        spread[c, : len(e)] = (e - mean[c]) / np.sqrt(len(e) - 1)
    return ConceptStats(*(torch.from_numpy(a).to(torch.float32) for a in (mean, var, spread)))


def sample_concepts(stats: ConceptStats, labels: torch.Tensor, draw: torch.Generator) -> torch.Tensor:
    """One concept embedding per label from N(μ_c, Σ_c + COV_RIDGE·I), drawn by `draw` (a CPU generator)."""
    labels = labels.cpu()
    xi = torch.randn(len(labels), stats.spread.shape[1], generator=draw)
    eta = torch.randn(len(labels), stats.mean.shape[1], generator=draw)
    device = stats.mean.device
    labels, xi, eta = labels.to(device), xi.to(device), eta.to(device)
    return stats.mean[labels] + torch.einsum("bn,bnd->bd", xi, stats.spread[labels]) + COV_RIDGE**0.5 * eta


# --- the frozen classifier ------------------------------------------------------------------------


class ConceptHead(nn.Module):
    """The classifier head FedBM puts in place of the network's: a trainable projection P to the
    embedding space (the paper's `linear_fedbm`, trained and averaged like the backbone) and the
    frozen concept classifier. f = P(h)/‖P(h)‖; logits z_c = T·f·μ_c + ½T²·Σ_d f_d² σ²_{c,d}.

    μ, σ² and the spread rows are buffers outside the state dict: constants every process derives
    from the config, never trained, never sent. Each forward keeps its ½T²·f²·σ² term
    (`variance_term`) for the loss's second part (`concept_loss`)."""

    def __init__(self, in_features: int, stats: ConceptStats, temperature: float) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, stats.mean.shape[1])
        self.register_buffer("mu", stats.mean.clone(), persistent=False)
        self.register_buffer("var", stats.var.clone(), persistent=False)
        self.register_buffer("spread", stats.spread.clone(), persistent=False)
        self.temperature = temperature
        self.variance_term: torch.Tensor | None = None

    @property
    def stats(self) -> ConceptStats:
        return ConceptStats(self.mu, self.var, self.spread)

    @property
    def num_classes(self) -> int:
        return self.mu.shape[0]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        f = F.normalize(self.proj(h), dim=-1)
        t = self.temperature
        self.variance_term = 0.5 * t * t * (f * f) @ self.var.T
        return t * (f @ self.mu.T) + self.variance_term

    def pop_variance(self) -> torch.Tensor:
        term, self.variance_term = self.variance_term, None
        if term is None:
            raise RuntimeError("fedbm: the concept head has not run since its variance term was last used")
        return term


def attach_concept_head(model: nn.Module, stats: ConceptStats, temperature: float) -> ConceptHead:
    """Replace the network's classifier (`get_classifier()` of the outermost module that has one,
    so a timm backbone inside a SliceFold is found too; an nn.Linear) by a ConceptHead."""
    owner = next((m for m in model.modules() if callable(getattr(m, "get_classifier", None))), None)
    if owner is None:
        raise ValueError(f"fedbm replaces the classifier head found by get_classifier() (every timm model has one); {type(model).__name__} has none")
    head = owner.get_classifier()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"fedbm replaces a linear classifier head; {type(owner).__name__}'s is {type(head).__name__}")
    if head.out_features != len(stats.mean):
        raise ValueError(f"the class concepts hold {len(stats.mean)} classes; the model has {head.out_features}")
    name = next(n for n, m in model.named_modules() if m is head)
    parent, _, attribute = name.rpartition(".")
    new = ConceptHead(head.in_features, stats, temperature)
    setattr(model.get_submodule(parent), attribute, new)
    return new


def concept_head(model: nn.Module) -> ConceptHead:
    head = next((m for m in model.modules() if isinstance(m, ConceptHead)), None)
    if head is None:
        raise ValueError(f"fedbm: {type(model).__name__} has no concept head (FedBM.adapt puts one in)")
    return head


def concept_loss(logits: torch.Tensor, head: ConceptHead, labels: torch.Tensor) -> torch.Tensor:
    """CE(z, y) + ½T²·Σ_d f_d² σ²_{y,d}, the mean over the batch (= log Σ_c e^{z_c} − T·f·μ_y, an upper
    bound of the cross-entropy expected over classifiers w_c ~ N(μ_c, diag σ²_c)). A network that
    averages several head outputs per sample (SliceFold's slice groups) averages their terms too."""
    term = head.pop_variance()
    term = term.reshape(len(labels), -1, term.shape[1]).mean(dim=1)
    own = F.one_hot(labels, term.shape[1]).to(term.dtype)  # not gather: its CUDA gradient is a scatter-add, flagged non-deterministic
    return F.cross_entropy(logits, labels) + (term * own).sum(dim=1).mean()


# --- where the embeddings come from ---------------------------------------------------------------


def synthetic_embeddings(num_classes: int, seed: int, *, dim: int = SYNTHETIC_DIM, prompts: int = SYNTHETIC_PROMPTS) -> list[np.ndarray]:
    """The seeded stand-in: `prompts` unit vectors of `dim` per class (see the module docstring)."""
    gen = rng(seed, "fedbm", "synthetic concepts")
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    shared = unit(gen.standard_normal(dim))
    out = []
    for _ in range(num_classes):
        centre = unit(np.sqrt(SYNTHETIC_SHARED) * shared + np.sqrt(1 - SYNTHETIC_SHARED) * unit(gen.standard_normal(dim)))
        out.append(unit(centre + SYNTHETIC_SPREAD * gen.standard_normal((prompts, dim)) / np.sqrt(dim)))
    return out


def load_embeddings(path: Path, num_classes: int, key: str = "algorithm.embeddings") -> list[np.ndarray]:
    """The prompt embeddings of each class from a `.npy`, a `.parquet` or a directory of per-class files."""
    where = f"{key}={path}"
    if path.is_dir():
        per_class = []
        for c in range(num_classes):
            found = [p for p in (path / f"class_{c}.npy", path / f"class_{c}.parquet") if p.is_file()]
            if len(found) != 1:
                raise ConfigError(f"{where}: expected exactly one of class_{c}.npy / class_{c}.parquet for each of the {num_classes} classes, found {len(found)} for class {c}")
            per_class.append(_read_npy(found[0], key, ndim=2) if found[0].suffix == ".npy" else _parquet_column(found[0], key))
        return _checked(per_class, where)
    if not path.is_file():
        raise ConfigError(f"{where}: no such file or directory (expected a .npy, a .parquet or a directory of class_<k>.npy files)")
    if path.suffix == ".npy":
        array = _read_npy(path, key, ndim=3)
        if len(array) != num_classes:
            raise ConfigError(f"{where}: expected a float array of shape (classes={num_classes}, prompts>=2, dim), got shape {array.shape}")
        return _checked(list(array), where)
    if path.suffix == ".parquet":
        table = _read_parquet(path, key, ("label", "embedding"))
        labels = pd.to_numeric(table["label"], errors="coerce")
        if labels.isna().any() or (labels % 1 != 0).any() or not labels.between(0, num_classes - 1).all():
            raise ConfigError(f"{where}: column 'label' must hold integer class indices 0..{num_classes - 1}")
        rows = _stack(table["embedding"], where)
        return _checked([rows[(labels == c).to_numpy()] for c in range(num_classes)], where)
    raise ConfigError(f"{where}: expected a .npy or .parquet file or a directory, got a {path.suffix or 'suffix-less'} file")


def _read_npy(path: Path, key: str, *, ndim: int) -> np.ndarray:
    try:
        array = load_npy(path)  # the header's shape checked against the file and memory first
    except DataError as err:
        raise ConfigError(f"{key}={err}") from err
    expected = "(classes, prompts>=2, dim)" if ndim == 3 else "(prompts>=2, dim)"
    if array.ndim != ndim or not np.issubdtype(array.dtype, np.number):
        raise ConfigError(f"{key}={path}: expected a float array of shape {expected}, got {array.dtype} of shape {array.shape}")
    return array.astype(np.float64)


def _read_parquet(path: Path, key: str, columns: tuple[str, ...]) -> pd.DataFrame:
    try:
        table = pd.read_parquet(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}={path}: not a readable Parquet file ({' '.join(str(err).split())[:160]})") from err
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ConfigError(f"{key}={path}: expected the columns {list(columns)}, missing {missing}")
    return table


def _parquet_column(path: Path, key: str) -> np.ndarray:
    return _stack(_read_parquet(path, key, ("embedding",))["embedding"], f"{key}={path}")


def _stack(column: pd.Series, where: str) -> np.ndarray:
    try:
        rows = np.stack([np.asarray(v, dtype=np.float64) for v in column]) if len(column) else np.empty((0, 0))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: column 'embedding' must hold lists of floats of one length ({' '.join(str(err).split())[:120]})") from err
    if rows.ndim != 2:
        raise ConfigError(f"{where}: column 'embedding' must hold lists of floats of one length, got rows of shape {rows.shape[1:]}")
    return rows


def _checked(per_class: list[np.ndarray], where: str) -> list[np.ndarray]:
    """Each class: ≥ 2 finite, non-zero prompt embeddings of one common width."""
    dims = {e.shape[1] for e in per_class}
    if len(dims) != 1 or 0 in dims:
        raise ConfigError(f"{where}: every class's embeddings must have one common, non-zero width, got widths {sorted(dims)}")
    for c, e in enumerate(per_class):
        if len(e) < 2:
            raise ConfigError(f"{where}: class {c} has {len(e)} prompt embedding(s); expected at least 2 (σ²_c is their variance)")
        if not np.isfinite(e).all() or (np.linalg.norm(e, axis=1) == 0).any():
            raise ConfigError(f"{where}: class {c}'s embeddings must be finite and non-zero")
    return per_class


def encode_prompts(directory: Path, concepts: Sequence[str], templates: Sequence[str], num_classes: int, key: str = "algorithm.text_encoder") -> list[np.ndarray]:
    """Each class's concept in every template, embedded by the local text encoder in `directory`."""
    where = f"{key}={directory}"
    if len(concepts) != num_classes:
        raise ConfigError(f"algorithm.class_concepts: expected {num_classes} concepts (one per class, label order) for {where}, got {len(concepts)}")
    if not directory.is_dir():
        raise ConfigError(f"{where}: not a directory (expected an open_clip or a Hugging Face model directory)")
    if (directory / "open_clip_config.json").is_file():
        encode = _open_clip_encoder(directory, where)
    elif (directory / "config.json").is_file():
        encode = _hf_encoder(directory, where)
    else:
        raise ConfigError(f"{where}: expected an open_clip model directory (open_clip_config.json) or a Hugging Face one (config.json)")
    with torch.no_grad():
        return _checked([encode([t.format(concept) for t in templates]).double().cpu().numpy() for concept in concepts], where)


def _open_clip_encoder(directory: Path, where: str):  # type: ignore[no-untyped-def]
    try:
        import open_clip
    except ImportError as err:
        raise ConfigError(f"{where}: an open_clip model directory needs the open_clip_torch package, which is not installed (pip install open_clip_torch)") from err
    if not any(any(directory.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.pth")):
        raise ConfigError(f"{where}: no weights file (*.safetensors, *.bin or *.pth) beside open_clip_config.json; open_clip would embed with random weights")
    try:
        model = open_clip.create_model(f"local-dir:{directory}").eval()
        tokenizer = open_clip.get_tokenizer(f"local-dir:{directory}")
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise ConfigError(f"{where}: open_clip could not load it ({' '.join(str(err).split())[:160]})") from err
    return lambda prompts: model.encode_text(tokenizer(prompts))


def _hf_encoder(directory: Path, where: str):  # type: ignore[no-untyped-def]
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as err:
        raise ConfigError(f"{where}: a Hugging Face model directory needs the transformers package, which is not installed (pip install transformers)") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        try:  # transformers 5 fetches "hub kernels" unless told not to; older versions lack the flag
            model = AutoModel.from_pretrained(str(directory), local_files_only=True, use_kernels=False)
        except TypeError:
            model = AutoModel.from_pretrained(str(directory), local_files_only=True)
        model.eval()
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise ConfigError(f"{where}: transformers could not load it ({' '.join(str(err).split())[:160]})") from err

    def encode(prompts: list[str]) -> torch.Tensor:
        tokens = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        if callable(getattr(model, "get_text_features", None)):
            out = model.get_text_features(**{k: v for k, v in tokens.items() if k in ("input_ids", "attention_mask")})
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        hidden = model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1)

    return encode
