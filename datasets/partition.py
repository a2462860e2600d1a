"""Synthetic client splits for sources without natural sites (plain numpy).

Every partitioner has the signature ``(labels, *, num_clients, alpha, ratios, rng)`` and
returns one sorted int64 index array per client: disjoint, together covering every sample,
none empty. The same ``rng`` seed gives the same partition. Impossible requests (more
clients than samples, a share too small for one sample) raise ``ValueError`` saying what to
change; nothing here retries or loops without a bound.

- ``dirichlet``: label skew; for each class, client shares ~ Dirichlet(alpha). Clients left
  empty by the draw get one sample each from the then-largest client.
- ``quantity``: quantity skew; a random permutation cut by the cumulative ``ratios``
  (one share per client; ``num_clients`` must equal ``len(ratios)``).
- ``iid``: a random permutation cut into near-equal parts.

``split_pool`` splits a pooled set (a train and a test split) the way every site-less source
does: the train rows by ``data.partition``, the test rows IID over the same clients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from raysim import seeding

if TYPE_CHECKING:
    from raysim.config import DataConfig

Partitioner = Callable[..., list[np.ndarray]]
DEFAULT = "dirichlet"


def _check_count(n: int, num_clients: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")
    if num_clients > n:
        raise ValueError(f"cannot split {n} samples into {num_clients} non-empty clients; use at most {n} clients")


def _parts(assignment: np.ndarray, num_clients: int) -> list[np.ndarray]:
    return [np.flatnonzero(assignment == k).astype(np.int64) for k in range(num_clients)]


def dirichlet(labels: np.ndarray, *, num_clients: int, alpha: float, ratios: Sequence[float] | None = None, rng: np.random.Generator) -> list[np.ndarray]:
    """Label skew: each class is spread over the clients by shares drawn from Dirichlet(alpha)."""
    labels = np.asarray(labels)
    _check_count(len(labels), num_clients)
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    assignment = np.empty(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(num_clients, float(alpha)))
        if not np.isfinite(shares).all() or shares.sum() <= 0:  # underflow at tiny alpha: all to one client
            shares = np.eye(num_clients)[rng.integers(num_clients)]
        cuts = np.clip(np.round(np.cumsum(shares)[:-1] * len(members)).astype(np.int64), 0, len(members))
        for client, chunk in enumerate(np.split(members, cuts)):
            assignment[chunk] = client
    # Deterministic repair, at most num_clients moves: since n >= num_clients, the largest
    # client holds at least two samples whenever another client is empty.
    sizes = np.bincount(assignment, minlength=num_clients)
    for empty in np.flatnonzero(sizes == 0):
        donor = int(np.argmax(sizes))
        moved = rng.choice(np.flatnonzero(assignment == donor))
        assignment[moved] = empty
        sizes[donor] -= 1
        sizes[empty] += 1
    return _parts(assignment, num_clients)


def quantity(labels: np.ndarray, *, num_clients: int | None, alpha: float = 0.0, ratios: Sequence[float] | None, rng: np.random.Generator) -> list[np.ndarray]:
    """Quantity skew: client k gets about ``ratios[k]`` of the samples (shares are normalised)."""
    if not ratios:
        raise ValueError("the quantity partition needs ratios: one positive share per client, e.g. [0.6, 0.2, 0.08, 0.06, 0.04, 0.02]")
    shares = np.asarray(ratios, dtype=np.float64)
    if shares.ndim != 1 or not np.isfinite(shares).all() or (shares <= 0).any():
        raise ValueError(f"ratios must be positive finite shares, got {list(ratios)}")
    if num_clients is not None and num_clients != len(shares):
        raise ValueError(f"num_clients={num_clients} but ratios has {len(shares)} shares {list(ratios)}; set num_clients to {len(shares)}")
    n = len(labels)
    _check_count(n, len(shares))
    cuts = np.round(np.cumsum(shares)[:-1] / shares.sum() * n).astype(np.int64)
    parts = np.split(rng.permutation(n), cuts)
    for client, part in enumerate(parts):
        if len(part) == 0:
            raise ValueError(f"ratio {ratios[client]} of client {client} gives it no sample out of {n}; raise that share or use fewer clients")
    return [np.sort(part).astype(np.int64) for part in parts]


def iid(labels: np.ndarray, *, num_clients: int, alpha: float = 0.0, ratios: Sequence[float] | None = None, rng: np.random.Generator) -> list[np.ndarray]:
    """A random permutation split into ``num_clients`` parts whose sizes differ by at most one."""
    n = len(labels)
    _check_count(n, num_clients)
    return [np.sort(part).astype(np.int64) for part in np.array_split(rng.permutation(n), num_clients)]


PARTITIONERS: dict[str, Partitioner] = {"dirichlet": dirichlet, "quantity": quantity, "iid": iid}


DEFAULT_CLIENTS = 3


def partition(labels: np.ndarray, cfg: DataConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """Split sample indices into clients by ``cfg.partition`` (null: dirichlet)."""
    name = cfg.partition or DEFAULT
    if name not in PARTITIONERS:
        raise ValueError(f"unknown partition {name!r}; choose one of: {', '.join(PARTITIONERS)}")
    num_clients = cfg.num_clients
    if num_clients is None:  # quantity skew: one client per share; otherwise three
        num_clients = len(cfg.ratios) if name == "quantity" and cfg.ratios else DEFAULT_CLIENTS
    return PARTITIONERS[name](np.asarray(labels), num_clients=num_clients, alpha=cfg.alpha, ratios=cfg.ratios, rng=rng)


def split_pool(train_labels: np.ndarray, num_test: int, cfg: DataConfig, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) indices per client: the train rows by ``cfg.partition``, seeded by ``(seed, "partition")``;
    the ``num_test`` test rows IID over the same clients, seeded by ``(seed, "partition", "test")``."""
    train_parts = partition(train_labels, cfg, seeding.rng(seed, "partition"))
    test_parts = iid(np.zeros(num_test), num_clients=len(train_parts), rng=seeding.rng(seed, "partition", "test"))
    return list(zip(train_parts, test_parts))
