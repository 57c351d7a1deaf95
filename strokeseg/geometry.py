"""Intensity and geometry operations on 3-D volumes (X, Y, Z), shared by the preprocessing stages.

Resampling uses voxel-centre alignment (PyTorch ``align_corners=False``): trilinear for images,
``nearest-exact`` for label maps, so masks are never interpolated and re-thresholded. The same
convention maps predictions back (:func:`uncrop_to_native`), which makes the round trip exact
up to the resampling itself.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .io import CaseError

__all__ = [
    "as_binary_mask",
    "foreground_bbox",
    "crop",
    "resample_to_shape",
    "spacing_to_shape",
    "rescale_affine",
    "zscore",
    "clip_percentile",
    "uncrop_to_native",
]

Shape3 = tuple[int, int, int]


def as_binary_mask(data: np.ndarray, path: str | Path) -> np.ndarray:
    """Return a {0,1} label volume as uint8; raise :class:`CaseError` naming ``path`` otherwise."""
    values = np.unique(data)
    if not np.isin(values, (0, 1)).all():
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if values.size > 6 else "")
        raise CaseError(f"{path}: mask values must be 0/1, found {{{shown}}}")
    return data.astype(np.uint8)


def foreground_bbox(image: np.ndarray, margin: int, path: str | Path = "image") -> np.ndarray:
    """Bounding box of the non-zero voxels, grown by ``margin`` voxels and clipped to the volume.

    Returns an int64 array (3, 2) of [start, stop) per axis. Raises :class:`CaseError` when the
    image has no non-zero voxel (an empty brain).
    """
    nonzero = np.nonzero(image)
    if nonzero[0].size == 0:
        raise CaseError(f"{path}: empty brain (no non-zero voxel)")
    starts = [max(int(ax.min()) - margin, 0) for ax in nonzero]
    stops = [min(int(ax.max()) + 1 + margin, size) for ax, size in zip(nonzero, image.shape)]
    return np.array(list(zip(starts, stops)), dtype=np.int64)


def crop(volume: np.ndarray, bbox: np.ndarray) -> np.ndarray:
    """Cut ``volume`` (X, Y, Z) to ``bbox`` (3, 2) [start, stop); returns a view."""
    return volume[tuple(slice(int(a), int(b)) for a, b in bbox)]


def resample_to_shape(
    volume: np.ndarray | torch.Tensor, shape: Shape3, is_label: bool, device: torch.device | None = None
) -> np.ndarray:
    """Resample a 3-D volume to ``shape`` with voxel-centre alignment.

    Images: trilinear, returned as float32. Labels (``is_label``): nearest neighbour, returned in
    the input dtype. Runs on ``device`` (CPU when None); the result is a NumPy array on the CPU.
    """
    shape = tuple(int(s) for s in shape)
    src = torch.as_tensor(np.asarray(volume) if not torch.is_tensor(volume) else volume)
    out_dtype = src.dtype
    if tuple(src.shape) == shape:
        return src.cpu().numpy() if is_label else src.cpu().numpy().astype(np.float32, copy=False)
    x = src.to(device=device, dtype=torch.float32)[None, None]
    if is_label:
        y = F.interpolate(x, size=shape, mode="nearest-exact")[0, 0].to(out_dtype)
    else:
        y = F.interpolate(x, size=shape, mode="trilinear", align_corners=False)[0, 0]
    return y.cpu().numpy()


def spacing_to_shape(shape: Shape3, zooms: tuple[float, ...], target_spacing: tuple[float, ...]) -> Shape3:
    """Grid shape that covers the same field of view at ``target_spacing`` (mm, array axis order)."""
    return tuple(max(1, int(round(n * z / t))) for n, z, t in zip(shape, zooms, target_spacing))


def rescale_affine(affine: np.ndarray, old_shape: Shape3, new_shape: Shape3) -> np.ndarray:
    """Affine of a resampled grid covering the same field of view (voxel-centre alignment).

    Column j is scaled by old/new size; the origin moves so that voxel edges, not centres, of the
    two grids coincide, which is what :func:`resample_to_shape` assumes.
    """
    scale = np.array(old_shape, dtype=np.float64) / np.array(new_shape, dtype=np.float64)
    out = np.array(affine, dtype=np.float64, copy=True)
    out[:3, :3] = affine[:3, :3] * scale[None, :]
    out[:3, 3] = affine[:3, :3] @ (0.5 * (scale - 1.0)) + affine[:3, 3]
    return out


def zscore(volume: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Z-score ``volume`` over ``mask`` (default: its non-zero voxels); voxels outside become 0.

    Returns float32 (X, Y, Z). A constant region (std 0) is only centred, never divided by 0.
    """
    region = volume != 0 if mask is None else mask.astype(bool)
    out = np.zeros(volume.shape, dtype=np.float32)
    values = volume[region].astype(np.float64)
    if values.size == 0:
        return out
    std = values.std()
    out[region] = ((values - values.mean()) / (std if std > 0 else 1.0)).astype(np.float32)
    return out


def clip_percentile(volume: np.ndarray, mask: np.ndarray, percentile: float) -> np.ndarray:
    """Clip ``volume`` to [p_low, p_high] of the voxels in ``mask``, p_high = ``percentile``,
    p_low = 100 - ``percentile`` (e.g. 0.5 and 99.5). Returns float32."""
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"clip percentile must be in (50, 100], got {percentile}")
    values = volume[mask.astype(bool)]
    if values.size == 0:
        return volume.astype(np.float32)
    low, high = np.percentile(values, [100.0 - percentile, percentile])
    return np.clip(volume, low, high).astype(np.float32)


def uncrop_to_native(
    volume: np.ndarray, bbox: np.ndarray, cropped_shape: Shape3, original_shape: Shape3, is_label: bool
) -> np.ndarray:
    """Map a volume from the resampled crop back onto the native grid.

    ``volume`` (e.g. a 96³ probability map or mask) is resampled to ``cropped_shape`` and pasted
    at ``bbox`` (3, 2) into zeros of ``original_shape``. Probabilities: pass ``is_label=False``
    (trilinear) and threshold afterwards; masks: ``is_label=True``.
    """
    if tuple(int(b - a) for a, b in bbox) != tuple(int(s) for s in cropped_shape):
        raise ValueError(f"bbox {bbox.tolist()} does not match cropped shape {tuple(cropped_shape)}")
    restored = resample_to_shape(volume, cropped_shape, is_label=is_label)
    out = np.zeros(tuple(int(s) for s in original_shape), dtype=restored.dtype)
    out[tuple(slice(int(a), int(b)) for a, b in bbox)] = restored
    return out
