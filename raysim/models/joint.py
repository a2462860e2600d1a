"""Joint optic disc / cup segmentation and glaucoma grading (`model.name=joint:<timm encoder>`).

IMO's idea (segment and grade together, from fundus and OCT) on segmentation-models-pytorch's
U-Net: one model returns both the mask logits and the grade logits (`JointOutput`), and the
training loss is their sum (`raysim.client.training.supervised_loss`).

- Fundus alone (`data.modality=slo_fundus`): the U-Net on the fundus image, plus a grade head
  on its deepest encoder features (global average pooled).
- Fundus + OCT (`data.modality=slo_fundus+oct_onh_bscans`; the image stacks the fundus channel
  and the kept B-scans): a second encoder reads the volume (its B-scans folded to 3 channels by
  a learnable 5x5 convolution, as `raysim.models.SliceFold` does) and is fused into the fundus
  branch at **mid level**: at every encoder stage from the middle on (strides 8, 16, 32 for a
  5-stage encoder), the OCT stage's pooled features set a per-channel scale and shift of the
  fundus stage's map (FiLM: ``F * (1 + gamma) + beta``). Why not concatenate the maps: the
  B-scans are cross-sections, not pixel-aligned with the fundus, so the OCT branch speaks about
  the whole disc (its cup depth and nerve-fibre layer), not about fundus pixels. The fusion
  starts as the identity (its layers are zero-initialised), so training starts from the
  fundus-only model and the OCT branch adds what it learns. The fused maps feed the U-Net
  decoder (segmentation) and, with the OCT branch's deepest pooled features, the grade head.

IMO's diffusion refinement decoder is not built: the U-Net decoder stands in for it (it may
come later as another decoder name).
"""

from __future__ import annotations

import inspect

import segmentation_models_pytorch as smp
import torch
from torch import nn

from raysim.config import ConfigError, ModelConfig
from raysim.models.kinds import JointOutput
from raysim.models.segmentation import DECODER_CHANNELS, UNet, encoder_depth, load_encoder_weights, split_segmentation_name

FOLD_CHANNELS = 3  # B-scans folded to an RGB-like input, as SliceFold does


class JointNet(nn.Module):
    """A U-Net with a grade head; with `slices`, a second (OCT) encoder fused at mid level."""

    def __init__(self, encoder: str, *, depth: int, mask_classes: int, num_classes: int, fundus_chans: int, slices: int | None, weights: str | None) -> None:
        super().__init__()
        self.channel_split = (fundus_chans, slices) if slices else (fundus_chans,)
        self.unet = UNet(encoder_name=f"tu-{encoder}", encoder_weights=weights, encoder_depth=depth, decoder_channels=DECODER_CHANNELS[5 - depth :], in_channels=fundus_chans, classes=mask_classes)
        widths = self.unet.encoder.out_channels  # the input's, then each stage's
        pooled = widths[-1]
        self.fold: nn.Module | None = None
        self.oct_encoder: nn.Module | None = None
        self.fusion = nn.ModuleDict()
        if slices:
            self.fold = nn.Conv2d(slices, FOLD_CHANNELS, kernel_size=5, padding=2)
            self.oct_encoder = smp.encoders.get_encoder(f"tu-{encoder}", in_channels=FOLD_CHANNELS, depth=depth, weights=weights)
            oct_widths = self.oct_encoder.out_channels
            for stage in fused_stages(depth):
                film = nn.Linear(oct_widths[stage], 2 * widths[stage])
                nn.init.zeros_(film.weight)
                nn.init.zeros_(film.bias)
                self.fusion[str(stage)] = film
            pooled += oct_widths[-1]
        self.grade_head = nn.Linear(pooled, num_classes)
        self.pretrained_cfg = dict(getattr(self.unet.encoder.model, "pretrained_cfg", None) or {})

    def forward(self, x: torch.Tensor) -> JointOutput:
        parts = x.split(self.channel_split, dim=1)
        features = list(self.unet.encoder(parts[0]))
        pooled = []
        if self.oct_encoder is not None and self.fold is not None:
            oct_features = self.oct_encoder(self.fold(parts[1]))
            for stage, film in self.fusion.items():
                gamma, beta = film(_pool(oct_features[int(stage)])).chunk(2, dim=1)
                features[int(stage)] = features[int(stage)] * (1 + gamma[..., None, None]) + beta[..., None, None]
            pooled.append(_pool(oct_features[-1]))
        masks = self.unet.segmentation_head(_decode(self.unet.decoder, features))
        grade = self.grade_head(torch.cat([_pool(features[-1]), *pooled], dim=1))
        return JointOutput(masks, grade)

    def get_classifier(self) -> tuple[nn.Module, ...]:
        """The segmentation head and the grade head: FedPer's personal layers."""
        return (self.unet.segmentation_head, self.grade_head)

    def untrained_parts(self) -> tuple[nn.Module, ...]:
        """Never pretrained, so trained under adapter methods' frozen encoders."""
        parts: tuple[nn.Module, ...] = (self.unet.decoder, self.unet.segmentation_head, self.grade_head, self.fusion)
        return parts + ((self.fold,) if self.fold is not None else ())


def fused_stages(depth: int) -> range:
    """Encoder stages fused with the OCT branch: from the middle on (3..5 of 5, 2..3 of 3)."""
    return range(depth // 2 + 1, depth + 1)


def build_joint_model(cfg: ModelConfig, *, num_classes: int, mask_classes: int, in_chans: int, slices: int | None, seed: int, weights_key: str = "model.weights") -> JointNet:
    """`joint:<encoder>`: seeded like `build_model` (every actor builds the same model); a local
    `model.weights` timm checkpoint goes into each encoder (the stem adapted to its channels)."""
    _, encoder = split_segmentation_name(cfg.name)
    fundus_chans = in_chans - (slices or 0)
    download = cfg.pretrained and not cfg.weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = JointNet(encoder, depth=encoder_depth(cfg.img_size), mask_classes=mask_classes, num_classes=num_classes, fundus_chans=fundus_chans, slices=slices, weights="imagenet" if download else None)
        except (OSError, RuntimeError) as err:
            if download:
                raise ConfigError(f"model.pretrained=true: no local weights for the encoder {encoder} ({' '.join(str(err).split())[:200]}); pass model.weights=PATH to a timm checkpoint") from err
            raise
    if cfg.weights:
        load_encoder_weights(model.unet.encoder, model.pretrained_cfg, cfg, weights_key)
        if model.oct_encoder is not None:
            load_encoder_weights(model.oct_encoder, model.pretrained_cfg, cfg, weights_key)
    return model


def _pool(features: torch.Tensor) -> torch.Tensor:
    return features.mean(dim=(2, 3))


def _decode(decoder: nn.Module, features: list[torch.Tensor]) -> torch.Tensor:
    """smp's decoder call: a list of features since 0.5, separate arguments before."""
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in inspect.signature(decoder.forward).parameters.values()):
        return decoder(*features)
    return decoder(features)
