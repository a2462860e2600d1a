"""`python -m raysim.pretrain --clip`: the small CLIP (`RaySim-Tiny-ViT`) trained on the synthetic public pool.

    python -m raysim.pretrain --clip                       # RaySim-Tiny-ViT at 64 px, into the cache
    python -m raysim.pretrain --clip --img-size 32 --out tiny_clip.pt

The embedded stand-in for CLIP (issue 31): a run on `model.name=clip:RaySim-Tiny-ViT` whose
method needs pretrained weights and that names no `model.weights` uses this checkpoint, built
once per (architecture, image size, pool and training settings) under
`cache_root()/pretrained/` (`resolve_weights`, `ensure_clip_pretrained`); nothing is downloaded.

Data: the pool `raysim.pretrain` trains the timm backbone on (the synthetic generator's
`population="public"`, generator seed 0: its own patients, files and scanners). Each image's
caption is written from its patient's label and attributes (`caption`): the class name as the
data source names it ("NOT Glaucoma" / "Glaucoma"), age, race and gender, in one of a few
templates (`TEMPLATES`, drawn per image and epoch from the seed). Training: open_clip's
`ClipLoss` (symmetric InfoNCE over the batch), AdamW with warm-up and cosine decay, fixed torch
threads and seeds, so the same settings give a bit-identical checkpoint. Per epoch it prints the
zero-shot AUC on the pool's held-out test split with CLIP's fixed prompt "a photo of {class
name}." (`raysim.models.clip.PROMPT`), as a `clip:` host classifies. Images are normalised as a
1-channel run normalises them for a CLIP host (the mean of CLIP's channel statistics) and
repeated to 3 channels, so a grey fundus run sees exactly the trained function.

Both towers start from scratch, so the zero-shot AUC sits near 50 for the first few epochs
(image and text features must find the label together) and then climbs: the defaults (1,500
patients, 20 epochs of 32 captioned images) reach about 82 on the held-out split at 64 px in
about 2.5 minutes on 2 cores, pool generation included; a smaller pool or fewer epochs stay
far lower (600 patients at 32 px: about 55; 16 epochs at 64 px: about 74).

The checkpoint is the open_clip state dict (both towers, the logit scale):
`open_clip.create_model("RaySim-Tiny-ViT", pretrained=PATH, force_image_size=SIZE)` loads it. A
JSON sidecar (`<file>.json`) records the settings, the pool and the history.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch.nn import functional as F

from raysim import console
from raysim.client.pretrain_files import ensure_built, public_pool_kwargs, torch_threads, write_checkpoint
from raysim.config import ConfigError, ExperimentConfig, ModelConfig
from raysim.console import Echo
from raysim.datasets import synthetic
from raysim.datasets.cache import cache_root
from raysim.datasets.fairfedmed_oph import FairFedMedOph
from raysim.datasets.imaging import resize_chw
from raysim.datasets.oph_schema import NUM_SITES, SPLITS
from raysim.models.clip import CLIP_MEAN, CLIP_STD, PREFIX, PROMPT
from raysim.models.clip_tiny import IMAGE_SIZE, TINY_ARCH
from raysim.seeding import derive_seed

if TYPE_CHECKING:
    from raysim.datasets.pools import Pool

FORMAT_VERSION = 1
CAPTIONS_VERSION = 1  # bump when TEMPLATES or `caption` change: part of the cache key
CLASS_NAMES: tuple[str, ...] = FairFedMedOph.class_names  # the synthetic twin's, by label code
TEMPLATES = (
    "a fundus photo of {label}, of a {age} year old {race} {gender} patient.",
    "a photo of {label} in the eye of a {race} {gender}, aged {age}.",
    "{label}: a retinal fundus image of a {age} year old {race} {gender}.",
    "a photo of {label}.",
)


@dataclass(frozen=True)
class ClipPretrainSettings:
    """Everything that decides the checkpoint (its cache key); the defaults' cost and AUC are in
    the module docstring."""

    arch: str = TINY_ARCH
    img_size: int = IMAGE_SIZE
    patients: int = 1500  # public pool size (the timm backbone's pool at 64 px)
    epochs: int = 20
    seed: int = 0  # pool draw, initialisation, caption templates and data order
    lr: float = 5e-4
    batch_size: int = 32  # smaller batches, more steps: 32 learnt faster than 64 or 16 per second
    threads: int = 2  # torch threads, fixed so the result does not depend on the machine
    captions: int = CAPTIONS_VERSION

    def resolved(self) -> ClipPretrainSettings:
        """The same settings with a `clip:` prefix dropped from arch."""
        return dataclasses.replace(self, arch=self.arch.removeprefix(PREFIX))

    def validate(self) -> None:
        for key in ("img_size", "patients", "epochs", "batch_size", "threads", "lr"):
            value = getattr(self, key)
            if not 0 < value < math.inf:
                raise ConfigError(f"pretrain {key} must be a positive finite number, got {value}")
        if self.batch_size < 2:
            raise ConfigError(f"pretrain batch_size must be >= 2 (a contrastive batch needs negatives), got {self.batch_size}")
        if self.captions != CAPTIONS_VERSION:
            raise ConfigError(f"pretrain captions must be {CAPTIONS_VERSION} (the caption templates this raysim writes), got {self.captions}")
        patch = check_arch(self.resolved().arch)
        if self.img_size < patch:
            raise ConfigError(f"pretrain img_size must be at least the {self.resolved().arch} patch size ({patch} px), got {self.img_size}")
        try:
            synthetic.generator_params(**self.pool_kwargs())
        except ValueError as err:
            raise ConfigError(f"pretrain pool: {err}") from err

    def pool_kwargs(self) -> dict[str, Any]:
        """The generator's arguments: the timm backbone's pool at these settings (one cached pool)."""
        s = self.resolved()
        return public_pool_kwargs(img_size=s.img_size, patients=s.patients, seed=s.seed)

    def key_dict(self) -> dict[str, Any]:
        s = self.resolved()
        return {
            "format": FORMAT_VERSION,
            "kind": "clip",
            "model": f"{PREFIX}{s.arch}",
            "img_size": s.img_size,
            "arch_config": _arch_config(s.arch),  # a raysim that changes the tiny arch builds anew
            "pool": synthetic.generator_params(**s.pool_kwargs()),
            "captions": {"version": s.captions, "templates": list(TEMPLATES), "class_names": list(CLASS_NAMES)},
            "training": {"epochs": s.epochs, "seed": s.seed, "lr": s.lr, "batch_size": s.batch_size, "threads": s.threads, "optimizer": "adamw", "loss": "open_clip.ClipLoss"},
        }

    def cache_path(self) -> Path:
        s = self.resolved()
        key = hashlib.sha256(json.dumps(self.key_dict(), sort_keys=True).encode()).hexdigest()[:12]
        return cache_root() / "pretrained" / f"clip-{re.sub(r'[^A-Za-z0-9_.-]', '_', s.arch)}-{s.img_size}px-{key}.pt"


def _arch_config(arch: str) -> dict[str, Any]:
    import open_clip

    from raysim.models import clip_tiny

    clip_tiny.register()
    return open_clip.get_model_config(arch) or {}


def check_arch(arch: str) -> int:
    """The patch size of an open_clip ViT `arch` this module can train without a download (one line otherwise)."""
    cfg = _arch_config(arch)
    if not cfg:
        raise ConfigError(f"pretrain arch {arch!r} is not an open_clip architecture (the small CLIP is {TINY_ARCH})")
    text, vision = cfg.get("text_cfg", {}), cfg.get("vision_cfg", {})
    vit = isinstance(vision.get("patch_size"), int) and isinstance(vision.get("layers"), int) and not vision.get("timm_model_name")
    if not vit or text.get("hf_tokenizer_name") or text.get("hf_model_name"):
        raise ConfigError(f"pretrain arch {arch!r}: the CLIP pretraining trains an open_clip ViT with open_clip's own text tower and tokenizer (e.g. {TINY_ARCH}), which {arch} is not")
    return int(vision["patch_size"])


# --- captions ----------------------------------------------------------------------------------


def caption(label: int, attributes: Mapping[str, Any], template: int = 0, class_names: tuple[str, ...] = CLASS_NAMES) -> str:
    """The caption of one image: `TEMPLATES[template]` filled from its label (the source's class
    name) and its patient's age, race and gender (CSV text; "unknown" leaves the word out)."""
    age = attributes.get("age", "")
    words = {
        "label": class_names[int(label)],
        "age": f"{float(age):.0f}" if str(age) not in ("", "unknown", "-1") else "",
        "race": _known(attributes.get("race")),
        "gender": _known(attributes.get("gender")),
    }
    text = TEMPLATES[template].format(**words)
    return " ".join(text.replace(" ,", ",").split())


def _known(value: Any) -> str:
    return "" if value is None or str(value).lower() in ("", "unknown", "-1") else str(value)


# --- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """One split of the pool: uint8 images (N, 1, S, S), labels, and each image's rows' attributes."""

    images: np.ndarray
    labels: np.ndarray
    rows: pd.DataFrame

    def captions(self, template: int) -> list[str]:
        """Every image's caption in `TEMPLATES[template]`."""
        return [caption(y, row, template) for y, row in zip(self.labels, self.rows.to_dict("records"))]


def load_pool(root: Path, img_size: int) -> dict[str, Split]:
    """split -> its images, labels and CSV rows, from the pool's race site CSVs (every patient once)."""
    out = {}
    for split in SPLITS:
        frame = pd.concat([pd.read_csv(root / f"meta_site{k}_race_{split}.csv", dtype=str, keep_default_na=False) for k in range(1, NUM_SITES + 1)], ignore_index=True)
        images, kept = [], []
        for i, filename in enumerate(frame["filename"]):
            with np.load(root / "all" / filename) as data:
                fundus = data["slo_fundus"]
            if fundus.size:
                images.append(resize_chw(fundus, img_size, 1))
                kept.append(i)
        rows = frame.iloc[kept].reset_index(drop=True)
        out[split] = Split(np.stack(images), (rows["glaucoma"] == "yes").to_numpy(np.int64), rows)
    return out


def _pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 1, S, S) -> what a 1-channel run feeds a CLIP host: normalised with the mean of CLIP's
    channel statistics (`backbones.normalization`), repeated to 3 channels (`CLIPClassifier`)."""
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).mean()
    std = torch.tensor(CLIP_STD, dtype=torch.float32).mean()
    x = (torch.from_numpy(images).float().div_(255.0) - mean) / std
    return x.expand(-1, 3, -1, -1)


def _tokens(split: Split, tokenizer: Any) -> torch.Tensor:
    """(templates, N, L) token ids, cut after the longest caption's [EOS] (see `encode_text`)."""
    tokens = torch.stack([tokenizer(split.captions(t)) for t in range(len(TEMPLATES))])
    length = int((tokens != 0).sum(dim=-1).max())
    return tokens[..., :length].contiguous()


# --- the model ----------------------------------------------------------------------------------


def encode_text(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """`model.encode_text` on token ids cut to their first L positions: the same features as on
    the padded 77 (the causal mask keeps each position, and the [EOS] read out, blind to the
    padding after it), at a third of the cost for these short captions."""
    from open_clip.transformer import text_global_pool

    length = tokens.shape[1]
    x = model.token_embedding(tokens) + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = text_global_pool(model.ln_final(x), tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    return x @ model.text_projection if not isinstance(model.text_projection, torch.nn.Linear) else model.text_projection(x)


def build(arch: str, img_size: int, seed: int) -> torch.nn.Module:
    """open_clip's `arch` at `img_size`, initialised from `seed` (the caller's RNG untouched)."""
    import open_clip

    from raysim.models import clip_tiny
    from raysim.models.clip import _quiet_when

    clip_tiny.register()
    with torch.random.fork_rng(devices=[]), _quiet_when(True):
        torch.manual_seed(seed)
        return open_clip.create_model(arch, pretrained=None, force_image_size=img_size)


def _optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW as open_clip trains: weight decay on the weight matrices only (not on gains, biases,
    embeddings or the logit scale)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)


def _lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    """Linear warm-up, then cosine decay to 0 (open_clip's default schedule)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def zero_shot_auc(model: torch.nn.Module, split: Split, tokenizer: Any, class_names: tuple[str, ...] = CLASS_NAMES) -> float:
    """AUC of CLIP's zero-shot classifier (`PROMPT` per class name, as a `clip:` host scores) on `split`."""
    model.eval()
    text = F.normalize(model.encode_text(tokenizer([PROMPT.format(name) for name in class_names])), dim=-1)
    pixels = _pixels(split.images)
    image = torch.cat([F.normalize(model.encode_image(pixels[i : i + 256]), dim=-1) for i in range(0, len(pixels), 256)])
    logits = image @ text.t()
    scores = (logits[:, 1] - logits[:, 0]).numpy()  # the softmax's order
    return float(roc_auc_score(split.labels, scores)) if len(np.unique(split.labels)) == 2 else float("nan")


# --- training ------------------------------------------------------------------------------------


def _batches(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size]
        if len(index) >= 2:  # one image has no negative
            yield index


def _train_epoch(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor], optimizer: torch.optim.Optimizer, s: ClipPretrainSettings, epoch: int, schedule: tuple[int, int], phase: str) -> float:
    """One pass over the training split; returns the mean loss. `schedule`: (steps done, total steps)."""
    import open_clip

    pixels, tokens = data
    loss_fn = open_clip.ClipLoss()
    templates = torch.from_numpy(np.random.default_rng(derive_seed(s.seed, "clip-captions", epoch)).integers(len(TEMPLATES), size=len(pixels)))
    step, total = schedule
    warmup = max(1, min(math.ceil(len(pixels) / s.batch_size), total // 5))
    model.train()
    losses = []
    batches = console.counted(_batches(len(pixels), s.batch_size, derive_seed(s.seed, "clip-order", epoch)), phase, total, start=step)
    for index in batches:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, total, warmup, s.lr)
        image = F.normalize(model.encode_image(pixels[index]), dim=-1)
        text = F.normalize(encode_text(model, tokens[templates[index], index]), dim=-1)
        loss = loss_fn(image, text, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
        losses.append(float(loss.detach()))
        step += 1
    return float(np.mean(losses))


def pretrain(settings: ClipPretrainSettings, out: Path, *, echo: Echo = print) -> dict[str, Any]:
    """Train on the public pool (generated into the cache once) and write `out` + `out.json`.

    Both files are written beside their target and renamed, so a reader never sees half a file.
    Returns the sidecar's content.
    """
    import open_clip

    settings.validate()
    s = settings.resolved()
    started = time.perf_counter()
    kwargs = s.pool_kwargs()
    pool_root = synthetic.ensure_generated(synthetic.cached_root(**kwargs), **kwargs)
    data = load_pool(pool_root, s.img_size)
    train, test = data["train"], data["test"]
    echo(f"pretrain: {s.arch} (CLIP) at {s.img_size} px on the synthetic public pool: {len(train.labels)} captioned train / {len(test.labels)} held-out images ({pool_root})")
    tokenizer = open_clip.get_tokenizer(s.arch)
    history = []
    per_epoch = math.ceil(len(train.labels) / s.batch_size)
    phase, total = f"pretrain: {s.arch} CLIP, batches", s.epochs * per_epoch
    with torch_threads(s.threads):
        model = build(s.arch, s.img_size, s.seed)
        optimizer = _optimizer(model, s.lr)
        tensors = (_pixels(train.images), _tokens(train, tokenizer))
        for epoch in range(1, s.epochs + 1):
            tick = time.perf_counter()
            loss = _train_epoch(model, tensors, optimizer, s, epoch, ((epoch - 1) * per_epoch, total), phase)
            auc = zero_shot_auc(model, test, tokenizer)
            history.append({"epoch": epoch, "train_loss": round(loss, 6), "zero_shot_auc": round(auc, 6), "logit_scale": round(float(model.logit_scale.detach().exp()), 4)})
            echo(f"pretrain: epoch {epoch}/{s.epochs} | contrastive loss {loss:.4f} | held-out zero-shot AUC {100 * auc:.1f} (\"{PROMPT.format('<class>')}\") | {time.perf_counter() - tick:.1f} s")
    console.report(phase, total, total)  # a skipped single-image batch would leave the bar short
    meta = {
        "created_by": "raysim.pretrain",
        **s.key_dict(),
        "pool_root": str(pool_root),
        "pool_sizes": {"train": len(train.labels), "test": len(test.labels)},
        "zero_shot_prompt": PROMPT,
        "example_captions": train.captions(0)[:3],
        "history": history,
        "final": history[-1],
        "seconds": round(time.perf_counter() - started, 1),
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
    }
    write_checkpoint(out, model, meta)
    return meta


# --- what runs use -------------------------------------------------------------------------------


def is_tiny(model_name: str) -> bool:
    """True for the small CLIP this module builds (`clip:RaySim-Tiny-ViT`)."""
    return model_name == f"{PREFIX}{TINY_ARCH}"


def ensure_clip_pretrained(model_cfg: ModelConfig, *, echo: Echo = print, **settings: Any) -> Path:
    """The cached small CLIP for `model_cfg`'s architecture and image size, built once if missing.

    `settings` override `ClipPretrainSettings` fields (patients, epochs, seed, lr, ...); every
    field is part of the cache key, so another setting is another file.
    """
    s = ClipPretrainSettings(arch=model_cfg.name.removeprefix(PREFIX), img_size=model_cfg.img_size, **settings)
    s.validate()
    path = s.cache_path()

    def build() -> None:
        echo(f"pretrain: no cached {s.resolved().arch} CLIP at {s.img_size} px; building it once (python -m raysim.pretrain --clip)")
        pretrain(s, path, echo=echo)

    return ensure_built(path, build)


def pool_of_checkpoint(path: Path) -> Pool:
    """The pool a checkpoint of this module was trained on (its sidecar), as FedHelp's checks see a set."""
    from raysim.datasets.pools import Pool

    meta = json.loads(Path(f"{path}.json").read_text())
    label = f"the synthetic public population, {meta['pool']['patients']} patients, generator seed {meta['pool']['seed']}"
    return Pool(label, Path(meta["pool_root"]).resolve(), meta["pool"])


def check_disjoint(pool: Pool, clients: Pool) -> None:
    """The small CLIP's training pool shares no sample with the clients' data (both
    `fedhelp_public.Pool`s), compared as FedHelp compares its public set with the clients:

    - the same directory (data.root is the pool's folder);
    - the same generated population (both the synthetic public population with one generator
      seed: the same patients, even in another folder or at another size);
    - any sample file of both (paths resolved through links);
    - and a file name of both whose bytes are equal (the pool's files copied into the clients' folder).
    A client folder of other patients that happens to reuse a name (another seed's `public_00001.npz`)
    differs in its bytes and passes."""
    from raysim.datasets.pools import overlap

    reason = overlap(pool, clients) or _copied(pool, clients)
    if reason:
        raise ConfigError(f"the small CLIP's training pool ({pool.label}) overlaps the clients' data ({clients.label}): {reason}; the CLIP must be trained outside the clients: choose other data, or pass model.weights=PATH")


def _copied(pool: Pool, clients: Pool) -> str | None:
    if pool.root is None or clients.root is None:
        return None
    ours = {p.name: p for p in (pool.root / "all").glob("*.npz")}
    same = sorted(p.name for p in (clients.root / "all").glob("*.npz") if p.name in ours and p.read_bytes() == ours[p.name].read_bytes())
    return f"{len(same)} sample files are copies of the pool's (e.g. {same[0]})" if same else None


def check_clients(path: Path, cfg: ExperimentConfig) -> None:
    """`check_disjoint` of the checkpoint's pool and the run's data (`cfg.data`)."""
    from raysim.datasets import DATASETS
    from raysim.datasets.pools import pool_of

    source = DATASETS.get(cfg.data.name)(cfg.data, img_size=cfg.model.img_size, seed=cfg.seed)
    check_disjoint(pool_of_checkpoint(path), pool_of(source, f"{source.name}, the run's data"))
