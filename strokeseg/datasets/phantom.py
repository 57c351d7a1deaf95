"""The synthetic phantom: pure building blocks of every generated dataset
(:mod:`strokeseg.datasets.synthetic`, :mod:`strokeseg.datasets.synthetic_isles24` may use them too).

:class:`Tissue` (label values of a phantom label map), :data:`CONTRASTS` (relative intensity of
each tissue per MR contrast), :func:`smooth_field` (cheap smooth random fields),
:func:`brain_phantom` (a tissue label map: head, CSF, grey and white matter), :func:`lesion_mask`
(irregular blobs inside the parenchyma), :func:`render` (tissue contrast, bias field, noise) and
:func:`oblique_affine` (voxel-to-world matrix). Every function draws from the generator it is
given, so a case's content depends on that generator only.
"""
from __future__ import annotations

import math
from enum import IntEnum
from typing import Mapping, Sequence

import numpy as np

from ..core.geometry import rotation_matrix

__all__ = ["Tissue", "CONTRASTS", "check_shape", "smooth_field", "oblique_affine", "blob", "brain_phantom", "extent", "draw_centre", "lesion_mask", "render"]

Shape3 = tuple[int, int, int]


class Tissue(IntEnum):
    """Labels of a phantom label map (uint8). Values >= CSF are inside the brain."""

    BACKGROUND = 0
    SCALP = 1
    SKULL = 2
    CSF = 3
    GM = 4
    WM = 5
    STROKE = 6
    CORE = 7  # BraTS label 1, non-enhancing tumour core
    OEDEMA = 8  # BraTS label 2, surrounding FLAIR hyperintensity
    ENHANCING = 9  # BraTS label 3
    CAVITY = 10  # BraTS label 4, resection cavity
    GLIOSIS = 11  # gliotic rim of a chronic stroke lesion (T1: between CSF and grey matter)


# Relative intensities per tissue (white matter about 0.8). Tissues left out render as exactly 0,
# which is how skull stripping is expressed. ADC is in 1e-3 mm^2/s.
CONTRASTS: dict[str, dict[Tissue, float]] = {
    "dwi": {Tissue.CSF: 0.3, Tissue.GM: 1.0, Tissue.WM: 0.8, Tissue.STROKE: 2.4},
    "adc": {Tissue.CSF: 3.0, Tissue.GM: 0.9, Tissue.WM: 0.75, Tissue.STROKE: 0.4},
    "flair": {
        Tissue.CSF: 0.15, Tissue.GM: 0.9, Tissue.WM: 0.7, Tissue.STROKE: 1.3,
        Tissue.CORE: 1.6, Tissue.OEDEMA: 1.9, Tissue.ENHANCING: 1.7, Tissue.CAVITY: 0.2,
    },
    "t1": {
        Tissue.CSF: 0.25, Tissue.GM: 0.55, Tissue.WM: 0.85, Tissue.STROKE: 0.3, Tissue.GLIOSIS: 0.42,
        Tissue.CORE: 0.4, Tissue.OEDEMA: 0.6, Tissue.ENHANCING: 0.55, Tissue.CAVITY: 0.2,
    },
    "t1c": {
        Tissue.CSF: 0.25, Tissue.GM: 0.55, Tissue.WM: 0.85,
        Tissue.CORE: 0.35, Tissue.OEDEMA: 0.6, Tissue.ENHANCING: 1.5, Tissue.CAVITY: 0.2,
    },
    "t2": {
        Tissue.CSF: 1.0, Tissue.GM: 0.55, Tissue.WM: 0.4,
        Tissue.CORE: 0.85, Tissue.OEDEMA: 0.8, Tissue.ENHANCING: 0.7, Tissue.CAVITY: 1.0,
    },
}


def check_shape(shape: Sequence[int], minimum: int = 8) -> Shape3:
    """``shape`` as 3 ints, each at least ``minimum`` voxels (else ValueError)."""
    values = tuple(int(s) for s in shape)
    if len(values) != 3 or min(values) < minimum:
        raise ValueError(f"shape must be 3 sizes >= {minimum} voxels, got {tuple(shape)}")
    return values  # type: ignore[return-value]


def _upsampling_matrix(n_out: int, n_coarse: int) -> np.ndarray:
    """(n_out, n_coarse) Gaussian interpolation weights, rows of unit L2 norm (unit variance out)."""
    position = (np.arange(n_out) + 0.5) * (n_coarse / n_out) - 0.5  # output voxel in coarse units
    weights = np.exp(-0.5 * ((position[:, None] - np.arange(n_coarse)[None, :]) / 0.8) ** 2)
    return (weights / np.linalg.norm(weights, axis=1, keepdims=True)).astype(np.float32)


def smooth_field(rng: np.random.Generator, shape: Sequence[int], n_coarse: int = 6) -> np.ndarray:
    """Smooth random field, (X, Y, Z) float32, standard normal at every voxel.

    A coarse ``n_coarse``^3 grid of N(0, 1) values is upsampled separably with Gaussian weights
    (features about ``shape / n_coarse`` voxels across): three small matrix products, about
    0.05 s for 197x233x189, instead of full-resolution filtering.
    """
    coarse = rng.standard_normal((n_coarse,) * 3).astype(np.float32)
    wx, wy, wz = (_upsampling_matrix(int(n), n_coarse) for n in shape)
    field = np.einsum("kc,abc->abk", wz, coarse)
    field = np.einsum("jb,abk->ajk", wy, field)
    return np.ascontiguousarray(np.einsum("ia,ajk->ijk", wx, field))


def oblique_affine(
    shape: Sequence[int],
    spacing_mm: Sequence[float],
    angles_deg: Sequence[float] = (0.0, 0.0, 0.0),
    centre_mm: Sequence[float] = (0.0, 0.0, 0.0),
    axis_signs: Sequence[int] = (1, 1, 1),
) -> np.ndarray:
    """(4, 4) float64 voxel-to-world affine (RAS, mm) of a grid of ``shape`` voxels.

    Column ``i`` of the 3x3 part is ``axis_signs[i] * spacing_mm[i]`` along world axis ``i``,
    rotated about world x, then y, then z by ``angles_deg`` (degrees). The grid's centre voxel,
    ``(shape - 1) / 2``, maps to ``centre_mm``. ``axis_signs=(-1, 1, 1)`` gives the LAS layout of
    scanner (ISLES) and FSL MNI images; BraTS uses ``(-1, -1, 1)``.
    """
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    if spacing.shape != (3,) or np.any(spacing <= 0):
        raise ValueError(f"spacing_mm must be 3 positive values, got {tuple(spacing_mm)}")
    matrix = rotation_matrix(np.deg2rad(angles_deg)) @ np.diag(spacing * np.asarray(axis_signs, dtype=np.float64))
    affine = np.eye(4)
    affine[:3, :3] = matrix
    affine[:3, 3] = np.asarray(centre_mm, dtype=np.float64) - matrix @ ((np.asarray(shape) - 1) / 2.0)
    return affine


def _normalised_radius(shape: Shape3, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """(X, Y, Z) float32 ellipsoidal radius: 1 on the ellipsoid surface."""
    axes = [((np.arange(n, dtype=np.float32) - c) / r) ** 2 for n, c, r in zip(shape, centre, radii)]
    return np.sqrt(axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :])


def blob(
    rng: np.random.Generator,
    shape: Shape3,
    centre: np.ndarray,
    radii: np.ndarray,
    n_lobes: int = 1,
    roughness: float = 0.25,
) -> tuple[tuple[slice, slice, slice], np.ndarray]:
    """Union of ``n_lobes`` ellipsoids (semi-axes ``radii`` voxels, extra lobes smaller and
    offset) around ``centre`` (voxels), their surfaces warped by ``roughness`` x a smooth field.

    Returns the bounding box as slices and the box's bool mask; the centre voxel is always set.
    Only the box is computed, so small lesions in large volumes cost almost nothing.
    """
    lobes = [(np.asarray(centre, float), np.asarray(radii, float))]
    for _ in range(n_lobes - 1):
        lobes.append((lobes[0][0] + rng.uniform(-0.8, 0.8, 3) * radii, radii * rng.uniform(0.4, 0.8, 3)))
    reach = 1.0 + 2.0 * roughness
    size = np.asarray(shape)
    low = np.clip(np.floor(np.min([c - reach * r for c, r in lobes], axis=0)), 0, size - 1).astype(int)
    high = np.clip(np.ceil(np.max([c + reach * r for c, r in lobes], axis=0)) + 1, 1, size).astype(int)
    box = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
    box_shape = tuple(int(b - a) for a, b in zip(low, high))
    mask = np.zeros(box_shape, dtype=bool)
    for c, r in lobes:
        inside = 1.0
        if roughness > 0:
            inside = np.clip(1.0 + roughness * smooth_field(rng, box_shape, 4), 0.3, reach)
        mask |= _normalised_radius(box_shape, c - low, r) < inside
    mask[tuple(np.clip(np.round(centre).astype(int), 0, size - 1) - low)] = True
    return box, mask


def brain_phantom(rng: np.random.Generator, shape: Sequence[int], radii_frac: Sequence[float]) -> np.ndarray:
    """Tissue label map of a head, (X, Y, Z) uint8 :class:`Tissue` values.

    Axes run left-right, posterior-anterior, inferior-superior. The brain is an ellipsoid with
    semi-axes ``radii_frac`` x ``shape`` (voxels), warped by a smooth field; it is wrapped in
    skull and scalp (clipped at the grid edge) and holds an outer CSF layer, a cortex of varying
    thickness, white matter, deep grey nuclei and two lateral ventricles.
    """
    shape = check_shape(shape)
    size = np.asarray(shape, dtype=np.float64)
    centre = (size - 1) / 2 + rng.uniform(-0.02, 0.02, 3) * size
    radii = np.asarray(radii_frac, dtype=np.float64) * size
    rho = _normalised_radius(shape, centre, radii)
    rho *= 1.0 + 0.06 * smooth_field(rng, shape, 4)
    cortex = rho + 0.03 * smooth_field(rng, shape, 12)
    white = rho + 0.05 * smooth_field(rng, shape, 8)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[rho < 1.25] = Tissue.SCALP
    labels[rho < 1.15] = Tissue.SKULL
    brain = rho < 1.0
    labels[brain] = Tissue.CSF
    labels[brain & (cortex < 0.95)] = Tissue.GM
    labels[brain & (white < 0.78)] = Tissue.WM
    for side in (-1.0, 1.0):
        nuclei = centre + radii * np.array([0.22 * side, 0.0, 0.0])
        box, mask = blob(rng, shape, nuclei, radii * np.array([0.1, 0.16, 0.12]), roughness=0.1)
        labels[box][mask] = Tissue.GM
        ventricle = centre + radii * np.array([0.09 * side, -0.05, 0.12])
        box, mask = blob(rng, shape, ventricle, radii * np.array([0.06, 0.3, 0.1]), roughness=0.1)
        labels[box][mask] = Tissue.CSF
    return labels


def extent(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre and half-extent (voxels) of the bounding box of the allowed region (bool mask)."""
    if not mask.any():
        raise ValueError("no voxel where a lesion may lie (empty parenchyma)")
    first, last = [], []
    for axis in range(3):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        first.append(hits[0])
        last.append(hits[-1])
    first_a, last_a = np.asarray(first, float), np.asarray(last, float)
    return (first_a + last_a) / 2, (last_a - first_a + 1) / 2


def draw_centre(rng: np.random.Generator, allowed: np.ndarray, spread: float) -> np.ndarray:
    """A voxel of ``allowed`` (voxel coordinates, float), drawn uniformly from the ellipsoid of
    ``spread`` x the mask's bounding box; falls back to any allowed voxel."""
    centre, half = extent(allowed)
    for _ in range(100):
        direction = rng.standard_normal(3)
        offset = direction / np.linalg.norm(direction) * rng.uniform() ** (1 / 3)
        voxel = np.round(centre + spread * half * offset).astype(int)
        if allowed[tuple(voxel)]:
            return voxel.astype(float)
    return np.asarray(np.unravel_index(rng.choice(np.flatnonzero(allowed)), allowed.shape), dtype=float)


def lesion_mask(
    rng: np.random.Generator,
    allowed: np.ndarray,
    n_lesions: int,
    size_frac: tuple[float, float] = (0.04, 0.4),
    min_radius: float = 1.0,
) -> np.ndarray:
    """Union of ``n_lesions`` irregular blobs inside ``allowed``, (X, Y, Z) bool.

    allowed: (X, Y, Z) bool, where lesions may lie (the parenchyma). Each blob is 1-3 warped
    ellipsoids around a centre drawn inside ``allowed``; its semi-axes are a log-uniform
    fraction in ``size_frac`` of the allowed region's half-extent per axis (at least
    ``min_radius`` voxels), so sizes run from a few voxels to a large territory. Blobs may touch
    and merge. ``n_lesions=0`` gives an empty mask.
    """
    if n_lesions < 0:
        raise ValueError(f"n_lesions must be >= 0, got {n_lesions}")
    lesion = np.zeros(allowed.shape, dtype=bool)
    if n_lesions == 0:
        return lesion
    _, half = extent(allowed)
    for _ in range(n_lesions):
        centre = draw_centre(rng, allowed, 0.75)
        frac = math.exp(rng.uniform(math.log(size_frac[0]), math.log(size_frac[1])))
        radii = np.maximum(frac * half * rng.uniform(0.7, 1.3, 3), min_radius)
        box, mask = blob(rng, allowed.shape, centre, radii, n_lobes=int(rng.integers(1, 4)))
        lesion[box] |= mask & allowed[box]
    return lesion


def render(
    rng: np.random.Generator,
    labels: np.ndarray,
    contrast: Mapping[Tissue, float],
    noise_sd: float,
    bias_sd: float = 0.1,
) -> np.ndarray:
    """MR-like image of a label map, (X, Y, Z) float32 in the units of ``contrast``.

    Each voxel is ``contrast[label]`` x a smooth multiplicative field (bias ``bias_sd`` plus a
    faint tissue texture) + Gaussian noise of ``noise_sd``. Tissues missing from ``contrast``
    (background, and skull and scalp for skull-stripped images) are exactly 0.
    """
    table = np.zeros(len(Tissue), dtype=np.float32)
    for tissue, value in contrast.items():
        table[tissue] = value
    base = table[labels]
    gain = 1.0 + bias_sd * smooth_field(rng, labels.shape, 3)
    gain += 0.03 * smooth_field(rng, labels.shape, 12)
    image = base * gain
    image += np.float32(noise_sd) * rng.standard_normal(labels.shape, dtype=np.float32)
    image[base == 0] = 0
    return image
