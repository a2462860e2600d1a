"""FedHelp's public set D_pub: where it comes from, the checks that keep it public, loading it.

specs/fedhelp.md: D_pub shares no sample with any client (carving it out of their rows would
move private images between hospitals) and none with the foundation model's training pool
(its soft targets would be in-sample). `algorithm.public` says where D_pub comes from:

- null (the default; synthetic and fairfedmed_oph data only) or `{population: public,
  patients: 500, generator_seed: 1}`: the synthetic generator's public population (own
  patients, scanner styles and `public_*.npz` files), generated once into the cache. Its
  generator seed `PUBLIC_SEED` (1) differs from the seed `raysim.pretrain` draws the
  foundation model's pool with (`PretrainSettings.seed`, 0), so the two share no patient.
- `{name: SOURCE, root: DIR, ...}`: any registered data source; the other keys are that
  source's `data.*` keys (attribute, modality, flag, ...). D_pub is the training split on
  disk of every one of its clients (raysim's train and val rows, so that which images are
  public does not depend on the run's seed); its test rows stay out.
- `{site: ID}`: a client of the run's own data, held out: it is no client of the run, and
  all its rows (train, val, test) are D_pub.

Labels are never read: D_pub is unlabelled; only its images reach the foundation model and
the small clients. The driver loads D_pub once for the foundation model; every actor loads
it itself from its source (`PublicSet.load`), so no image travels between clients.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from raysim.config import ConfigError, DataConfig, from_dict
from raysim.datasets import DATASETS, synthetic
from raysim.datasets.base import ClientSpec, DataSource, SampleTable, Shard
from raysim.datasets.cache import load_shards
from raysim.datasets.pools import Pool, overlap, pool_of  # noqa: F401  (FedHelp's public set and the small CLIP share them)

PUBLIC_SEED = 1  # generator seed of the default D_pub; raysim.pretrain's pool uses 0
PUBLIC_PATIENTS = 500  # about 390 images in its training split: a few hundred, quick at 32 px
FUNDUS_SIZE = 128  # rendered as the clinical set is (the generator's default), then resized like it
POPULATION_KEYS = ("population", "patients", "generator_seed")
BUILT_IN_SOURCES = ("synthetic", "fairfedmed_oph")  # the synthetic glaucoma task the default fits
FORMS = "{population: public, patients: N, generator_seed: S}, {name: SOURCE, root: DIR, ...} or {site: ID}"


@dataclass(frozen=True)
class PublicSet:
    """Where D_pub's images are: light and picklable, sent to every actor in the run context."""

    description: str
    data: DataConfig | None  # its source's config; None: the run's own source (a held-out site)
    parts: tuple[tuple[ClientSpec, str], ...]  # (client, split) pairs, pooled in this order
    pool: Pool

    def source(self, run_source: DataSource) -> DataSource:
        if self.data is None:
            return run_source
        return DATASETS.get(self.data.name)(self.data, img_size=run_source.img_size, seed=run_source.seed)

    def load(self, run_source: DataSource) -> tuple[Shard, np.ndarray]:
        """The pooled images (after the source's drop rules) as one shard, and their sample ids."""
        source = self.source(run_source)
        shards = load_shards(source, self.parts)
        ids = [f"{spec.id}/{split}/{sid}" for (spec, split), shard in zip(self.parts, shards) for sid in shard.table.sample_ids]
        table = SampleTable.concat([s.table for s in shards])
        return Shard(np.concatenate([s.images for s in shards]), table), np.asarray(ids, dtype=str)


# --- the option ------------------------------------------------------------------------------


def check_option(public: Any) -> None:
    """`algorithm.public`'s form and keys (no IO: the data is read in the driver)."""
    if public is None:
        return
    if not isinstance(public, Mapping):
        raise ValueError(f"algorithm.public must be null or one of {FORMS}; got {public!r}")
    if "site" in public:
        if set(public) != {"site"} or not isinstance(public["site"], str):
            raise ValueError(f"algorithm.public: a held-out site is {{site: ID}} alone, ID a client id such as site3; got {dict(public)}")
    elif "name" in public:
        data_config(public, cache=True)
    else:
        unknown = sorted(set(public) - set(POPULATION_KEYS))
        if unknown:
            raise ValueError(f"algorithm.public: unknown key(s) {', '.join(unknown)}; expected {FORMS}")
        if public.get("population", "public") != "public":
            raise ValueError(f"algorithm.public.population must be 'public' (the clinical population is the clients' own); got {public['population']!r}")
        synthetic.generator_params(**population_kwargs(public))


def population_kwargs(public: Mapping[str, Any]) -> dict[str, Any]:
    """The synthetic generator's arguments for the public-population form."""
    return {
        "population": "public",
        "patients": public.get("patients", PUBLIC_PATIENTS),
        "seed": public.get("generator_seed", PUBLIC_SEED),
        "fundus_size": FUNDUS_SIZE,
        "oct_shape": (4, 4, 4),  # FedHelp is 2D: the smallest OCT the generator allows
        "empty_fraction": 0.0,
    }


def data_config(public: Mapping[str, Any], *, cache: bool) -> DataConfig:
    """The public source's `data.*` config; rows are kept whatever their attributes (unlabelled use)."""
    valid = [f.name for f in fields(DataConfig)]
    unknown = sorted(set(public) - set(valid))
    if unknown:
        raise ConfigError(f"algorithm.public: unknown key(s) {', '.join(unknown)} for a data source; valid keys: {', '.join(valid)}")
    try:
        return from_dict({"data": {"keep_unknown": True, "cache": cache, **public}}).data
    except ConfigError as err:
        raise ConfigError(f"algorithm.public: {err}") from err


def hold_out_site(public: Any, specs: list[ClientSpec]) -> tuple[list[ClientSpec], ClientSpec | None]:
    """(the run's clients, the held-out site or None): with {site: ID} that client leaves the run."""
    if not (isinstance(public, Mapping) and "site" in public):
        return specs, None
    site = public["site"]
    held = [s for s in specs if s.id == site]
    if not held:
        raise ConfigError(f"algorithm.public.site={site!r} is not a client of this data; its clients: {', '.join(s.id for s in specs)}")
    return [s for s in specs if s.id != site], held[0]


# --- resolving it (driver) -------------------------------------------------------------------


def resolve(public: Any, run_source: DataSource, held_out: ClientSpec | None) -> PublicSet:
    """D_pub for this run: its rows (metadata only, images stay on disk) and where they live."""
    if isinstance(public, Mapping) and "site" in public:
        if held_out is None:
            raise RuntimeError("FedHelp: arrange_clients must hold the public site out before prepare_run")
        label = f"site {held_out.id} of {run_source.name}, held out of the run"
        return PublicSet(label, None, tuple((held_out, split) for split in held_out.splits), pool_of(run_source, label))
    if public is None and run_source.name not in BUILT_IN_SOURCES:
        raise ConfigError(f"algorithm.public: the default public set (synthetic fundus images) fits the synthetic glaucoma task only, not {run_source.name}; give {FORMS}")
    if public is None or "name" not in public:
        kwargs = population_kwargs(public or {})
        root = synthetic.ensure_generated(synthetic.cached_root(**kwargs), **kwargs)
        data = data_config({"name": "fairfedmed_oph", "root": str(root)}, cache=run_source.cfg.cache)
        label = f"the synthetic public population, {kwargs['patients']} patients, generator seed {kwargs['seed']}"
    else:
        data = data_config(public, cache=run_source.cfg.cache)
        label = f"{data.name} at {data.root}"
    source = DATASETS.get(data.name)(data, img_size=run_source.img_size, seed=run_source.seed)
    if source.channels != run_source.channels or source.volume_slices:
        raise ConfigError(f"algorithm.public: {data.name} gives {source.channels}-channel {'volumes' if source.volume_slices else 'images'}; the run's {run_source.name} data has {run_source.channels}-channel 2D images, and the small model sees both")
    parts = tuple((spec, split) for spec in source.client_specs() for split in ("train", "val") if len(spec.splits.get(split, ())))
    return PublicSet(label, data, parts, pool_of(source, label))


def foundation_pool(options: Mapping[str, Any], img_size: int) -> Pool | None:
    """What the foundation model was trained on, where raysim knows: the built-in backbone's pool,
    or the pool named by a `raysim.pretrain` sidecar (`<weights>.json`); None otherwise."""
    if options.get("backend") != "timm":
        return None
    weights = options.get("weights")
    if weights is None:
        from raysim.client.pretraining import PretrainSettings

        kwargs = PretrainSettings(model=options.get("model", "resnet50"), img_size=img_size).pool_kwargs()
        label = f"raysim.pretrain's pool for the built-in foundation model: the synthetic public population, generator seed {kwargs['seed']}"
        return Pool(label, synthetic.cached_root(**kwargs), synthetic.generator_params(**kwargs))
    sidecar = Path(f"{Path(weights).expanduser()}.json")
    meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    if meta.get("created_by") != "raysim.pretrain":
        return None
    params = meta.get("pool") or {}
    label = f"the pool raysim.pretrain trained {weights} on: the synthetic {params.get('population', 'clinical')} population, generator seed {params.get('seed')}"
    return Pool(label, Path(meta["pool_root"]).resolve() if meta.get("pool_root") else None, params or None)


def check_disjoint(public: PublicSet, clients: Pool | None, foundation: Pool | None) -> None:
    """D_pub shares no sample with the clients or with the foundation model's training pool."""
    if clients is not None and (reason := overlap(public.pool, clients)):
        raise ConfigError(f"algorithm.public ({public.pool.label}) overlaps the clients' data ({clients.label}): {reason}; D_pub must come from outside the clients (hold a whole client out with {{site: ID}})")
    if foundation is not None and (reason := overlap(public.pool, foundation)):
        raise ConfigError(
            f"algorithm.public ({public.pool.label}) overlaps the foundation model's training pool ({foundation.label}): {reason}; "
            "in-sample soft targets are forbidden: choose another algorithm.public (e.g. another generator_seed)"
        )
