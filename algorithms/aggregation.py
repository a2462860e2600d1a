"""Pure aggregation helpers: tensors and weights in, tensors out, input checked first."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


class AggregationError(ValueError):
    """Client updates cannot be combined; the message says which client and tensor."""


def validate_updates(tensors: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], names: Sequence[str]) -> None:
    if not tensors:
        raise AggregationError("no client updates to aggregate")
    if len(tensors) != len(weights) or len(tensors) != len(names):
        raise AggregationError(f"{len(tensors)} updates but {len(weights)} weights and {len(names)} names")
    reference = tensors[0]
    for name, update, weight in zip(names, tensors, weights):
        if not weight > 0:
            raise AggregationError(f"client {name}: weight must be positive, got {weight}")
        if update.keys() != reference.keys():
            diff = sorted(set(update) ^ set(reference))
            raise AggregationError(f"client {name}: tensor names differ from client {names[0]}: {diff[:5]}")
        for key, value in update.items():
            if value.shape != reference[key].shape:
                raise AggregationError(f"client {name}: {key} has shape {tuple(value.shape)}, expected {tuple(reference[key].shape)}")


def non_finite(update: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of tensors holding NaN or Inf."""
    return [k for k, v in update.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def weighted_average(tensors: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Σ_k w_k t_k / Σ_k w_k per tensor name, summed in the given (sorted) order for bit-stability.

    Integer tensors (e.g. BatchNorm's batch counters) take the weighted mean rounded down.
    """
    names = list(names) if names is not None else [str(i) for i in range(len(tensors))]
    validate_updates(tensors, weights, names)
    total = float(sum(weights))
    out: dict[str, torch.Tensor] = {}
    for key, first in tensors[0].items():
        acc = torch.zeros_like(first, dtype=torch.float64)
        for update, weight in zip(tensors, weights):
            acc += update[key].to(torch.float64) * (weight / total)
        out[key] = acc.to(first.dtype) if first.is_floating_point() else acc.floor().to(first.dtype)
    return out
