"""FedBN (Li et al., ICLR 2021): FedAvg of everything except the normalisation layers, which
(affine parameters and running statistics) stay with each client."""

from __future__ import annotations

from torch import nn

from raysim.algorithms.base import Algorithm, register_algorithm

# Every torch normalisation layer: _NormBase covers BatchNorm*/SyncBatchNorm/InstanceNorm*
# (timm's BatchNormAct2d subclasses BatchNorm2d); timm's LayerNorm2d/GroupNorm1 subclass these.
NORM_LAYERS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def norm_keys(model: nn.Module, *, params: bool = True, buffers: bool = True) -> set[str]:
    """State-dict keys of the normalisation layers' own parameters and/or buffers."""
    keys: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, NORM_LAYERS):
            names = [n for n, _ in module.named_parameters(recurse=False)] if params else []
            names += [n for n, _ in module.named_buffers(recurse=False)] if buffers else []
            keys.update(f"{prefix}.{n}" if prefix else n for n in names)
    return keys


@register_algorithm("fedbn")
class FedBN(Algorithm):
    """Normalisation layers are never sent, so the base client keeps them in its own state."""

    def communicated(self, model: nn.Module) -> list[str]:
        local = norm_keys(model)
        return [k for k in super().communicated(model) if k not in local]
