"""The one local training loop; methods customise it through hooks, never by copying it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

import raysim.client.precision as precision
from raysim.config import FederationConfig
from raysim.models.adapters import use_groups
from raysim.models.backbones import train_mode
from raysim.models.kinds import JointOutput


@dataclass
class Batch:
    x: torch.Tensor  # normalised float images (B, C, H, W)
    y: torch.Tensor  # int64 labels
    groups: dict[str, torch.Tensor]  # attribute -> int64 codes, -1 unknown
    index: torch.Tensor  # positions in the client's split (for per-sample state)
    group: torch.Tensor | None = None  # codes of the target attribute (FairLoRA's group), -1 unknown
    mask: torch.Tensor | None = None  # segmentation: int64 class per pixel (B, H, W); None when classifying


LossFn = Callable[[nn.Module, Batch], torch.Tensor]
StepHook = Callable[[nn.Module], None]

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, f: torch.optim.SGD(params, lr=f.lr, momentum=f.momentum, weight_decay=f.weight_decay),
    "adam": lambda params, f: torch.optim.Adam(params, lr=f.lr, weight_decay=f.weight_decay),
    "adamw": lambda params, f: torch.optim.AdamW(params, lr=f.lr, weight_decay=f.weight_decay),
}


def make_optimizer(model: nn.Module, fed: FederationConfig) -> torch.optim.Optimizer:
    """A fresh optimizer over the trainable parameters (state never crosses rounds or clients)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return OPTIMIZERS[fed.optimizer](params, fed)


@contextmanager
def only_trainable(model: nn.Module, *, frozen: set[str]) -> Iterator[None]:
    """Parameters named in `frozen` do not train inside the block (requires_grad off, so the
    optimizer never sees them); each gets its own flag back afterwards. The model object is
    shared by an actor's clients: nothing of one client's round leaks into the next."""
    params = [p for name, p in model.named_parameters() if name in frozen and p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Logits of a batch; group-conditioned layers (FairLoRA) see the batch's group codes."""
    use_groups(model, batch.group)
    return model(batch.x)


def cross_entropy(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The task's supervised loss of a batch (`supervised_loss` of the model's logits)."""
    return supervised_loss(forward(model, batch), batch)


def supervised_loss(logits: torch.Tensor | JointOutput, batch: Batch) -> torch.Tensor:
    """Cross-entropy of the labels; for a batch with masks, `segmentation_loss` of the masks; for
    a joint model's output, the sum of the two (equal weights, as IMO's joint objective sums its
    segmentation and classification terms)."""
    if isinstance(logits, JointOutput):
        return segmentation_loss(logits.masks, _masks_of(batch)) + nn.functional.cross_entropy(logits.grade, batch.y)
    if batch.mask is not None:
        return segmentation_loss(logits, batch.mask)
    return nn.functional.cross_entropy(logits, batch.y)


def _masks_of(batch: Batch) -> torch.Tensor:
    if batch.mask is None:
        raise ValueError("a joint model's batch needs masks (the client loads them for the joint task)")
    return batch.mask


def segmentation_loss(logits: torch.Tensor, mask: torch.Tensor, *, smooth: float = 1.0) -> torch.Tensor:
    """Per-pixel cross-entropy plus soft Dice loss, the multi-class form of FedHelp's BCE + Dice.

    ``CE + (1 - mean_c Dice_c)``: CE is the mean over all pixels of the batch; the soft Dice of
    class c is ``(2 * sum(p_c * t_c) + s) / (sum(p_c) + sum(t_c) + s)`` with p the softmax
    probabilities, t the one-hot mask, sums over the whole batch's pixels and ``s = smooth``
    (1: a class absent from both gets Dice 1), averaged over the foreground classes
    (1.. C-1: disc rim and cup; the background's Dice would only dilute them).
    """
    ce = nn.functional.cross_entropy(logits, mask)
    probs = torch.softmax(logits.float(), dim=1)
    onehot = nn.functional.one_hot(mask, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)[1:]
    total = (probs.sum(dims) + onehot.sum(dims))[1:]
    dice = (2 * inter + smooth) / (total + smooth)
    return ce + (1 - dice.mean())


def train_epochs(
    model: nn.Module,
    epochs: Iterable[Iterable[Batch]],
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn = cross_entropy,
    after_step: StepHook | None = None,
) -> dict[str, float]:
    """Run the local epochs; returns the mean training loss and the number of steps. Under
    `federation.precision=fp16` the gradients go through a fresh scaler (`precision.grad_scaler`)."""
    train_mode(model)
    scaler = precision.grad_scaler()
    total, steps = 0.0, 0
    for batches in epochs:
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"local training loss became {loss.item()} at step {steps}")
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)  # skipped when a gradient overflowed; the scale then shrinks
                scaler.update()
            if after_step is not None:
                after_step(model)
            total += loss.item()
            steps += 1
    return {"loss": total / max(steps, 1), "steps": float(steps)}


def full_gradient(model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn = cross_entropy) -> tuple[float, dict[str, torch.Tensor]]:
    """Mean loss over all `batches` and its gradient (name -> tensor) for the trainable parameters.

    No optimizer step: the model's parameters are unchanged. It runs in training mode, like the
    first local epoch would (BatchNorm normalises by batch statistics and updates its running
    statistics); each batch's mean loss is weighted by its size, so the result is the gradient
    of the mean loss over every sample the batches hold.
    """
    train_mode(model)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for p in params.values():
        p.grad = None
    if precision.grad_scaler() is not None:
        return _full_gradient_fp16(model, params, batches, loss_fn)
    total, count = 0.0, 0
    for batch in batches:
        loss = loss_fn(model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at the received model")
        (loss * len(batch.y)).backward()  # sum over the batch's samples; divided by the count below
        total += loss.item() * len(batch.y)
        count += len(batch.y)
    if count == 0:
        raise ValueError("full_gradient needs at least one batch")
    grads = {name: (p.grad / count if p.grad is not None else torch.zeros_like(p)).detach() for name, p in params.items()}
    for p in params.values():
        p.grad = None
    return total / count, grads


def _full_gradient_fp16(model: nn.Module, params: dict[str, nn.Parameter], batches: Iterable[Batch], loss_fn: LossFn) -> tuple[float, dict[str, torch.Tensor]]:
    """`full_gradient` under fp16: each batch's mean loss scaled before backward (as
    GradScaler's initial scale) and its gradient unscaled into a float32 sum weighted by the
    batch's size; a batch whose gradient overflowed is done again at half the scale (its
    BatchNorm statistics then move twice, as they would in a second pass)."""
    scale = 2.0**16  # torch.amp.GradScaler's initial scale
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    total, count = 0.0, 0
    for batch in batches:
        while True:
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at the received model")
            (loss * scale).backward()
            grads = {name: p.grad for name, p in params.items() if p.grad is not None}
            for p in params.values():
                p.grad = None
            if all(torch.isfinite(g).all() for g in grads.values()):
                break
            scale /= 2
            if scale < 1:
                raise FloatingPointError("the full gradient overflows in fp16 even unscaled (federation.precision=fp16); use bf16 or fp32")
        for name, g in grads.items():
            sums[name].add_(g.float(), alpha=len(batch.y) / scale)
        total += loss.item() * len(batch.y)
        count += len(batch.y)
    if count == 0:
        raise ValueError("full_gradient needs at least one batch")
    return total / count, {name: (s / count).to(params[name].dtype) for name, s in sums.items()}
