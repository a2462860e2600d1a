"""Mixed precision for the client side (`federation.precision`: fp32, bf16 or fp16).

- **fp32** (the default) changes nothing: no autocast, no scaler, every result bit-identical
  to a run made before the key existed.
- **bf16 / fp16**: each client call of a client actor (fit, statistics, evaluation) runs under
  `torch.autocast` on the actor's device, so convolutions and matrix products compute in the
  lower precision while autocast keeps reductions, normalisation and losses in float32 (its
  op lists). Parameters, optimizer state and every tensor a client sends stay float32; the
  server's fold stays float64; evaluation scores are cast back to float32 before any metric.
- **fp16** adds a gradient scaler (`torch.amp.GradScaler`) to the local training loop (and to
  q-FFL's full gradient), made fresh for every local training call like the optimizer, so a
  step skipped for an overflow is part of that call only and the result stays a function of
  the config and seed. bf16 has float32's range and needs none.

Server-side training (FedBM's generator, in the driver) runs in float32 whatever the key says.
Results under bf16 / fp16 are repeatable run to run on the same machine (the same kernels),
but not equal to fp32's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

_active: tuple[torch.device, str] | None = None  # the device and precision of the client call under way


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """The block (one client call) in `precision` on `device`; fp32: nothing changes."""
    global _active
    dtype = DTYPES[precision]
    if dtype is None:
        yield
        return
    before, _active = _active, (device, precision)
    try:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield
    finally:
        _active = before


def grad_scaler() -> torch.amp.GradScaler | None:
    """A fresh gradient scaler for one local training call under fp16; None otherwise."""
    if _active is None or _active[1] != "fp16":
        return None
    return torch.amp.GradScaler(_active[0].type)


def as_float(output: object) -> object:
    """Model outputs (a tensor, or a tuple of them such as a joint model's) as float32: what the
    task's scores and the metrics are computed from, whatever precision the forward pass used."""
    if isinstance(output, torch.Tensor):
        return output.float() if output.is_floating_point() else output
    if isinstance(output, tuple):
        return type(output)(*(as_float(part) for part in output)) if hasattr(output, "_fields") else tuple(as_float(part) for part in output)
    return output
