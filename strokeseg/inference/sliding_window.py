"""Whole-volume sliding-window inference with Gaussian or constant blending, mirror TTA and
fold ensembles.

A *predictor* is any callable mapping a batch of windows (B, C, wx, wy, wz) on the inference
device to foreground probabilities (B, 1, wx, wy, wz): for a model,
``lambda x: models.foreground_probability(model, x)``; for a fold ensemble,
:func:`ensemble_predictors`. This module knows nothing about models.
"""
from __future__ import annotations

import functools
import itertools
import math
import numbers
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..core.geometry import foreground_bbox
from .precision import amp_autocast, autocast_dtype

__all__ = [
    "Predictor",
    "sliding_window_inference",
    "ensemble_predictors",
    "importance_map",
    "nonzero_box",
    "crop_alignment",
]

Predictor = Callable[[torch.Tensor], torch.Tensor]

# Weight floor of the Gaussian map: window corners keep a nonzero weight, so every voxel has a
# positive total weight (the same floor as MONAI, which keeps the two comparable).
_MIN_WEIGHT = 1e-3
# The 8 subsets of the spatial axes of a (B, C, X, Y, Z) batch, identity first.
_FLIPS = [dims for k in range(4) for dims in itertools.combinations((2, 3, 4), k)]


def _window_size(window: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(window, numbers.Integral):
        size: tuple = (window,) * 3
    else:
        size = tuple(window) if isinstance(window, Sequence) else ()
    if len(size) != 3 or not all(_is_positive_int(w) for w in size):
        raise ValueError(f"window must be a positive int or 3 positive ints, got {window!r}")
    return tuple(int(w) for w in size)  # type: ignore[return-value]


def _is_positive_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def importance_map(
    window: int | Sequence[int], mode: str = "gaussian", sigma_scale: float = 0.125, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Blending weights of one window, float32 (wx, wy, wz) on ``device``.

    "constant": ones. "gaussian": exp(-d² / (2 σ²)) per axis with d the distance in voxels
    from the window centre and σ = sigma_scale * window size, multiplied over the axes (peak 1 at
    the centre), then floored at max(its minimum, 1e-3) so corners never get zero weight.
    """
    size = _window_size(window)
    if mode == "constant":
        return torch.ones(size, dtype=torch.float32, device=device)
    if mode != "gaussian":
        raise ValueError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
    if not (isinstance(sigma_scale, numbers.Real) and sigma_scale > 0 and math.isfinite(sigma_scale)):
        raise ValueError(f"sigma_scale must be a positive number, got {sigma_scale!r}")
    axes = []
    for w in size:
        d = torch.arange(w, dtype=torch.float64, device=device) - (w - 1) / 2.0
        axes.append(torch.exp(-(d**2) / (2.0 * (sigma_scale * w) ** 2)))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return weights.clamp_(min=max(weights.min().item(), _MIN_WEIGHT)).to(torch.float32)


def _axis_starts(size: int, window: int, step: int) -> list[int]:
    """Window starts along one axis: every ``step`` voxels, the last one flush with the end."""
    if size <= window:
        return [0]
    count = math.ceil((size - window) / step) + 1
    return [min(i * step, size - window) for i in range(count)]


def _weight_map(weights: torch.Tensor, starts: Sequence[list[int]], shape: Sequence[int]) -> torch.Tensor:
    """Sum of the window weights over the grid of window positions, float32 ``shape``.

    The positions are a Cartesian product of per-axis starts, so the sum is spread one axis at a
    time: far fewer additions than adding the full window map once per position.
    """
    total = weights
    for axis in range(3):
        spread_shape = list(total.shape)
        spread_shape[axis] = shape[axis]
        spread = torch.zeros(spread_shape, dtype=total.dtype, device=total.device)
        for start in starts[axis]:
            spread.narrow(axis, start, weights.shape[axis]).add_(total)
        total = spread
    return total


def _predict(predictor: Predictor, batch: torch.Tensor) -> torch.Tensor:
    """predictor(batch) as float32, checked to be (B, 1, wx, wy, wz)."""
    prob = predictor(batch)
    expected = (batch.shape[0], 1, *batch.shape[2:])
    if not isinstance(prob, torch.Tensor) or tuple(prob.shape) != expected:
        got = tuple(prob.shape) if isinstance(prob, torch.Tensor) else type(prob).__name__
        raise ValueError(f"predictor must return probabilities of shape {expected}, got {got}")
    return prob.float()


def _predict_tta(predictor: Predictor, batch: torch.Tensor) -> torch.Tensor:
    """Mean of the predictions over the 8 flips of the spatial axes, each flipped back."""
    total = _predict(predictor, batch).clone()  # the predictor's output may alias its input
    for dims in _FLIPS[1:]:
        total += _predict(predictor, batch.flip(dims)).flip(dims)
    return total.div_(len(_FLIPS))


def nonzero_box(volume: np.ndarray, align: int | Sequence[int] = 1) -> tuple[slice, slice, slice] | None:
    """Bounding box of the voxels non-zero in any channel of ``volume`` (C, X, Y, Z), as
    slices of the spatial axes; None when every voxel is zero. For a preprocessed input (0
    outside the brain) this is the brain's box.

    align: voxels per axis (an int for all three); the box grows outward until each start is a
    multiple of it and each stop lies a multiple of it before the volume's end, so that windows
    over the box start where windows over the whole volume start, up to multiples of ``align``:
    at multiples of the step from the first voxel, and the last one flush with the end (see
    :func:`crop_alignment`).
    """
    nonzero = np.any(volume != 0, axis=0)
    if not nonzero.any():
        return None
    box = foreground_bbox(nonzero, margin=0)
    multiples = _window_size(align)
    return tuple(  # type: ignore[return-value]
        slice(int(a) // k * k, n - (n - int(b)) // k * k) for (a, b), k, n in zip(box, multiples, nonzero.shape)
    )


def crop_alignment(window: int | Sequence[int], overlap: float, downsampling: int) -> tuple[int, int, int]:
    """Voxels per axis to align a crop's box to (:func:`nonzero_box`), so that the windows over
    the crop fall on the phase of a network's coarsest grid that windows over the whole volume
    fall on: gcd(window, step, downsampling) with step as in :func:`sliding_window_inference`.

    A network that sees its input on a grid ``downsampling`` voxels coarse (32 for the ResNet-18
    U-Net) answers a window moved by a voxel differently. E.g. window 96, overlap 0.5,
    downsampling 32 -> (16, 16, 16). A trained model's masks over the grown box agreed with its
    whole-volume masks at Dice 0.9976 on average, over the box as found 0.9948
    (benchmarks/README.md, "Brain crop").
    """
    if not _is_positive_int(downsampling):
        raise ValueError(f"downsampling must be a positive int, got {downsampling!r}")
    return tuple(math.gcd(w, max(1, int(w * (1 - overlap))), downsampling) for w in _window_size(window))  # type: ignore[return-value]


def _check_args(volume: torch.Tensor, overlap: float, mode: str, sw_batch_size: int) -> None:
    if volume.ndim != 4 or min(volume.shape) == 0:
        raise ValueError(f"volume must be (C, X, Y, Z) with no empty axis, got shape {tuple(volume.shape)}")
    if not (isinstance(overlap, numbers.Real) and 0 <= overlap < 1):
        raise ValueError(f"overlap must be >= 0 and < 1, got {overlap!r}")
    if mode not in ("gaussian", "constant"):
        raise ValueError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
    if not _is_positive_int(sw_batch_size):
        raise ValueError(f"sw_batch_size must be a positive int, got {sw_batch_size!r}")


def sliding_window_inference(
    volume: torch.Tensor | np.ndarray,
    predictor: Predictor,
    window: int | Sequence[int],
    overlap: float = 0.5,
    mode: str = "gaussian",
    sw_batch_size: int = 4,
    device: torch.device | str | None = None,
    mirror_tta: bool = False,
    sigma_scale: float = 0.125,
    precision: str | None = None,
) -> np.ndarray:
    """Foreground probability of a whole volume from overlapping windows.

    Args:
        volume: one case, (C, X, Y, Z), already normalised (z-scored); cast to float32.
        predictor: maps a float32 batch (B, C, wx, wy, wz) on ``device``, in channels-last
            memory format (``torch.channels_last_3d``: give a model channels-last weights too,
            ``model.to(memory_format=torch.channels_last_3d)``, for the fast convolution path), to
            foreground probabilities (B, 1, wx, wy, wz) (not logits); called under
            ``torch.inference_mode``.
        window: window size in voxels, an int or (wx, wy, wz). An axis shorter than the window
            is zero-padded (symmetrically, the extra voxel after) and cropped back afterwards.
        overlap: fraction of a window shared by neighbours, in [0, 1). Windows start every
            step = max(1, int(window * (1 - overlap))) voxels; the last one is flush with the end.
        mode: "gaussian" (centre-weighted, see :func:`importance_map`) or "constant" blending.
        sw_batch_size: windows per predictor call.
        device: where windows run and are stitched; default the volume's device. Stitching is
            always float32.
        precision: the predictor's arithmetic, one of
            :data:`strokeseg.inference.precision.PRECISIONS` ("fp32", "bf16", "auto") or None
            (default: autocast on CUDA, float32 elsewhere); see
            :func:`strokeseg.inference.precision.resolve_precision`.
        mirror_tta: average over the 8 flips of the spatial axes (8 predictor calls per batch).
        sigma_scale: Gaussian σ as a fraction of the window size.

    Returns:
        float32 numpy array (X, Y, Z): the weighted mean of the window probabilities at each
        voxel, on the CPU. Example: a (2, 197, 233, 189) volume with window 96 and overlap 0.5
        runs 4 x 4 x 3 = 48 windows and returns (197, 233, 189).
    """
    if not callable(predictor):
        raise ValueError(f"predictor must be callable, got {type(predictor).__name__}")
    volume = torch.as_tensor(volume)
    _check_args(volume, overlap, mode, sw_batch_size)
    size = _window_size(window)
    device = torch.device(device) if device is not None else volume.device
    autocast_dtype(device, precision)  # an unknown precision fails before any work
    with torch.inference_mode():
        image, pads = _pad_to_window(volume.to(device=device, dtype=torch.float32), size)
        padded = tuple(image.shape[1:])
        steps = [max(1, int(w * (1 - overlap))) for w in size]
        starts = [_axis_starts(s, w, step) for s, w, step in zip(padded, size, steps)]
        weights = importance_map(size, mode, sigma_scale, device)
        predict = functools.partial(_predict_windows, predictor, mirror_tta, device, precision)
        positions = list(itertools.product(*starts))
        total = _stitch(image, predict, size, positions, None if mode == "constant" else weights, sw_batch_size)
        total.div_(_weight_map(weights, starts, padded))
        crop = tuple(slice(pad // 2, pad // 2 + s) for pad, s in zip(pads, volume.shape[1:]))
        return total[crop].contiguous().cpu().numpy()


def _pad_to_window(image: torch.Tensor, size: tuple[int, int, int]) -> tuple[torch.Tensor, list[int]]:
    """``image`` (C, X, Y, Z) zero-padded to at least ``size`` per axis (the extra voxel after),
    and the padding per axis."""
    pads = [max(w - s, 0) for w, s in zip(size, image.shape[1:])]
    if any(pads):
        # F.pad lists the last axis first: (z_before, z_after, y_before, ...).
        image = F.pad(image, [p for pad in reversed(pads) for p in (pad // 2, pad - pad // 2)])
    return image, pads


def _predict_windows(predictor: Predictor, mirror_tta: bool, device: torch.device, precision: str | None, batch: torch.Tensor) -> torch.Tensor:
    """Probabilities (B, 1, wx, wy, wz) of a window batch under the precision's autocast."""
    with amp_autocast(device, precision):
        return (_predict_tta if mirror_tta else _predict)(predictor, batch)


def _batch_bounds(count: int, sw_batch_size: int) -> list[tuple[int, int]]:
    """(first, last) of each window batch: as few batches as ``sw_batch_size`` allows, their
    sizes differing by at most one (25 windows at 4: seven batches of 3 or 4), so that no batch holds a
    single window when more are left over. PyTorch runs a batch-1 3-D convolution with few voxels x
    channels (a U-Net's coarse levels) in its native loop instead of oneDNN, about 8x slower per
    FLOP on the CPU (benchmarks/README.md, "Roofline")."""
    batches = math.ceil(count / sw_batch_size)
    bounds = [count * i // batches for i in range(batches + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _stitch(
    image: torch.Tensor,
    predict: Callable[[torch.Tensor], torch.Tensor],
    size: tuple[int, int, int],
    positions: list[tuple[int, ...]],
    weights: torch.Tensor | None,
    sw_batch_size: int,
) -> torch.Tensor:
    """Sum over the windows at ``positions`` of weight x probability, float32 (X, Y, Z) on the
    image's device; ``weights`` None: constant (every window weight 1)."""
    total = torch.zeros(image.shape[1:], dtype=torch.float32, device=image.device)
    # One batch buffer reused for every batch: no fresh (page-faulting) allocation per batch.
    # Channels-last: oneDNN and cuDNN run 3-D convolutions several times faster in it
    # (about 2-5x on CPU for the widths used here, when the weights are channels-last too).
    buffer = torch.empty((min(sw_batch_size, len(positions)), image.shape[0], *size), device=image.device)
    buffer = buffer.contiguous(memory_format=torch.channels_last_3d)
    for first, last in _batch_bounds(len(positions), sw_batch_size):
        regions = [tuple(slice(s, s + w) for s, w in zip(position, size)) for position in positions[first:last]]
        batch = buffer[: len(regions)]
        for window_input, region in zip(batch, regions):
            window_input.copy_(image[(slice(None), *region)])
        for region, window_prob in zip(regions, predict(batch)[:, 0]):
            if weights is None:
                total[region].add_(window_prob)
            else:
                total[region].addcmul_(window_prob, weights)
    return total


def ensemble_predictors(predictors: Sequence[Predictor]) -> Predictor:
    """A predictor returning the mean float32 probability of ``predictors`` (e.g. the 5 folds)."""
    predictors = list(predictors)
    if not predictors or not all(callable(p) for p in predictors):
        raise ValueError(f"predictors must be a non-empty sequence of callables, got {predictors!r}")

    def mean_probability(batch: torch.Tensor) -> torch.Tensor:
        total = _predict(predictors[0], batch).clone()
        for predictor in predictors[1:]:
            total += _predict(predictor, batch)
        return total.div_(len(predictors))

    return mean_probability
