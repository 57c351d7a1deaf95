"""Patch sampling and extraction on full volumes, for the patch stage and for training.

Conventions (every function): a patch of size P around centre ``c`` (voxel indices, int64,
array axis order) covers ``[c - P // 2, c - P // 2 + P)`` on each axis. The centre samplers
return centres whose window lies inside the volume wherever the volume is at least P long
(:func:`clamp_centers`); on a shorter axis the volume sits in the middle of the window.
:func:`extract_patch` fills any part of the window outside the volume with 0, which is the
value of the z-scored background outside the brain (and "no lesion" in masks). Storing the
centres is therefore enough to cut the same patch again.

Randomness comes only from the ``rng`` argument; :func:`case_rng` derives it from
``(seed, case_id)`` with SHA-256, so a case gets the same patches whatever the processing
order, batch or number of workers.
"""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np

from ..core.case import Case
from ..core.geometry import as_binary_mask, crop, foreground_bbox
from ..core.io import CaseError, load_npz, read_json, save_npz
from ..core.runner import CaseResult

__all__ = [
    "PATCH_KEYS",
    "CENTERS_ONLY_KEYS",
    "stored_case",
    "case_rng",
    "clamp_centers",
    "lesion_fraction",
    "lesion_centers",
    "window_counts",
    "best_window_center",
    "tissue_centers",
    "random_centers",
    "extract_patch",
    "extract_patches",
    "extract_case_patches",
]

PATCH_KEYS = ("patches", "masks", "centers", "original_shape", "spacing", "lesion_volume", "patient_id", "patch_kind")
# --centers-only: what training reads (strokeseg.training.data.read_stored_centres), plus the kind for the stage's summary
CENTERS_ONLY_KEYS = ("centers", "original_shape", "patch_kind")
_CHUNK = 4096  # candidate centres scored per vectorised step


def case_rng(seed: int, case_id: str) -> np.random.Generator:
    """Generator for one case from ``(seed, case_id)`` via SHA-256 (stable across runs and
    processes, unlike Python's salted ``hash``)."""
    digest = hashlib.sha256(f"{int(seed)}\x00{case_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _check_patch_size(patch_size: int) -> int:
    if int(patch_size) != patch_size or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size}")
    return int(patch_size)


def clamp_centers(centers: np.ndarray, shape: tuple[int, ...], patch_size: int) -> np.ndarray:
    """Move centres (N, 3) so their P-windows lie inside a volume of ``shape`` (X, Y, Z).

    On an axis shorter than P the centre is fixed so the volume sits in the window's middle.
    Returns int64 (N, 3).
    """
    p = _check_patch_size(patch_size)
    half = p // 2
    out = np.array(centers, dtype=np.int64).reshape(-1, 3)
    for axis, size in enumerate(shape[-3:]):
        if size >= p:
            out[:, axis] = np.clip(out[:, axis], half, size - p + half)
        else:
            out[:, axis] = half - (p - size) // 2
    return out


class _WindowCounter:
    """Counts foreground voxels of a binary volume in many P-windows with an integral image.

    The cumulative sum covers only the bounding box of the foreground (windows are clipped to
    it), so one count is 8 look-ups whatever P, and the set-up costs one pass over the box.
    """

    def __init__(self, mask: np.ndarray) -> None:
        if not mask.any():
            self.origin = np.zeros(3, dtype=np.int64)
            self.cum = np.zeros((1, 1, 1), dtype=np.int64)
            return
        bbox = foreground_bbox(mask, margin=0)
        self.origin = bbox[:, 0]
        box = crop(mask, bbox).astype(bool)
        dtype = np.int32 if box.size < 2**31 else np.int64
        self.cum = np.zeros(tuple(s + 1 for s in box.shape), dtype=dtype)
        self.cum[1:, 1:, 1:] = box.cumsum(0, dtype=dtype).cumsum(1).cumsum(2)

    def count(self, starts: np.ndarray, patch_size: int) -> np.ndarray:
        """Foreground voxels in the windows ``[start, start + P)``; starts (N, 3) -> (N,) int64."""
        limit = np.array(self.cum.shape, dtype=np.int64) - 1
        lo = np.clip(starts - self.origin, 0, limit)
        hi = np.clip(starts + patch_size - self.origin, 0, limit)
        total = np.zeros(len(starts), dtype=np.int64)
        for corner in range(8):
            pick = [(corner >> axis) & 1 for axis in range(3)]
            idx = tuple(np.where(pick[a], hi[:, a], lo[:, a]) for a in range(3))
            sign = -1 if (3 - sum(pick)) % 2 else 1  # inclusion-exclusion over the 8 corners
            total += sign * self.cum[idx].astype(np.int64)
        return total


def lesion_fraction(mask: np.ndarray, centers: np.ndarray, patch_size: int) -> np.ndarray:
    """Share of each P-window (N,) float64 that is lesion: lesion voxels / P³ (voxels outside
    the volume count as non-lesion). mask: (X, Y, Z) binary; centers: (N, 3)."""
    p = _check_patch_size(patch_size)
    starts = np.asarray(centers, dtype=np.int64).reshape(-1, 3) - p // 2
    return _WindowCounter(mask).count(starts, p) / float(p**3)


def _unique_rows(rows: np.ndarray, limit: int) -> np.ndarray:
    """First ``limit`` distinct rows of (N, 3), in their order."""
    _, first = np.unique(rows, axis=0, return_index=True)
    return rows[np.sort(first)][:limit]


def _moving_sum(volume: np.ndarray, p: int, axis: int) -> np.ndarray:
    """Sums of ``p`` consecutive entries along ``axis`` (length n -> n - p + 1), int32, exact."""
    cum = np.cumsum(volume, axis=axis, dtype=np.int32)
    lead = (slice(None),) * axis
    out = cum[lead + (slice(p - 1, None),)].copy()
    out[lead + (slice(1, None),)] -= cum[lead + (slice(None, -p),)]
    return out


def window_counts(mask: np.ndarray, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Lesion voxels in every P-window inside the volume that can touch the lesion (a box filter).

    mask: (X, Y, Z) binary with at least one non-zero voxel. Returns ``counts`` (A, B, C) int32
    and ``start`` (3,) int64: ``counts[i, j, k]`` is the number of lesion voxels in the window
    starting at ``start + (i, j, k)``. Windows are the ones :func:`clamp_centers` allows (an axis
    shorter than P has the single centred window); windows that cannot reach the lesion's
    bounding box are left out. Three cumulative-sum passes over the box grown by P - 1. Raises
    ValueError for a mask without lesion.
    """
    p = _check_patch_size(patch_size)
    if not mask.any():
        raise ValueError("mask has no lesion voxel")
    region = foreground_bbox(mask, margin=p - 1)
    counts = crop(mask, region).astype(bool)
    start = region[:, 0].copy()
    for axis, size in enumerate(mask.shape):
        if size >= p:
            counts = _moving_sum(counts, p, axis)
        else:  # the one window covers the whole axis
            counts = counts.sum(axis=axis, keepdims=True, dtype=np.int32)
            start[axis] = -((p - size) // 2)
    return counts, start


def best_window_center(mask: np.ndarray, patch_size: int) -> np.ndarray:
    """Centre (3,) int64 of the P-window inside the volume holding the most lesion voxels.

    Among windows holding as many, the one whose centre is nearest to the centroid of the lesion
    voxels in the first such window (C order): a single focus sits in the middle of its window,
    and of several foci too far apart for one window, the window holds the largest group whole.
    The window holds at least one lesion voxel. Raises ValueError for a mask without lesion.
    """
    p = _check_patch_size(patch_size)
    counts, start = window_counts(mask, p)
    ties = np.argwhere(counts == counts.max())
    first = np.stack([start + ties[0], start + ties[0] + p], axis=1).clip(0, np.array(mask.shape)[:, None])
    centroid = first[:, 0] + np.argwhere(crop(mask, first)).mean(axis=0)
    centers = start + ties + p // 2
    return centers[np.argmin(((centers - centroid) ** 2).sum(axis=1))]


def lesion_centers(
    mask: np.ndarray, n: int, patch_size: int, min_overlap: float, rng: np.random.Generator
) -> tuple[np.ndarray, bool]:
    """Up to ``n`` distinct centres (N, 3) int64 of P-windows whose lesion fraction is at least
    ``min_overlap`` (see :func:`lesion_fraction`), and whether the fallback was used.

    Candidates are lesion voxels taken in a uniformly random order (no bias to low indices),
    moved inside the volume (:func:`clamp_centers`) and rejected when their window fails the
    rule. When no window can pass (a lesion too small or too scattered for the rule), the result
    is the single window holding the most lesion voxels (:func:`best_window_center`; never the
    centroid of all lesion voxels, which between two foci can hold none) and ``used_fallback``
    is True. Raises ValueError when the mask has no lesion voxel (use :func:`tissue_centers`).
    """
    p = _check_patch_size(patch_size)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= min_overlap <= 1.0:
        raise ValueError(f"min_overlap must be in [0, 1], got {min_overlap}")
    voxels = np.flatnonzero(mask)
    if voxels.size == 0:
        raise ValueError("mask has no lesion voxel; sample with tissue_centers instead")
    accepted = np.zeros((0, 3), dtype=np.int64)
    if voxels.size >= min_overlap * p**3:  # otherwise no window can reach the rule
        counter = _WindowCounter(mask)
        order = rng.permutation(voxels.size)
        for start in range(0, order.size, max(_CHUNK, 8 * n)):
            flat = voxels[order[start : start + max(_CHUNK, 8 * n)]]
            candidates = clamp_centers(np.stack(np.unravel_index(flat, mask.shape), axis=1), mask.shape, p)
            passed = candidates[counter.count(candidates - p // 2, p) >= min_overlap * p**3]
            accepted = _unique_rows(np.concatenate([accepted, passed]), n)
            if len(accepted) == n:
                break
    if len(accepted):
        return accepted, False
    return best_window_center(mask, p)[None], True


def tissue_centers(brain_mask: np.ndarray, n: int, patch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``n`` distinct centres (N, 3) int64 at brain voxels drawn uniformly without
    replacement, moved inside the volume. Raises ValueError for an empty ``brain_mask``."""
    p = _check_patch_size(patch_size)
    voxels = np.flatnonzero(brain_mask)
    if voxels.size == 0:
        raise ValueError("brain mask is empty")
    flat = voxels[rng.choice(voxels.size, size=min(n, voxels.size), replace=False)]
    centers = clamp_centers(np.stack(np.unravel_index(flat, brain_mask.shape), axis=1), brain_mask.shape, p)
    return _unique_rows(centers, n)


def random_centers(shape: tuple[int, int, int], n: int, patch_size: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` centres (N, 3) int64 drawn uniformly over all windows inside a volume of ``shape``
    (a fixed middle position on axes shorter than P)."""
    p = _check_patch_size(patch_size)
    half = p // 2
    columns = [
        rng.integers(half, size - p + half, size=n, endpoint=True) if size >= p else np.full(n, half - (p - size) // 2)
        for size in shape
    ]
    return np.stack(columns, axis=1).astype(np.int64)


def _copy_window(volume: np.ndarray, center: np.ndarray, p: int, out: np.ndarray) -> None:
    """Write the P³ window around ``center`` of ``volume`` (..., X, Y, Z) into ``out`` (..., P, P, P),
    zero-filling whatever lies outside the volume."""
    start = np.asarray(center, dtype=np.int64) - p // 2
    src, dst = [], []
    for axis, size in enumerate(volume.shape[-3:]):
        a, b = max(int(start[axis]), 0), min(int(start[axis]) + p, size)
        if b <= a:
            out[...] = 0
            return
        src.append(slice(a, b))
        dst.append(slice(a - int(start[axis]), b - int(start[axis])))
    if any(d.start > 0 or d.stop < p for d in dst):
        out[...] = 0
    out[(..., *dst)] = volume[(..., *src)]


def extract_patch(volume: np.ndarray, center: np.ndarray, patch_size: int) -> np.ndarray:
    """The P³ window around ``center`` (3,) from ``volume`` (..., X, Y, Z): shape (..., P, P, P),
    same dtype; parts outside the volume are 0."""
    p = _check_patch_size(patch_size)
    out = np.empty(volume.shape[:-3] + (p, p, p), dtype=volume.dtype)
    _copy_window(volume, center, p, out)
    return out


def extract_patches(volume: np.ndarray, centers: np.ndarray, patch_size: int) -> np.ndarray:
    """Stack of :func:`extract_patch` for centres (N, 3): shape (N, ..., P, P, P)."""
    p = _check_patch_size(patch_size)
    centers = np.asarray(centers, dtype=np.int64).reshape(-1, 3)
    out = np.empty((len(centers),) + volume.shape[:-3] + (p, p, p), dtype=volume.dtype)
    for i, center in enumerate(centers):
        _copy_window(volume, center, p, out[i])
    return out


# --------------------------------------------------------------------------- one case


def stored_case(case_id: str, npz: Path | None, metadata: Path) -> Case:
    """One preprocessed case to cut patches from: ``sources`` its ``npz`` (``<case>.npz``; None
    when a splits file names a case that has none) and its ``metadata`` (``<case>_metadata.json``)
    from ``preprocess_stroke_foundation.py``."""
    return Case(case_id, sources={"npz": npz, "metadata": metadata})


def _skipped(case_id: str, out_path: Path, keys: tuple[str, ...]) -> CaseResult:
    """A finished case, or CaseError when its file holds other keys than this run writes (it
    was written with or without ``--centers-only``: another setting, replaced only by --overwrite)."""
    kind = str(load_npz(out_path, keys=("patch_kind",))["patch_kind"])
    with zipfile.ZipFile(out_path) as archive:
        stored = sorted(name.removesuffix(".npy") for name in archive.namelist())
    if set(stored) != set(keys):
        raise CaseError(
            f"{out_path}: holds {stored} but this run writes {sorted(keys)} (--centers-only differs from "
            "the run that wrote it); use --overwrite to replace it"
        )
    return CaseResult(case_id, "skipped", reason="output exists (use --overwrite)", info={"patch_kind": kind})


def _load_case(item: Case) -> tuple[dict[str, np.ndarray], list[float]]:
    """``image``, ``lesion_mask`` (binary) and ``brain_mask`` (X, Y, Z) of one case, checked, and
    its spacing (mm) from the metadata JSON."""
    npz, metadata = item.source("npz"), item.source("metadata")
    data = load_npz(npz, keys=("image", "lesion_mask", "brain_mask"))
    data["lesion_mask"] = as_binary_mask(data["lesion_mask"], npz)
    if len({v.shape for v in data.values()}) != 1 or data["image"].ndim != 3:
        shapes = {k: v.shape for k, v in data.items()}
        raise CaseError(f"{npz}: image, lesion_mask and brain_mask must be equal 3-D shapes, got {shapes}")
    spacing = read_json(metadata).get("spacing")
    if not isinstance(spacing, list) or len(spacing) != 3:
        raise CaseError(f"{metadata}: 'spacing' must be a list of 3 numbers (mm), got {spacing!r}")
    return data, spacing


def _case_centers(
    data: dict[str, np.ndarray], item: Case, patch_size: int, max_patches: int, min_overlap: float, rng: np.random.Generator
) -> tuple[np.ndarray, str]:
    """Centres (N, 3) int64 of one case and their ``patch_kind`` (see :func:`extract_case_patches`)."""
    if data["lesion_mask"].any():
        centers, fallback = lesion_centers(data["lesion_mask"], max_patches, patch_size, min_overlap, rng)
        return centers, "fallback" if fallback else "lesion"
    if not data["brain_mask"].any():
        raise CaseError(f"{item.source('npz')}: no lesion and an empty brain_mask: nothing to sample")
    return tissue_centers(data["brain_mask"], max_patches, patch_size, rng), "tissue"


def extract_case_patches(
    item: Case,
    output_dir: Path,
    patch_size: int,
    max_patches: int,
    min_overlap: float,
    seed: int,
    overwrite: bool,
    compress: bool = True,
    centers_only: bool = False,
) -> CaseResult:
    """Cut up to ``max_patches`` P³ patches from one case and write ``<case>.npz``.

    Lesion cases: :func:`lesion_centers` (every window has lesion fraction >= ``min_overlap``,
    or the single window holding the most lesion voxels: ``patch_kind`` "fallback").
    Lesion-free cases: windows at brain voxels (:func:`tissue_centers`, ``patch_kind``
    "tissue"). Randomness from :func:`case_rng` (``seed``, case id).

    Keys (:data:`PATCH_KEYS`, the paper's): ``patches`` (N, P, P, P) float32, ``masks`` (N, P, P, P)
    uint8, ``centers`` (N, 3) int64 voxel indices into the full volume, ``original_shape`` (3,)
    int64 full-volume shape, ``spacing`` (3,) float64 mm, ``lesion_volume`` int64 lesion voxels
    of the full volume, ``patient_id`` and ``patch_kind`` ("lesion", "fallback" or "tissue")
    unicode scalars. ``centers_only`` writes :data:`CENTERS_ONLY_KEYS` (what training reads, plus
    ``patch_kind``): the same centres in a few hundred bytes instead of ~55 MB per case at 96³.
    ``compress=False`` writes a stored .npz: about 1.5x the disk space, about 10x faster to
    write, and its members can be memory-mapped (:func:`strokeseg.core.io.load_npz_mmap`).
    """
    out_path = output_dir / f"{item.case_id}.npz"
    keys = CENTERS_ONLY_KEYS if centers_only else PATCH_KEYS
    if item.source("npz") is None:
        raise CaseError(f"{item.case_id}: listed in the splits file but no {item.case_id}.npz in the input folder")
    if out_path.exists() and not overwrite:
        return _skipped(item.case_id, out_path, keys)
    data, spacing = _load_case(item)
    lesion = data["lesion_mask"]
    centers, kind = _case_centers(data, item, patch_size, max_patches, min_overlap, case_rng(seed, item.case_id))
    masks = extract_patches(lesion, centers, patch_size)
    arrays = {
        "masks": masks,
        "centers": centers,
        "original_shape": np.array(lesion.shape, dtype=np.int64),
        "spacing": np.array(spacing, dtype=np.float64),
        "lesion_volume": np.int64(lesion.sum()),
        "patient_id": np.array(item.case_id),
        "patch_kind": np.array(kind),
    }
    if not centers_only:
        arrays["patches"] = extract_patches(data["image"].astype(np.float32, copy=False), centers, patch_size)
    save_npz(out_path, {key: arrays[key] for key in keys}, compress=compress)
    fractions = np.count_nonzero(masks.reshape(len(masks), -1), axis=1) / float(patch_size**3)
    info = {"patch_kind": kind, "n_patches": len(centers), "min_lesion_fraction": float(fractions.min())}
    return CaseResult(item.case_id, "done", info=info)
