"""Ditto (Li et al., ICML 2021): FedAvg for the global model plus a personal model per client
trained on loss + (λ/2)‖v − θ_g‖²; clients are scored with their personal model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from raysim.algorithms.base import Algorithm, register_algorithm
from raysim.algorithms.fedprox import check_weight, proximal_term
from raysim.client.training import Batch, make_optimizer, train_epochs
from raysim.types import Tensors, Update

if TYPE_CHECKING:
    from raysim.client.client import Client

PERSONAL = "ditto_personal"  # client.memory key of the personal model's full state dict


@dataclass
class DittoParams:
    lam: float = 1e-3  # weight λ pulling the personal model towards the global one (FL-MedSegBench: 1e-3); 0 is local training

    def __post_init__(self) -> None:
        check_weight("lam", self.lam)


@register_algorithm("ditto")
class Ditto(Algorithm):
    """The Update carries the trained global copy only; the personal model stays in `client.memory`."""

    Params = DittoParams
    params: DittoParams
    newcomer = "the global model (a site that never trained has no personal model)"
    anchor: dict[str, torch.Tensor]  # θ_g of the client being trained (set in client_fit)

    def client_fit(self, client: Client, payload: Tensors, round_: int) -> Update:
        update = super().client_fit(client, payload, round_)  # the global copy, exactly FedAvg
        model = client.load(payload)
        # θ_g is the global model received this round (Ditto's w^t), not the one just trained.
        self.anchor = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        if PERSONAL in client.memory:
            model.load_state_dict(client.memory[PERSONAL])  # type: ignore[arg-type]
        # else: the first participation starts the personal model from the received global.
        fed = self.cfg.federation
        stats = train_epochs(
            model,
            client.train_epochs(round_, fed.local_epochs, fed.batch_size, self.cfg.seed),
            make_optimizer(model, fed),
            loss_fn=self.personal_loss,
            after_step=self.after_step,
        )
        client.memory[PERSONAL] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        update.metrics["personal_loss"] = stats["loss"]
        return update

    def personal_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self.loss(model, batch) + self.params.lam / 2 * proximal_term(model, self.anchor)

    def eval_model(self, client: Client, payload: Tensors) -> nn.Module:
        model = client.load(payload)  # a client that never trained is scored with the global model
        if PERSONAL in client.memory:
            model.load_state_dict(client.memory[PERSONAL])  # type: ignore[arg-type]
        return model
