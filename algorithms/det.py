"""DET, Deputy-Enhanced Transfer, with PFA: PRR-FL (Chen et al., "Personalized Retrogress-Resilient
Framework for Real-World Medical Federated Learning", MICCAI 2021; official code
CityU-AIM-Group/PRR-FL, `local_train.py`).

Each client holds a personal model P (never sent; `client.memory`) and a deputy D, the model it
exchanges. The deputy is aggregated by PFA (`raysim.algorithms.pfa`): it is the client's "own
model" there (its amplitude boxes go up, the mean boxes come back into it), as in PRR-FL. Both
start from the initial model. In a round, before each local epoch, the client measures the
macro-F1 on its training split (eval mode) of both models, F_p and F_d, and picks a stage:

- first epoch of the round, or F_d < α1·F_p: **Recover**, D learns from P;
- else, coming from Recover, or F_d < α2·F_p: **Exchange**, each learns from the other;
- else (F_d >= α2·F_p after an Exchange or Sublimate epoch): **Sublimate**, P learns from D.

Both models train on every batch: P on CE(P) (+ KL(D‖P) in Exchange / Sublimate), D on CE(D)
(+ KL(P‖D) in Recover / Exchange), where KL(T‖S) = KL(softmax(T) ‖ softmax(S)) with the teacher's
logits detached, temperature 1, weight 1, averaged over the batch. With one local epoch
(`federation.local_epochs` = 1, raysim's default) every round is Exchange, as in the official code
(the stage would never leave Recover); the paper trains 5 local epochs. Clients are scored with P.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raysim.algorithms.base import register_algorithm
from raysim.algorithms.pfa import PFA, PFAParams
from raysim.client.client import EVAL_BATCH
from raysim.client.training import Batch, forward, make_optimizer, train_epochs
from raysim.models.backbones import train_mode
from raysim.types import Tensors, Update

if TYPE_CHECKING:
    from raysim.client.client import Client
    from raysim.config import ExperimentConfig

PERSONAL = "det_personal"  # client.memory key of the personal model's full state dict
RECOVER, EXCHANGE, SUBLIMATE = 1, 2, 3  # the official code's DET_stage values (0: a round's start)


@dataclass
class DETParams(PFAParams):
    alpha1: float = 0.7  # below α1·F_p the deputy recovers from the personal model (paper and official code: 0.7)
    alpha2: float = 0.9  # from α2·F_p on the personal model learns from the deputy (paper and official code: 0.9)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("alpha1", "alpha2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
                raise ValueError(f"algorithm.{name} must be a finite number >= 0, got {value!r}")
        if self.alpha1 > self.alpha2:
            raise ValueError(f"algorithm.alpha1 must be <= algorithm.alpha2, got {self.alpha1} > {self.alpha2}")


def next_stage(stage: int, f_deputy: float, f_personal: float, alpha1: float, alpha2: float) -> int:
    """The stage of the next local epoch from the current one (0 at a round's start) and the train
    macro-F1 of the deputy and the personal model (the official code's rule, inequalities as there)."""
    if stage == 0 or f_deputy < alpha1 * f_personal:
        return RECOVER
    if stage == RECOVER or f_deputy < alpha2 * f_personal:
        return EXCHANGE
    return SUBLIMATE


def distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) ‖ softmax(student)) per batch, the teacher's logits detached."""
    return F.kl_div(F.log_softmax(student, dim=1), F.softmax(teacher.detach(), dim=1), reduction="batchmean")


@torch.no_grad()
def train_macro_f1(client: Client, model: nn.Module) -> float:
    """Macro-F1 of `model` (eval mode, argmax) on the client's training split."""
    model.eval()
    predicted, labels = [], []
    for batch in client.batches("train", batch_size=EVAL_BATCH):
        predicted.append(forward(model, batch).argmax(dim=1).cpu().numpy())
        labels.append(batch.y.cpu().numpy())
    if not labels:
        return 0.0
    from sklearn.metrics import f1_score  # here: every client actor imports every method, and sklearn.metrics costs ~0.5 s

    return float(f1_score(np.concatenate(labels), np.concatenate(predicted), average="macro", zero_division=0))


class Pair(nn.Module):
    """The personal model and the deputy as one module, so the one training loop trains both
    (one optimizer over both parameter sets steps each exactly as two optimizers would)."""

    def __init__(self, personal: nn.Module, deputy: nn.Module) -> None:
        super().__init__()
        self.personal = personal
        self.deputy = deputy


@register_algorithm("det")
class DET(PFA):
    """PFA's client half trains the pair; the update is the deputy's (PFA's), P stays in `client.memory`."""
    tasks = ("classification",)  # its stages compare macro-F1 and distil class probabilities

    Params = DETParams
    params: DETParams
    stage: int = EXCHANGE  # the stage of the epoch being trained (set per epoch in client_fit)

    def __init__(self, params: DETParams, cfg: ExperimentConfig) -> None:
        super().__init__(params, cfg)
        self._twin: nn.Module | None = None  # the personal model's module in this actor (a copy of the shared model)
        self._twin_of: nn.Module | None = None
        self._ce: list[float] = [0.0, 0.0]  # this fit's summed cross-entropies of P and D

    def personal_model(self, client: Client, like: nn.Module) -> nn.Module:
        """A second module shaped like the client's model holding its personal model (the initial one before its first round)."""
        if self._twin is None or self._twin_of is not like:
            self._twin = copy.deepcopy(like)
            # The shared model's load record is not the twin's; the copied forward hooks still clear that record when the
            # twin trains, which only makes the shared model's next `client.load` a full one (never stale values).
            self._twin.__dict__.pop("_raysim_loaded", None)
            self._twin_of = like
        self._twin.load_state_dict(client.memory.get(PERSONAL, client.initial_state))  # type: ignore[arg-type]
        return self._twin

    def client_fit(self, client: Client, payload: Tensors, round_: int) -> Update:
        deputy = self.received_model(client, payload)
        pair = Pair(self.personal_model(client, deputy), deputy)
        fed = self.cfg.federation
        epochs = self.staged(client, pair, client.train_epochs(round_, fed.local_epochs, fed.batch_size, self.cfg.seed))
        self._ce = [0.0, 0.0]
        stats = train_epochs(pair, epochs, make_optimizer(pair, fed), loss_fn=self.pair_loss, after_step=self.after_step)
        client.keep()  # the deputy, as PFA keeps a client's model
        client.memory[PERSONAL] = {k: v.detach().clone() for k, v in pair.personal.state_dict().items()}
        steps = max(stats["steps"], 1.0)
        metrics = {"loss": self._ce[0] / steps, "deputy_loss": self._ce[1] / steps, "steps": stats["steps"], "stage": float(self.stage)}
        return Update(client.id, self.shared(deputy, self.box_fraction(round_)), client.num_train, metrics)

    def staged(self, client: Client, pair: Pair, epochs: Iterator[Iterator[Batch]]) -> Iterator[Iterator[Batch]]:
        """The epochs, each preceded by its stage (`self.stage`); F1 is measured only where the rule reads it."""
        stage = 0
        for batches in epochs:
            if self.cfg.federation.local_epochs < 2:
                stage = EXCHANGE  # official: mutual learning when a round has a single local epoch
            else:
                f_personal, f_deputy = (train_macro_f1(client, pair.personal), train_macro_f1(client, pair.deputy)) if stage else (0.0, 0.0)
                stage = next_stage(stage, f_deputy, f_personal, self.params.alpha1, self.params.alpha2)
                train_mode(pair)  # the measurement left both in eval mode
            self.stage = stage
            yield batches

    def pair_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Loss of P plus loss of D for the current stage (each term reaches only its own model's parameters)."""
        pair = cast(Pair, model)
        personal, deputy = forward(pair.personal, batch), forward(pair.deputy, batch)
        ce_personal, ce_deputy = F.cross_entropy(personal, batch.y), F.cross_entropy(deputy, batch.y)
        loss_personal = ce_personal + distillation(personal, deputy) if self.stage != RECOVER else ce_personal
        loss_deputy = ce_deputy + distillation(deputy, personal) if self.stage != SUBLIMATE else ce_deputy
        self._ce[0] += ce_personal.item()
        self._ce[1] += ce_deputy.item()
        return loss_personal + loss_deputy

    def eval_model(self, client: Client, payload: Tensors) -> nn.Module:
        """The personal model (the initial one for a client that never trained), as the paper scores."""
        model = client.model
        model.load_state_dict(client.memory.get(PERSONAL, client.initial_state))  # type: ignore[arg-type]
        return model
