"""3-D ResNet-18 U-Net and its three ISLES configurations (SPEC.md section 3).

Encoder (width w = 64): 7³ conv stride 2 (w) → norm → ReLU → 3³ max-pool stride 2 → four
stages of two BasicBlocks with w, 2w, 4w, 8w channels and strides 1, 2, 2, 2. Skips come from
the stem (1/2) and the first three stages (1/4, 1/8, 1/16); the bottleneck is at 1/32.

Decoder: per level, trilinear upsampling onto the skip's grid (×2 when the input edge is a
multiple of 32; any size works), concatenation of the skip, two 3³ conv-norm-ReLU; a fifth
level without skip returns to the full input grid, then a 1³ conv gives the logits.
Decoder output widths are (4w, 2w, w, w/2, w/4) = (256, 128, 64, 32, 16) at w = 64: the first
three mirror the encoder stage they merge with, the two full-resolution-side levels halve
again, which keeps the 96³ activations affordable and brings the network to 42.6 M parameters
(1 input channel), the paper's "about 42 M". Those two levels keep at least 8 channels, which
changes only widths below 32 (tests, the small demo).

Configurations (``variant``, the ISLES strategies of :mod:`models.strategies`, which lays
the network out as ``encoders.<i>`` / ``decoders.<i>``):

- 'single': one U-Net on any number of input channels (BraTS, ATLAS, UOA: 1 channel).
- 'dwi_only': one U-Net on DWI (1 channel).
- 'separate': one independent U-Net per input channel; with (B, 2, X, Y, Z) = [DWI, ADC],
  channel 0 feeds the DWI U-Net (head 0), channel 1 the ADC U-Net (head 1). Every head is
  trained; inference uses head 0 only.
- 'shared': one encoder on the stacked channels ([DWI, ADC]) and one decoder per channel
  (head 0 "DWI", head 1 "ADC"), all supervised with the lesion mask; inference averages the heads.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import strategies
from .common import NORMS, ConvNormReLU, check_choice, check_int, make_norm

__all__ = ["VARIANTS", "ResNetUNetConfig", "ResNetUNet"]

VARIANTS = strategies.STRATEGIES
# The full-resolution decoder levels never get narrower than this: at width 8, w/4 would leave
# 2 channels, too few for a reliable start (small runs then often predicted a constant).
_MIN_DECODER_WIDTH = 8


@dataclass(frozen=True)
class ResNetUNetConfig:
    variant: str = "single"  # 'single' | 'dwi_only' | 'separate' | 'shared' (see module docstring)
    # input channels (modalities); None: the variant's default (2 for 'separate' and 'shared', else 1)
    in_channels: int | None = None
    num_classes: int = 2  # 2: softmax (background, lesion); 1: sigmoid lesion logit
    width: int = field(default=64, metadata={"help": "base channel width w: encoder stages w, 2w, 4w, 8w"})
    norm: str = field(default="batch", metadata={"help": "normalisation, part of a checkpoint's identity", "choices": NORMS})

    def __post_init__(self) -> None:
        check_choice("variant", self.variant, VARIANTS)
        object.__setattr__(self, "in_channels", strategies.resolve_in_channels(self.variant, self.in_channels))
        check_int("num_classes", self.num_classes)
        check_int("width", self.width)
        check_choice("norm", self.norm, NORMS)


class BasicBlock(nn.Module):
    """Two 3³ conv-norm, residual add, ReLU; a 1³ conv-norm projection when the shape changes.

    (B, C_in, X, Y, Z) → (B, C_out, X/stride, Y/stride, Z/stride).
    """

    conv_norm_pairs = (("conv2", "norm2"),)  # norm2 reads conv2's output (models.fold_batchnorm)

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = ConvNormReLU(in_channels, out_channels, 3, norm, stride=stride)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = make_norm(norm, out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False), make_norm(norm, out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.norm2(self.conv2(self.conv1(x))) + self.shortcut(x))


def _stage(in_channels: int, out_channels: int, stride: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        BasicBlock(in_channels, out_channels, stride, norm), BasicBlock(out_channels, out_channels, 1, norm)
    )


class ResNet18Encoder(nn.Module):
    """(B, C_in, X, Y, Z) → features at 1/2, 1/4, 1/8, 1/16, 1/32 with w, w, 2w, 4w, 8w channels."""

    input_conv_key = "stem.0.weight"

    def __init__(self, in_channels: int, width: int, norm: str):
        super().__init__()
        w = width
        self.stem = ConvNormReLU(in_channels, w, 7, norm, stride=2)
        self.pool = nn.MaxPool3d(3, stride=2, padding=1)
        self.layer1 = _stage(w, w, 1, norm)
        self.layer2 = _stage(w, 2 * w, 2, norm)
        self.layer3 = _stage(2 * w, 4 * w, 2, norm)
        self.layer4 = _stage(4 * w, 8 * w, 2, norm)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        s1 = self.stem(x)  # (B, w, X/2, ...)
        s2 = self.layer1(self.pool(s1))  # (B, w, X/4, ...)
        s3 = self.layer2(s2)  # (B, 2w, X/8, ...)
        s4 = self.layer3(s3)  # (B, 4w, X/16, ...)
        s5 = self.layer4(s4)  # (B, 8w, X/32, ...) bottleneck
        return s1, s2, s3, s4, s5


class UpBlock(nn.Module):
    """Trilinear upsampling to ``size``, concatenation of ``skip`` (if any), two 3³ conv-norm-ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, norm: str):
        super().__init__()
        self.convs = nn.Sequential(
            ConvNormReLU(in_channels + skip_channels, out_channels, 3, norm),
            ConvNormReLU(out_channels, out_channels, 3, norm),
        )

    def forward(self, x: Tensor, size: tuple[int, ...], skip: Tensor | None = None) -> Tensor:
        x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.convs(x)


class UNetDecoder(nn.Module):
    """Encoder features (see :class:`ResNet18Encoder`) → logits (B, num_classes, X, Y, Z) on the input grid."""

    def __init__(self, width: int, num_classes: int, norm: str):
        super().__init__()
        w = width
        d4, d3, d2 = 4 * w, 2 * w, w
        d1, d0 = max(w // 2, _MIN_DECODER_WIDTH), max(w // 4, _MIN_DECODER_WIDTH)
        self.up4 = UpBlock(8 * w, 4 * w, d4, norm)  # → 1/16
        self.up3 = UpBlock(d4, 2 * w, d3, norm)  # → 1/8
        self.up2 = UpBlock(d3, w, d2, norm)  # → 1/4
        self.up1 = UpBlock(d2, w, d1, norm)  # → 1/2 (stem skip)
        self.up0 = UpBlock(d1, 0, d0, norm)  # → full resolution, no skip
        self.head = nn.Conv3d(d0, num_classes, 1)

    def forward(self, features: tuple[Tensor, ...], size: tuple[int, ...]) -> Tensor:
        s1, s2, s3, s4, s5 = features
        d = self.up4(s5, s4.shape[2:], s4)
        d = self.up3(d, s3.shape[2:], s3)
        d = self.up2(d, s2.shape[2:], s2)
        d = self.up1(d, s1.shape[2:], s1)
        d = self.up0(d, size)
        return self.head(d)


class ResNetUNet(nn.Module):
    """ResNet-18 U-Net in one of the :data:`VARIANTS` (see module docstring).

    ``forward(x)``: x (B, in_channels, X, Y, Z) float, any edge >= 32 voxels (multiples of 32
    give exact ×2 levels) → tuple of logits (B, num_classes, X, Y, Z), one per head:
    1 head for 'single'/'dwi_only', one per input channel (DWI, ADC) for 'separate'/'shared'.
    BatchNorm in training needs more than one value per channel at the 1/32 bottleneck
    (batch > 1 or edge > 32); InstanceNorm needs edge > 32.
    """

    def __init__(self, config: ResNetUNetConfig):
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        strategies.attach(
            self,
            config.variant,
            config.in_channels,
            lambda channels: ResNet18Encoder(channels, config.width, config.norm),
            lambda: UNetDecoder(config.width, config.num_classes, config.norm),
        )

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return strategies.forward(self, self.config.variant, x)
