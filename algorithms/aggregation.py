"""Pure aggregation helpers: tensors and weights in, tensors out, input checked first.

`WeightedSum` is the running form the engine folds updates into, one at a time in sorted
client order, so the server holds one accumulator whatever the cohort size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from raysim.types import Update


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
    """Names of tensors holding NaN or Inf.

    A sum is finite when every element is (NaN and Inf propagate) and costs a tenth of an
    element-wise check; only a non-finite sum (which a float32 overflow of huge finite values
    could also give) is confirmed element by element, so the answer is exact.
    """
    return [k for k, v in update.items() if v.is_floating_point() and not torch.isfinite(v.sum()) and not torch.isfinite(v).all()]


def weighted_average(tensors: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Σ_k w_k t_k / Σ_k w_k per tensor name: `WeightedSum` over a list, in the given (sorted) order.

    Integer tensors (e.g. BatchNorm's batch counters) take the weighted mean rounded down.
    """
    names = list(names) if names is not None else [str(i) for i in range(len(tensors))]
    validate_updates(tensors, weights, names)
    acc = WeightedSum()
    for update, weight, name in zip(tensors, weights, names):
        acc.add(update, weight, name)
    return acc.mean()


class WeightedSum:
    """Σ_k w_k t_k per tensor name in float64 and Σ_k w_k, added one update at a time.

    The engine adds updates in sorted client-id order, whichever actor computed them, so the
    float64 rounding (and hence every bit of `mean()`) depends only on the cohort. Memory: one
    float64 copy of the summed tensors, whatever the number of updates. `keys` restricts what
    is summed (e.g. the buffers of a method whose parameters take another rule). `device`: where
    the sums live (`resources.gpu_fold`: the driver's GPU); `mean()` comes back on the CPU.
    """

    def __init__(self, keys: Sequence[str] | None = None, device: torch.device | None = None) -> None:
        self.keys = list(keys) if keys is not None else None
        self.device = device or torch.device("cpu")
        self.sums: dict[str, torch.Tensor] = {}
        self.reference: dict[str, tuple[torch.Size, torch.dtype]] = {}
        self.first = ""  # the first client's name, for error messages
        self.total = 0.0
        self.count = 0

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float, name: str) -> None:
        if not weight > 0:
            raise AggregationError(f"client {name}: weight must be positive, got {weight}")
        chosen = {k: tensors[k] for k in self.keys if k in tensors} if self.keys is not None else dict(tensors)
        if not self.count:
            self.first = name
            self.reference = {k: (v.shape, v.dtype) for k, v in chosen.items()}
            self.sums = {k: torch.zeros(v.shape, dtype=torch.float64, device=self.device) for k, v in chosen.items()}
        self._check(chosen, name)
        for key, value in chosen.items():
            self.sums[key].add_(value.to(self.device, torch.float64), alpha=weight)
        self.total += float(weight)
        self.count += 1

    def _check(self, tensors: Mapping[str, torch.Tensor], name: str) -> None:
        if tensors.keys() != self.reference.keys():
            diff = sorted(set(tensors) ^ set(self.reference))
            raise AggregationError(f"client {name}: tensor names differ from client {self.first}: {diff[:5]}")
        for key, value in tensors.items():
            if value.shape != self.reference[key][0]:
                raise AggregationError(f"client {name}: {key} has shape {tuple(value.shape)}, expected {tuple(self.reference[key][0])}")

    def mean(self) -> dict[str, torch.Tensor]:
        """Σ w t / Σ w in each tensor's own dtype; integer tensors take the weighted mean rounded down."""
        if not self.count:
            raise AggregationError("no client updates to aggregate")
        out: dict[str, torch.Tensor] = {}
        for key, acc in self.sums.items():
            dtype = self.reference[key][1]
            value = acc / self.total
            # + 1e-9: a mean of equal counts must not round down to one less through float64 sums
            out[key] = (value.to(dtype) if dtype.is_floating_point else (value + 1e-9).floor().to(dtype)).cpu()
        return out


def check_against(weights: Mapping[str, torch.Tensor], update: Update) -> None:
    """The update carries exactly the server's tensors, each of its shape (server-step folds)."""
    if update.tensors.keys() != weights.keys():
        diff = sorted(set(update.tensors) ^ set(weights))
        raise AggregationError(f"client {update.client_id}: tensor names differ from the server's weights: {diff[:5]}")
    for key, value in update.tensors.items():
        if value.shape != weights[key].shape:
            raise AggregationError(f"client {update.client_id}: {key} has shape {tuple(value.shape)}, expected {tuple(weights[key].shape)}")
