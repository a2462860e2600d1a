"""FedPer (Arivazhagan et al., 2019): FedAvg of the base layers; each client keeps its own
classifier head."""

from __future__ import annotations

from torch import nn

from raysim.algorithms.base import Algorithm, register_algorithm


def head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier head: what `get_classifier()` returns on the first
    (outermost) module that has one, so a timm backbone inside a SliceFold is found too."""
    owner = next((m for m in model.modules() if callable(getattr(m, "get_classifier", None))), None)
    if owner is None:
        raise ValueError(f"fedper needs a model with get_classifier() (every timm model has one); {type(model).__name__} has none")
    heads = owner.get_classifier()
    heads = heads if isinstance(heads, tuple) else (heads,)  # distilled ViTs return (head, head_dist)
    ids = {id(h) for h in heads if isinstance(h, nn.Module)}
    prefixes = [f"{name}." for name, m in model.named_modules() if id(m) in ids]
    keys = {k for k in model.state_dict() if any(k.startswith(p) for p in prefixes)}
    if not keys:
        raise ValueError(f"fedper: the classifier head of {type(owner).__name__} has no weights (num_classes=0?)")
    return keys


@register_algorithm("fedper")
class FedPer(Algorithm):
    """The head is never sent, so the base client keeps it in its own state between rounds."""

    newcomer = "the shared body with the model's initial (seeded) head: FedPer's server holds no head, and a site that never trained has none of its own"

    def communicated(self, model: nn.Module) -> list[str]:
        local = head_keys(model)
        return [k for k in super().communicated(model) if k not in local]
