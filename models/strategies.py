"""The ISLES input strategies over any encoder-decoder network and any list of modalities.

A network offers the strategies when its config dataclass has a ``variant`` field (one of
:data:`STRATEGIES`) and it lays itself out with :func:`attach` and runs with :func:`forward`.
It supplies two module factories, which is all a strategy needs of it:

- ``make_encoder(in_channels)``: a module mapping x (B, in_channels, X, Y, Z) to a tuple of
  feature maps, with an attribute ``input_conv_key`` naming (relative to the encoder) the first
  convolution's weight (B-independent; transfer loading inflates it);
- ``make_decoder()``: a module mapping ``(features, size)`` to logits (B, num_classes, *size).

With N input channels (the modalities in order, e.g. [DWI, ADC] for ISLES 2022 or
[NCCT, CBF, CBV, MTT, Tmax] for ISLES 2024):

- 'single': one encoder and one decoder on the N stacked channels; one head.
- 'dwi_only': 'single' on the first modality alone (N = 1); kept as its own name because the
  paper's runs and checkpoints use it.
- 'separate': N independent encoder-decoders, channel i feeds network i (head i); every head is
  trained with the lesion mask, inference uses head 0 (the first modality) only.
- 'shared': one encoder on the N stacked channels and N decoders (head i "modality i"), each
  supervised with the lesion mask; inference averages the N heads.

State-dict layout: ``encoders.<i>.<encoder keys>`` and ``decoders.<i>.<decoder keys>``, the
keys the ResNet-18 U-Net has always had, so its checkpoints load unchanged; transfer loading
(:func:`models.load_pretrained`) reads branch 0 of a one-branch source into every branch.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

__all__ = ["STRATEGIES", "ISLES_STRATEGIES", "resolve_in_channels", "attach", "forward"]

STRATEGIES = ("single", "dwi_only", "separate", "shared")
ISLES_STRATEGIES = tuple(s for s in STRATEGIES if s != "single")  # the ISLES arms; 'single' is the stroke datasets' one-channel model
_MULTI_HEAD = ("separate", "shared")  # one head per modality


def resolve_in_channels(strategy: str, in_channels: int | None) -> int:
    """Input channels of ``strategy``: ``in_channels`` checked, or its default when None
    (2 for 'separate' and 'shared', else 1). 'dwi_only' needs 1 channel, 'separate' and 'shared'
    at least 2 (one per modality); anything else is a ValueError naming the strategy."""
    if strategy not in STRATEGIES:
        raise ValueError(f"variant must be one of {STRATEGIES}, got {strategy!r}")
    if in_channels is None:
        return 2 if strategy in _MULTI_HEAD else 1
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be an integer >= 1, got {in_channels!r}")
    if strategy == "dwi_only" and in_channels != 1:
        raise ValueError(f"variant 'dwi_only' needs in_channels=1, got {in_channels}")
    if strategy in _MULTI_HEAD and in_channels < 2:
        raise ValueError(f"variant {strategy!r} needs in_channels >= 2 (one per modality), got {in_channels}")
    return in_channels


def attach(
    net: nn.Module,
    strategy: str,
    in_channels: int,
    make_encoder: Callable[[int], nn.Module],
    make_decoder: Callable[[], nn.Module],
) -> None:
    """Give ``net`` (in its ``__init__``) the layout of ``strategy`` over ``in_channels``
    modalities: ``net.encoders`` and ``net.decoders`` (ModuleLists), ``net.inference_heads``,
    ``net.encoder_prefixes`` and ``net.input_conv_keys`` (the transfer metadata of
    :mod:`models.common`)."""
    in_channels = resolve_in_channels(strategy, in_channels)
    separate = strategy == "separate"
    heads = in_channels if strategy in _MULTI_HEAD else 1
    net.encoders = nn.ModuleList(make_encoder(1 if separate else in_channels) for _ in range(heads if separate else 1))
    net.decoders = nn.ModuleList(make_decoder() for _ in range(heads))
    net.inference_heads = tuple(range(heads)) if strategy == "shared" else (0,)
    net.encoder_prefixes = ("encoders.",)
    net.input_conv_keys = tuple(f"encoders.{i}.{enc.input_conv_key}" for i, enc in enumerate(net.encoders))


def forward(net: nn.Module, strategy: str, x: Tensor) -> tuple[Tensor, ...]:
    """Run a network laid out by :func:`attach`: x (B, N, X, Y, Z) float → tuple of logits
    (B, num_classes, X, Y, Z), one per head ('separate': channel i through network i)."""
    in_channels = net.config.in_channels
    if x.ndim != 5 or x.shape[1] != in_channels:
        raise ValueError(f"expected input (B, {in_channels}, X, Y, Z), got {tuple(x.shape)}")
    size = tuple(x.shape[2:])
    if strategy == "separate":
        branches = enumerate(zip(net.encoders, net.decoders))
        return tuple(dec(enc(x[:, i : i + 1]), size) for i, (enc, dec) in branches)
    features = net.encoders[0](x)
    return tuple(dec(features, size) for dec in net.decoders)
