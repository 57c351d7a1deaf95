"""Pieces every network in ``models/`` shares: normalisation, conv-norm-ReLU, argument checks
and the inference rule.

Model contract (every network here follows it):

- ``model(x)`` with ``x`` (B, C_in, X, Y, Z) float returns a tuple of per-head logits, each
  (B, num_classes, X, Y, Z); a single-head model returns a 1-tuple.
- ``model.num_classes``: 1 → one lesion logit (sigmoid); >= 2 → softmax over classes,
  channel 0 is background.
- ``model.inference_heads``: indices of the heads whose foreground probabilities are averaged
  at inference, e.g. ``(0,)`` (first head only) or ``(0, 1)`` (mean of two heads).
- ``model.config`` (its architecture's config dataclass, see :mod:`models.registry`) and the
  network class identify the network; with
  ``model.encoder_prefixes`` and ``model.input_conv_keys`` they drive transfer loading.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "NORMS",
    "make_norm",
    "ConvNormReLU",
    "check_int",
    "check_choice",
    "unwrap_model",
    "count_parameters",
    "foreground_probability",
    "fold_batchnorm",
    "prepare_for_inference",
]

NORMS = ("batch", "group", "instance")


def make_norm(kind: str, channels: int) -> nn.Module:
    """Normalisation layer for (B, channels, X, Y, Z) features.

    kind: 'batch' (BatchNorm3d), 'group' (GroupNorm with gcd(8, channels) groups, so any
    width works: 64 channels → 8 groups, 12 → 4, 3 → 1) or 'instance' (InstanceNorm3d with
    affine weights, no running statistics).
    """
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class ConvNormReLU(nn.Sequential):
    """k³ convolution (no bias, 'same' padding) → norm → ReLU: (B, C_in, X, Y, Z) → (B, C_out, X/s, Y/s, Z/s)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm: str, stride: int = 1):
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


def check_int(name: str, value: object, minimum: int = 1) -> None:
    """Raise ValueError unless ``value`` is an int (not bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside DataParallel/DistributedDataParallel (``.module``) and
    ``torch.compile`` (``._orig_mod``) wrappers, in any nesting.

    Its ``state_dict()`` has no ``module.`` / ``_orig_mod.`` key prefixes; this is the one
    place that deals with wrappers.
    """
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (works on the meta device: no memory, no forward)."""
    return sum(p.numel() for p in model.parameters())


def _head_foreground(logits: Tensor, num_classes: int) -> Tensor:
    # (B, K, X, Y, Z) logits → (B, 1, X, Y, Z) probability of "not background".
    logits = logits.float()
    if num_classes == 1:
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=1)[:, 1:].sum(dim=1, keepdim=True)


def foreground_probability(model: nn.Module, x: Tensor) -> Tensor:
    """Apply a model's inference rule: x (B, C_in, X, Y, Z) → (B, 1, X, Y, Z) float32 probabilities.

    Per head: sigmoid of the logit when num_classes == 1, else the softmax summed over the
    non-background channels (= softmax channel 1 for two classes). The heads listed in ``model.inference_heads`` are
    averaged (ResNet 'separate': DWI head only; 'shared': mean of DWI and ADC heads).
    Gradient mode, eval mode and autocast are the caller's choice.
    """
    net = unwrap_model(model)
    heads = model(x)
    probs = [_head_foreground(heads[i], net.num_classes) for i in net.inference_heads]
    return torch.stack(probs).mean(dim=0)


def _fold_pair(conv: nn.Conv3d, norm: nn.BatchNorm3d) -> None:
    """Fold an eval-mode BatchNorm that reads ``conv``'s output into ``conv``'s weight and bias
    (float64 arithmetic): conv'(x) = norm(conv(x))."""
    scale = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    weight = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.ndim - 1)))
    conv.weight = nn.Parameter(weight.to(conv.weight), requires_grad=False)
    conv.bias = nn.Parameter(((bias - norm.running_mean.double()) * scale + norm.bias.double()).to(conv.weight), requires_grad=False)


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv3d) and isinstance(norm, nn.BatchNorm3d) and norm.affine
            and norm.track_running_stats and norm.running_mean is not None and norm.num_features == conv.out_channels)


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm3d that directly follows a Conv3d into the convolution, in place, and
    replace it by ``nn.Identity``; returns how many were folded. For an eval-mode model only
    (the fold uses the running statistics): outputs agree with the unfolded model to float32
    rounding, and inference skips one pass over each normalised activation.

    Pairs: consecutive (Conv3d, BatchNorm3d) children of an ``nn.Sequential``, and the
    (conv, norm) attribute names a module lists in ``conv_norm_pairs`` (its norm reads the
    conv's output directly, e.g. the ResNet BasicBlock's ``("conv2", "norm2")``).
    """
    if model.training:
        raise ValueError("fold_batchnorm needs an eval-mode model (model.eval())")
    folded = 0
    for module in list(model.modules()):
        pairs = list(getattr(module, "conv_norm_pairs", ()))
        if isinstance(module, nn.Sequential):
            names = [name for name, _ in module.named_children()]
            pairs += list(zip(names, names[1:]))
        for conv_name, norm_name in pairs:
            conv, norm = getattr(module, conv_name), getattr(module, norm_name)
            if _foldable(conv, norm):
                _fold_pair(conv, norm)
                setattr(module, norm_name, nn.Identity())
                folded += 1
    return folded


def prepare_for_inference(model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """``model`` made ready for :func:`foreground_probability` under ``torch.inference_mode``,
    in place (and returned): eval mode, BatchNorm folded into the convolutions
    (:func:`fold_batchnorm`), weights channels-last (``torch.channels_last_3d``, the layout
    the sliding window feeds) and on ``device`` (None: where they are). Training it afterwards
    is an error: the folded network has no BatchNorm."""
    model.eval()
    fold_batchnorm(model)
    return model.to(device=device, memory_format=torch.channels_last_3d)
