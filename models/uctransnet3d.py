"""UCTransNet3D: CNN encoder, multi-scale channel transformer on the skips, SE decoder
(SPEC.md section 3; after Wang et al., UCTransNet, AAAI 2022, figure 2, lifted to 3-D).

With base width w (64 in the paper) and a cubic patch of edge P (64 in the paper, divisible by 16):

- Encoder: x1 = two 3³ conv-norm-ReLU (w, full resolution); x2..x5 = 2³ max-pool then two
  3³ conv-norm-ReLU with 2w, 4w, 8w, 8w channels (1/2 .. 1/16).
- Channel transformer over x1..x4: per scale a Conv3d patch embedding with kernel = stride =
  p_i = 8, 4, 2, 1, so every scale gives (P/8)³ tokens (512 at P = 64) of C_i channels, plus a
  learned position embedding (which fixes P) and dropout. Each of the L layers: LayerNorm per
  scale and over the concatenated 15w channels; per head, queries from each scale, keys and
  values from the concatenation; scores are channel-by-channel (C_i x 15w, tokens contracted),
  scaled by 1/sqrt(15w), instance-normalised, softmaxed, dropped out; heads are averaged; output
  projection and dropout; residual; MLP (ratio 4, GELU); residual. A final LayerNorm per scale,
  then tokens go back to their grid, nearest-neighbour upsampling ×p_i (each token fills its
  patch), 1³ conv-norm-ReLU, added to x_i.
- Decoder: trilinear upsampling ×2, squeeze-and-excitation (reduction 16) on the skip,
  concatenation, two 3³ conv-norm-ReLU (4w, 2w, w, w); 1³ conv head at full resolution.

92.6 M parameters at w = 64, P = 64, 1 input channel (the paper: "about 93 M"; see ``python -m models``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import NORMS, ConvNormReLU, check_choice, check_int

__all__ = ["UCTransNet3DConfig", "UCTransNet3D"]

_PATCH_STRIDES = (8, 4, 2, 1)  # per-scale embedding kernel = stride for x1..x4


@dataclass(frozen=True)
class UCTransNet3DConfig:
    in_channels: int = 1  # input channels
    num_classes: int = 2  # 2: softmax (background, lesion); 1: sigmoid lesion logit
    width: int = field(default=64, metadata={"help": "base channel width w: encoder w, 2w, 4w, 8w, 8w"})
    # GroupNorm in the paper's intended runs
    norm: str = field(default="group", metadata={"help": "normalisation, part of a checkpoint's identity", "choices": NORMS})
    patch_size: int = 64  # cubic input edge in voxels, divisible by 16; fixed by the position embedding
    layers: int = field(default=4, metadata={"help": "transformer layers L"})
    heads: int = field(default=4, metadata={"help": "attention heads per transformer layer"})
    dropout: float = field(default=0.1, metadata={"help": "dropout after embeddings, attention softmax and attention output"})

    def __post_init__(self) -> None:
        check_int("in_channels", self.in_channels)
        check_int("num_classes", self.num_classes)
        check_int("width", self.width)
        check_choice("norm", self.norm, NORMS)
        check_int("patch_size", self.patch_size, minimum=16)
        if self.patch_size % 16:
            raise ValueError(f"patch_size must be divisible by 16, got {self.patch_size}")
        check_int("layers", self.layers)
        check_int("heads", self.heads)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")


def _double_conv(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        ConvNormReLU(in_channels, out_channels, 3, norm), ConvNormReLU(out_channels, out_channels, 3, norm)
    )


class ChannelEmbedding(nn.Module):
    """(B, C, g·p, g·p, g·p) → tokens (B, g³, C): patch conv (kernel = stride = p) + position embedding."""

    def __init__(self, channels: int, patch: int, tokens: int, dropout: float):
        super().__init__()
        self.patch_embed = nn.Conv3d(channels, channels, patch, stride=patch)
        self.position = nn.Parameter(torch.zeros(1, tokens, channels))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, C)
        return self.dropout(tokens + self.position)


class ChannelAttention(nn.Module):
    """Channel-wise cross attention: each scale's channels attend to all 15w concatenated channels.

    Tokens per scale (B, N, C_i) and their concatenation (B, N, KV) → per scale (B, N, C_i).
    """

    def __init__(self, channels: tuple[int, ...], heads: int, dropout: float):
        super().__init__()
        kv = sum(channels)
        self.heads = heads
        self.queries = nn.ModuleList(nn.Linear(c, heads * c, bias=False) for c in channels)
        self.key = nn.Linear(kv, heads * kv, bias=False)
        self.value = nn.Linear(kv, heads * kv, bias=False)
        self.score_norm = nn.InstanceNorm2d(heads)  # normalises each head's C_i x KV score map
        self.outs = nn.ModuleList(nn.Linear(c, c, bias=False) for c in channels)
        self.attn_dropout = nn.Dropout(dropout)
        self.out_dropout = nn.Dropout(dropout)
        self.scale = 1.0 / math.sqrt(kv)

    def _split_heads(self, t: Tensor) -> Tensor:
        b, n, hc = t.shape
        return t.view(b, n, self.heads, hc // self.heads).permute(0, 2, 1, 3)  # (B, H, N, C)

    def forward(self, tokens: list[Tensor], tokens_all: Tensor) -> list[Tensor]:
        key = self._split_heads(self.key(tokens_all))  # (B, H, N, KV)
        value = self._split_heads(self.value(tokens_all))  # (B, H, N, KV)
        outputs = []
        for t, query_proj, out_proj in zip(tokens, self.queries, self.outs):
            query = self._split_heads(query_proj(t))  # (B, H, N, C_i)
            scores = query.transpose(-2, -1) @ key * self.scale  # (B, H, C_i, KV)
            probs = self.attn_dropout(torch.softmax(self.score_norm(scores), dim=-1))
            context = (probs @ value.transpose(-2, -1)).mean(dim=1)  # (B, C_i, N), heads averaged
            outputs.append(self.out_dropout(out_proj(context.transpose(1, 2))))  # (B, N, C_i)
        return outputs


class MLP(nn.Sequential):
    """(B, N, C) → (B, N, C): Linear C→4C, GELU, Linear 4C→C."""

    def __init__(self, channels: int):
        super().__init__(nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels))


class TransformerLayer(nn.Module):
    """One channel-transformer layer (pre-norm attention and MLP, both residual) on 4 token sets."""

    def __init__(self, channels: tuple[int, ...], heads: int, dropout: float):
        super().__init__()
        self.attn_norms = nn.ModuleList(nn.LayerNorm(c) for c in channels)
        self.attn_norm_all = nn.LayerNorm(sum(channels))
        self.attention = ChannelAttention(channels, heads, dropout)
        self.mlp_norms = nn.ModuleList(nn.LayerNorm(c) for c in channels)
        self.mlps = nn.ModuleList(MLP(c) for c in channels)

    def forward(self, tokens: list[Tensor]) -> list[Tensor]:
        tokens_all = self.attn_norm_all(torch.cat(tokens, dim=2))  # (B, N, KV)
        normed = [norm(t) for norm, t in zip(self.attn_norms, tokens)]
        tokens = [t + a for t, a in zip(tokens, self.attention(normed, tokens_all))]
        return [t + mlp(norm(t)) for t, norm, mlp in zip(tokens, self.mlp_norms, self.mlps)]


class Reconstruct(nn.Module):
    """Tokens (B, g³, C) → (B, C, g·p, g·p, g·p): grid, nearest upsampling ×p, 1³ conv-norm-ReLU."""

    def __init__(self, channels: int, patch: int, norm: str):
        super().__init__()
        self.patch = patch
        self.conv = ConvNormReLU(channels, channels, 1, norm)

    def forward(self, tokens: Tensor, grid: int) -> Tensor:
        b, n, c = tokens.shape
        x = tokens.transpose(1, 2).reshape(b, c, grid, grid, grid)
        return self.conv(F.interpolate(x, scale_factor=self.patch, mode="nearest"))


class ChannelTransformer(nn.Module):
    """Skips x1..x4 (B, C_i, P/2^(i-1), ...) → same shapes, x_i + reconstruct(transformer tokens)."""

    def __init__(self, channels: tuple[int, ...], patch_size: int, layers: int, heads: int, dropout: float, norm: str):
        super().__init__()
        self.grid = patch_size // 8
        tokens = self.grid**3
        self.embeddings = nn.ModuleList(
            ChannelEmbedding(c, p, tokens, dropout) for c, p in zip(channels, _PATCH_STRIDES)
        )
        self.layers = nn.ModuleList(TransformerLayer(channels, heads, dropout) for _ in range(layers))
        self.final_norms = nn.ModuleList(nn.LayerNorm(c) for c in channels)
        self.reconstructs = nn.ModuleList(Reconstruct(c, p, norm) for c, p in zip(channels, _PATCH_STRIDES))

    def forward(self, skips: list[Tensor]) -> list[Tensor]:
        tokens = [embed(x) for embed, x in zip(self.embeddings, skips)]  # 4 x (B, N, C_i)
        for layer in self.layers:
            tokens = layer(tokens)
        tokens = [norm(t) for norm, t in zip(self.final_norms, tokens)]
        return [x + rec(t, self.grid) for x, rec, t in zip(skips, self.reconstructs, tokens)]


class SqueezeExcitation(nn.Module):
    """(B, C, X, Y, Z) → same, channels rescaled by sigmoid(FC(ReLU(FC(global mean)))), hidden C/16."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels), nn.Sigmoid()
        )

    def forward(self, x: Tensor) -> Tensor:
        weights = self.fc(x.mean(dim=(2, 3, 4)))  # (B, C)
        return x * weights[:, :, None, None, None]


class UpBlockSE(nn.Module):
    """Decoder level: upsample x to the skip's grid (×2), SE on the skip, concatenate, two 3³ conv-norm-ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, norm: str):
        super().__init__()
        self.se = SqueezeExcitation(skip_channels)
        self.convs = _double_conv(in_channels + skip_channels, out_channels, norm)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
        return self.convs(torch.cat([x, self.se(skip)], dim=1))


class UCTransNet3D(nn.Module):
    """UCTransNet3D (see module docstring).

    ``forward(x)``: x (B, in_channels, P, P, P) float with P = config.patch_size (any other
    spatial size raises ValueError: use sliding windows of the training size) → 1-tuple of
    logits (B, num_classes, P, P, P).
    """

    encoder_prefixes = ("encoder.",)
    input_conv_keys = ("encoder.0.0.0.weight",)
    inference_heads = (0,)

    def __init__(self, config: UCTransNet3DConfig):
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        w, norm = config.width, config.norm
        channels = (w, 2 * w, 4 * w, 8 * w)
        self.encoder = nn.ModuleList(
            [
                _double_conv(config.in_channels, w, norm),
                nn.Sequential(nn.MaxPool3d(2), _double_conv(w, 2 * w, norm)),
                nn.Sequential(nn.MaxPool3d(2), _double_conv(2 * w, 4 * w, norm)),
                nn.Sequential(nn.MaxPool3d(2), _double_conv(4 * w, 8 * w, norm)),
                nn.Sequential(nn.MaxPool3d(2), _double_conv(8 * w, 8 * w, norm)),
            ]
        )
        self.transformer = ChannelTransformer(
            channels, config.patch_size, config.layers, config.heads, config.dropout, norm
        )
        self.up4 = UpBlockSE(8 * w, 8 * w, 4 * w, norm)
        self.up3 = UpBlockSE(4 * w, 4 * w, 2 * w, norm)
        self.up2 = UpBlockSE(2 * w, 2 * w, w, norm)
        self.up1 = UpBlockSE(w, w, w, norm)
        self.head = nn.Conv3d(w, config.num_classes, 1)

    def forward(self, x: Tensor) -> tuple[Tensor]:
        p = self.config.patch_size
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected input (B, {self.config.in_channels}, {p}, {p}, {p}), got {tuple(x.shape)}")
        if tuple(x.shape[2:]) != (p, p, p):
            size = "x".join(map(str, x.shape[2:]))
            raise ValueError(
                f"UCTransNet3D was built for {p}x{p}x{p} patches (position embedding) but got a "
                f"{size} input; use windows of the training patch size"
            )
        x1 = self.encoder[0](x)  # (B, w, P, P, P)
        x2 = self.encoder[1](x1)  # (B, 2w, P/2, ...)
        x3 = self.encoder[2](x2)  # (B, 4w, P/4, ...)
        x4 = self.encoder[3](x3)  # (B, 8w, P/8, ...)
        x5 = self.encoder[4](x4)  # (B, 8w, P/16, ...)
        x1, x2, x3, x4 = self.transformer([x1, x2, x3, x4])
        d = self.up4(x5, x4)  # (B, 4w, P/8, ...)
        d = self.up3(d, x3)  # (B, 2w, P/4, ...)
        d = self.up2(d, x2)  # (B, w, P/2, ...)
        d = self.up1(d, x1)  # (B, w, P, ...)
        return (self.head(d),)
