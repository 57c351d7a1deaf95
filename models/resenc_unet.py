"""Residual-encoder U-Net in the manner of nnU-Net ResEnc (the third network).

After Isensee, Wald, Ulrich, Baumgartner, Roy, Maier-Hein and Jaeger, "nnU-Net Revisited: A Call
for Rigorous Validation in 3D Medical Image Segmentation", MICCAI 2024 (the ResEnc M/L presets of
nnU-Net v2, ``ResidualEncoderUNet`` in dynamic-network-architectures), with base width w and S
stages (w = 32, S = 6: the ResEnc M layout on a 96³ patch):

- Encoder: stem 3³ conv-norm-LeakyReLU (w, full resolution); stage s (s = 0 .. S-1) has
  ``min(w·2^s, 10w)`` channels (w = 32: 32, 64, 128, 256, 320, 320) and (1, 3, 4, 6, 6, 6)[s]
  residual blocks; its first block has stride 2 for s > 0. A block (nnU-Net's ``BasicBlockD``):
  3³ conv-norm-LeakyReLU → 3³ conv-norm, plus the shortcut (2³ average pooling when strided, then
  a 1³ conv-norm when the width changes), LeakyReLU. Skips: stages 0 .. S-2 (1 .. 1/2^(S-2)),
  bottleneck at 1/2^(S-1).
- Decoder: per level, a 2³ transposed conv stride 2 onto the skip's width (cropped to the
  skip's grid, so odd sizes work), concatenation of the skip, one 3³ conv-norm-LeakyReLU; a 1³
  conv head at full resolution gives the logits. nnU-Net's deep-supervision heads are left out
  (one head per decoder, as the other networks here).

Normalisation defaults to InstanceNorm (nnU-Net's). LeakyReLU slope 0.01. Any input edge
>= 2^(S-1) voxels works (smaller raises ValueError); the ISLES strategies (``variant``,
:mod:`models.strategies`) lay it out as ``encoders.<i>`` / ``decoders.<i>``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import strategies
from .common import NORMS, check_choice, check_int, make_norm

__all__ = ["ResEncUNetConfig", "ResEncUNet"]

_BLOCKS = (1, 3, 4, 6, 6, 6)  # residual blocks per encoder stage (nnU-Net ResEnc M/L)
_MAX_WIDTH_FACTOR = 10  # stage width cap: 10w (320 at w = 32)
_SLOPE = 0.01  # LeakyReLU negative slope


@dataclass(frozen=True)
class ResEncUNetConfig:
    variant: str = "single"  # an ISLES strategy: 'single' | 'dwi_only' | 'separate' | 'shared' (models.strategies)
    # input channels (modalities); None: the variant's default (2 for 'separate' and 'shared', else 1)
    in_channels: int | None = None
    num_classes: int = 2  # 2: softmax (background, lesion); 1: sigmoid lesion logit
    width: int = field(default=32, metadata={"help": "base channel width w: stage s has min(w*2^s, 10w) channels"})
    norm: str = field(default="instance", metadata={"help": "normalisation, part of a checkpoint's identity", "choices": NORMS})
    stages: int = field(default=6, metadata={"help": "encoder stages S (2-6): the bottleneck is at 1/2^(S-1); inputs need edges >= 2^(S-1)"})

    def __post_init__(self) -> None:
        check_choice("variant", self.variant, strategies.STRATEGIES)
        object.__setattr__(self, "in_channels", strategies.resolve_in_channels(self.variant, self.in_channels))
        check_int("num_classes", self.num_classes)
        check_int("width", self.width)
        check_choice("norm", self.norm, NORMS)
        check_int("stages", self.stages, minimum=2)
        if self.stages > len(_BLOCKS):
            raise ValueError(f"stages must be at most {len(_BLOCKS)}, got {self.stages}")

    def stage_widths(self) -> tuple[int, ...]:
        """Channels of each encoder stage, full resolution first."""
        return tuple(min(self.width * 2**s, _MAX_WIDTH_FACTOR * self.width) for s in range(self.stages))


def _conv_norm_act(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False), make_norm(norm, out_channels), nn.LeakyReLU(_SLOPE, inplace=True)
    )


class ResidualBlock(nn.Module):
    """nnU-Net's BasicBlockD: (B, C_in, X, Y, Z) → (B, C_out, ceil(X/stride), ...)."""

    conv_norm_pairs = (("conv2", "norm2"),)  # norm2 reads conv2's output (models.fold_batchnorm)

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            make_norm(norm, out_channels),
            nn.LeakyReLU(_SLOPE, inplace=True),
        )
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = make_norm(norm, out_channels)
        pool = nn.AvgPool3d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()
        project = nn.Identity()
        if in_channels != out_channels:
            project = nn.Sequential(nn.Conv3d(in_channels, out_channels, 1, bias=False), make_norm(norm, out_channels))
        self.shortcut = nn.Sequential(pool, project)

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(self.norm2(self.conv2(self.conv1(x))) + self.shortcut(x), _SLOPE)


class ResEncEncoder(nn.Module):
    """(B, C_in, X, Y, Z) → per-stage features, stage s at 1/2^s with ``config.stage_widths()[s]``
    channels (the last is the bottleneck)."""

    input_conv_key = "stem.0.weight"

    def __init__(self, in_channels: int, config: ResEncUNetConfig):
        super().__init__()
        widths = config.stage_widths()
        self.stem = _conv_norm_act(in_channels, widths[0], config.norm)
        stages, previous = [], widths[0]
        for s, channels in enumerate(widths):
            blocks = [ResidualBlock(previous, channels, 1 if s == 0 else 2, config.norm)]
            blocks += [ResidualBlock(channels, channels, 1, config.norm) for _ in range(_BLOCKS[s] - 1)]
            stages.append(nn.Sequential(*blocks))
            previous = channels
        self.stages = nn.ModuleList(stages)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        features, x = [], self.stem(x)  # (B, w, X, Y, Z)
        for stage in self.stages:
            x = stage(x)  # stage s: (B, widths[s], X/2^s, ...)
            features.append(x)
        return tuple(features)


class UpLevel(nn.Module):
    """2³ transposed conv stride 2 (cropped to the skip's grid), concatenation of the skip,
    one 3³ conv-norm-LeakyReLU: (B, C_in, x, y, z) + skip (B, C_skip, X, Y, Z) → (B, C_skip, X, Y, Z)."""

    def __init__(self, in_channels: int, skip_channels: int, norm: str):
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, skip_channels, 2, stride=2, bias=False)
        self.conv = _conv_norm_act(2 * skip_channels, skip_channels, norm)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.up(x)
        x = x[:, :, : skip.shape[2], : skip.shape[3], : skip.shape[4]]  # odd edges: 2*ceil(n/2) = n + 1
        return self.conv(torch.cat([x, skip], dim=1))


class ResEncDecoder(nn.Module):
    """Encoder features (see :class:`ResEncEncoder`) → logits (B, num_classes, X, Y, Z).

    ``size`` (the input grid, the decoder contract of :mod:`models.strategies`) is the first
    skip's grid here, which the last level already lands on."""

    def __init__(self, config: ResEncUNetConfig):
        super().__init__()
        widths = config.stage_widths()
        self.levels = nn.ModuleList(UpLevel(widths[s + 1], widths[s], config.norm) for s in reversed(range(config.stages - 1)))
        self.head = nn.Conv3d(widths[0], config.num_classes, 1)

    def forward(self, features: tuple[Tensor, ...], size: tuple[int, ...]) -> Tensor:
        d = features[-1]  # bottleneck
        for level, skip in zip(self.levels, reversed(features[:-1])):
            d = level(d, skip)  # up one level onto the skip's grid
        return self.head(d)  # (B, num_classes, *size)


class ResEncUNet(nn.Module):
    """Residual-encoder U-Net (see module docstring) in one of the ISLES strategies.

    ``forward(x)``: x (B, in_channels, X, Y, Z) float with every edge >= 2^(stages-1) voxels
    (otherwise ValueError) → tuple of logits (B, num_classes, X, Y, Z), one per head (1 for
    'single'/'dwi_only', one per input channel for 'separate'/'shared'). InstanceNorm needs more
    than one voxel at the bottleneck (an edge > 2^(stages-1)).
    """

    def __init__(self, config: ResEncUNetConfig):
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        strategies.attach(
            self, config.variant, config.in_channels, lambda channels: ResEncEncoder(channels, config), lambda: ResEncDecoder(config)
        )

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        smallest = 2 ** (self.config.stages - 1)
        if x.ndim == 5 and min(x.shape[2:]) < smallest:
            size = "x".join(map(str, x.shape[2:]))
            raise ValueError(f"ResEncUNet with {self.config.stages} stages needs input edges >= {smallest} voxels, got {size}")
        return strategies.forward(self, self.config.variant, x)
