"""ATLAS v2.0 / UOA full-volume preprocessing ("stroke foundation"): config, discovery, one case.

The paper's ``config.json`` drives it (see :func:`parse_config` for the schema). Per dataset,
images and masks are found by glob patterns under ``data_dir`` and paired by case id
(:func:`case_id_from_filename`). Per case: optional resampling to ``target_spacing``, a brain
mask, percentile clipping and z-scoring inside the brain; output ``<case>.npz`` plus
``<case>_metadata.json`` (see :func:`preprocess_foundation_case`).
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ..core.geometry import (
    as_binary_mask,
    c_order_view,
    clip_between,
    foreground_bbox,
    percentile_bounds,
    rescale_affine,
    resample_to_shape,
    spacing_to_shape,
    zscore,
)
from ..core.case import Image
from ..core.io import CaseError, check_finite, check_same_grid, glob_files, load_image, load_nifti, load_npz, npz_member_crcs, read_json, save_npz, write_json
from ..core.runner import CaseResult
from .fingerprint import case_fingerprint
from .registry import DatasetSpec, EvalCase, register_dataset, settings_from_run_args

__all__ = [
    "PreprocessingConfig",
    "DatasetConfig",
    "FoundationConfig",
    "FoundationItem",
    "FOUNDATION_KEYS",
    "ID_MARKERS",
    "parse_config",
    "load_config",
    "case_id_from_filename",
    "discover_foundation_cases",
    "compute_device",
    "brain_mask_from_image",
    "preprocessing_from_dict",
    "NormalisedT1",
    "read_foundation_case",
    "normalise_foundation_case",
    "preprocess_foundation_case",
    "foundation_case_dir",
    "foundation_splits_name",
    "load_foundation_case",
    "foundation_dataset",
    "ATLAS",
    "UOA_PRIVATE",
]

FOUNDATION_KEYS = ("image", "lesion_mask", "brain_mask")
# Where the case id ends in a file name (earliest marker wins): ATLAS images and masks
# ("sub-r001s001_ses-1_space-MNI152NLin2009aSym_T1w"), UOA images ("P001_T1_FNIRT_MNI"),
# UOA masks ("P001_lesion").
ID_MARKERS = ("_space-", "_T1_", "_lesion")


@dataclass(frozen=True)
class PreprocessingConfig:
    """The ``preprocessing`` block of config.json.

    target_spacing: voxel size in mm (array axis order) to resample to; None keeps each input's.
    normalization_method: "zscore" (inside the brain mask; the only method).
    clip_percentile: intensities are clipped to [100 - p, p] percentiles of brain voxels, p in (50, 100].
    use_gpu: run resampling and intensity work on CUDA when available.
    brain_threshold: brain mask = image > threshold, holes filled (0 suits skull-stripped input).
    """

    target_spacing: tuple[float, float, float] | None = (1.0, 1.0, 1.0)
    normalization_method: str = "zscore"
    clip_percentile: float = 99.5
    use_gpu: bool = False
    brain_threshold: float = 0.0


@dataclass(frozen=True)
class DatasetConfig:
    """One entry of ``datasets``: output folder ``name``; globs are relative to ``data_dir``;
    ``id_markers``: where the case id ends in a file name (see :func:`case_id_from_filename`)."""

    name: str
    data_dir: Path
    image_pattern: str
    mask_pattern: str
    id_markers: tuple[str, ...] = ID_MARKERS


@dataclass(frozen=True)
class FoundationConfig:
    """A validated config.json: outputs go to ``output_base_dir / <dataset name>``."""

    output_base_dir: Path
    preprocessing: PreprocessingConfig
    datasets: tuple[DatasetConfig, ...]

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form in the config.json schema (paths as strings)."""
        out = asdict(self)
        out["output_base_dir"] = str(self.output_base_dir)
        out["datasets"] = [{**asdict(d), "data_dir": str(d.data_dir)} for d in self.datasets]
        return out


# --------------------------------------------------------------------------- config

_NUMBER = (int, float)
_TOP_KEYS = {"output_base_dir": str, "preprocessing": dict, "datasets": list}
_PRE_KEYS = {
    "target_spacing": (list, type(None)),
    "normalization_method": str,
    "clip_percentile": _NUMBER,
    "use_gpu": bool,
    "brain_threshold": _NUMBER,
}
_DATASET_KEYS = {"name": str, "data_dir": str, "image_pattern": str, "mask_pattern": str, "id_markers": list}
_DATASET_REQUIRED = ("name", "data_dir", "image_pattern", "mask_pattern")
_METHODS = ("zscore",)


def _type_name(types: type | tuple[type, ...]) -> str:
    names = {int: "number", float: "number", type(None): "null", dict: "object", list: "list", str: "string", bool: "boolean"}
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(dict.fromkeys(names[t] for t in types))


def _check_block(block: Any, schema: Mapping[str, Any], required: tuple[str, ...], where: str, problems: list[str]) -> dict:
    """Append to ``problems`` every unknown key, missing required key and wrong type of ``block``."""
    if not isinstance(block, dict):
        problems.append(f"{where} must be an object, got {type(block).__name__}")
        return {}
    for key in block:
        if key not in schema:
            problems.append(f"{where}: unknown key {key!r} (allowed: {', '.join(schema)})")
    for key in required:
        if key not in block:
            problems.append(f"{where}: missing key {key!r}")
    valid = {}
    for key, types in schema.items():
        if key not in block:
            continue
        value = block[key]
        # bool is an int in Python; a number field must not accept true/false
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,))):
            problems.append(f"{where}.{key} must be a {_type_name(types)}, got {value!r}")
        else:
            valid[key] = value
    return valid


def _preprocessing(block: dict, problems: list[str]) -> PreprocessingConfig:
    values = dict(block)
    spacing = values.get("target_spacing", PreprocessingConfig.target_spacing)
    if spacing is not None:
        if len(spacing) != 3 or not all(isinstance(v, _NUMBER) and not isinstance(v, bool) and v > 0 for v in spacing):
            problems.append(f"preprocessing.target_spacing must be 3 positive numbers (mm) or null, got {spacing!r}")
            spacing = None
        else:
            spacing = tuple(float(v) for v in spacing)
    values["target_spacing"] = spacing
    method = values.get("normalization_method", PreprocessingConfig.normalization_method)
    if method not in _METHODS:
        problems.append(f"preprocessing.normalization_method must be one of {list(_METHODS)}, got {method!r}")
    pct = values.get("clip_percentile", PreprocessingConfig.clip_percentile)
    if not 50.0 < pct <= 100.0:
        problems.append(f"preprocessing.clip_percentile must be in (50, 100], got {pct!r}")
    for key in ("clip_percentile", "brain_threshold"):
        if key in values:
            values[key] = float(values[key])
    return PreprocessingConfig(**values)


def _dataset_config(values: dict, where: str, problems: list[str]) -> DatasetConfig:
    name = values["name"]
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        problems.append(f"{where}.name {name!r} is not usable as a folder name")
    markers = values.get("id_markers", list(ID_MARKERS))
    if not markers or not all(isinstance(m, str) and m for m in markers):
        problems.append(f"{where}.id_markers must be a non-empty list of non-empty strings, got {markers!r}")
    return DatasetConfig(name, Path(values["data_dir"]), values["image_pattern"], values["mask_pattern"], tuple(markers))


def parse_config(raw: Any, source: str | Path = "config") -> FoundationConfig:
    """Validate the config.json content and build a :class:`FoundationConfig`.

    Schema: ``output_base_dir`` (string), ``datasets`` (non-empty list of objects with string
    ``name``, ``data_dir``, ``image_pattern``, ``mask_pattern``, optional ``id_markers`` (list of
    strings, default :data:`ID_MARKERS`); names unique, usable as folder names) and an optional ``preprocessing`` object whose keys default as in
    :class:`PreprocessingConfig`. Unknown keys, missing keys and wrong types are all collected
    into one :class:`ValueError` naming ``source``.
    """
    problems: list[str] = []
    top = _check_block(raw, _TOP_KEYS, ("output_base_dir", "datasets"), "config", problems)
    pre = _check_block(top.get("preprocessing", {}), _PRE_KEYS, (), "preprocessing", problems)
    preprocessing = _preprocessing(pre, problems)
    datasets = []
    if "datasets" in top and not top["datasets"]:
        problems.append("datasets must list at least one dataset")
    for i, entry in enumerate(top.get("datasets", [])):
        values = _check_block(entry, _DATASET_KEYS, _DATASET_REQUIRED, f"datasets[{i}]", problems)
        if all(key in values for key in _DATASET_REQUIRED):
            datasets.append(_dataset_config(values, f"datasets[{i}]", problems))
    names = [d.name for d in datasets]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"dataset name {name!r} appears more than once")
    if problems:
        raise ValueError(f"{source}: invalid config: " + "; ".join(problems))
    return FoundationConfig(Path(top["output_base_dir"]), preprocessing, tuple(datasets))


def load_config(
    path: str | Path, output_base_dir: str | Path | None = None, data_dirs: Mapping[str, str | Path] | None = None
) -> FoundationConfig:
    """Read and validate config.json, then apply command-line overrides.

    output_base_dir replaces the config's; data_dirs maps dataset name -> data folder (an
    unknown name is a :class:`ValueError`). Raises :class:`CaseError` for an unreadable file.
    """
    config = parse_config(read_json(path), source=path)
    data_dirs = dict(data_dirs or {})
    unknown = sorted(set(data_dirs) - {d.name for d in config.datasets})
    if unknown:
        raise ValueError(f"--data-dir names {unknown} are not datasets of {path} ({[d.name for d in config.datasets]})")
    datasets = tuple(
        DatasetConfig(d.name, Path(data_dirs.get(d.name, d.data_dir)), d.image_pattern, d.mask_pattern, d.id_markers)
        for d in config.datasets
    )
    base = Path(output_base_dir) if output_base_dir is not None else config.output_base_dir
    return FoundationConfig(base, config.preprocessing, datasets)


def preprocessing_from_dict(block: Mapping[str, Any], source: str | Path = "preprocessing") -> PreprocessingConfig:
    """A validated :class:`PreprocessingConfig` from a ``preprocessing`` block (e.g. the one a
    checkpoint's data contract recorded); keys other than its fields are ignored, missing ones
    take the defaults. Raises :class:`ValueError` naming ``source`` for a wrong value."""
    problems: list[str] = []
    known = {key: value for key, value in dict(block).items() if key in _PRE_KEYS}
    config = _preprocessing(_check_block(known, _PRE_KEYS, (), "preprocessing", problems), problems)
    if problems:
        raise ValueError(f"{source}: invalid preprocessing settings: " + "; ".join(problems))
    return config


# --------------------------------------------------------------------------- discovery


def case_id_from_filename(name: str, markers: Sequence[str] = ID_MARKERS) -> str:
    """Case id of an image or mask file name: the part before the earliest of ``markers``
    (default :data:`ID_MARKERS`; a config.json dataset may give its own ``id_markers``).

    ATLAS ``sub-r001s001_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz`` and its
    ``..._space-..._label-L_desc-T1lesion_mask.nii.gz`` give ``sub-r001s001_ses-1``; UOA
    ``P001_T1_FNIRT_MNI.nii.gz`` and ``P001_lesion.nii.gz`` give ``P001``. A name with no marker
    gives the name without ``.nii``/``.nii.gz``.
    """
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")] if name.endswith(".nii") else name
    cuts = [stem.find(marker) for marker in markers if stem.find(marker) > 0]
    return stem[: min(cuts)] if cuts else stem


@dataclass(frozen=True)
class FoundationItem:
    """One case to preprocess: a missing file is None; a pairing problem is a one-line ``problem``."""

    case_id: str
    dataset: str
    image: Path | None
    mask: Path | None
    problem: str = ""


def discover_foundation_cases(dataset: DatasetConfig, require_masks: bool = True) -> dict[str, FoundationItem]:
    """Pair the files matching the image and mask patterns (recursive ``**``, following symbolic
    links to folders, each folder once; an empty pattern matches nothing) by case id.

    A file matching both patterns counts as a mask. An image without a mask (unless not
    ``require_masks``), a mask without an image, or two files of one kind for a case give an
    item carrying a problem, reported when it is processed. Raises :class:`CaseError` when
    ``data_dir`` is missing or nothing matches.
    """
    root = dataset.data_dir
    if not root.is_dir():
        raise CaseError(f"{dataset.name}: data_dir {root} not found")
    masks = glob_files(root, dataset.mask_pattern)
    mask_set = set(masks)
    images = [p for p in glob_files(root, dataset.image_pattern) if p not in mask_set]
    if not images and not masks:
        raise CaseError(f"{dataset.name}: no file under {root} matches {dataset.image_pattern!r} or {dataset.mask_pattern!r}")
    found: dict[str, dict[str, list[Path]]] = {}
    for kind, paths in (("image", images), ("mask", masks)):
        for path in paths:
            found.setdefault(case_id_from_filename(path.name, dataset.id_markers), {"image": [], "mask": []})[kind].append(path)
    items = {}
    for case_id, files in sorted(found.items()):
        problem = ""
        for kind, pattern in (("image", dataset.image_pattern), ("mask", dataset.mask_pattern)):
            if not files[kind] and (kind == "image" or require_masks):
                other = files["mask" if kind == "image" else "image"][0]
                problem = f"{case_id}: no {kind} matching {pattern!r} for {other}"
            elif len(files[kind]) > 1:
                problem = f"{case_id}: {len(files[kind])} {kind} files: {', '.join(str(p) for p in files[kind])}"
        image = files["image"][0] if files["image"] else None
        mask = files["mask"][0] if files["mask"] else None
        items[case_id] = FoundationItem(case_id, dataset.name, image, mask, problem)
    return items


# --------------------------------------------------------------------------- one case


def compute_device(use_gpu: bool) -> torch.device | None:
    """CUDA device when ``use_gpu`` and CUDA is available, else None (NumPy on the CPU)."""
    return torch.device("cuda") if use_gpu and torch.cuda.is_available() else None


# Above this fraction of the volume, the background enclosed along the last axis is labelled
# with one ndimage.label pass rather than as a sparse graph (see _fill_holes).
_SPARSE_HOLES_MAX_FRACTION = 0.02


def _fill_holes(foreground: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes`` (6-connected background) of a bool volume, exact.

    Background that sees the array border along the last axis is outside. Usually only a few
    thousand background voxels are enclosed along that axis; their 6-connected components are
    found as a sparse graph, and a component is a hole unless it touches a voxel seen from the
    border (it is then connected to the border; any path out of it meets such a voxel first).
    Several times faster than labelling the whole background, which remains the fallback when
    much of the background is enclosed. A one-voxel empty border is added first, so every
    array face is seen from outside and neighbour offsets never wrap.
    """
    padded = np.pad(foreground, 1)
    seen = _seen_along_last_axis(padded)
    enclosed = ~(padded | seen)
    index = np.flatnonzero(enclosed)
    if index.size > _SPARSE_HOLES_MAX_FRACTION * padded.size:
        return _fill_holes_by_labelling(foreground)
    filled = padded.copy()
    filled.ravel()[index[_holes_among(index, enclosed.ravel(), seen.ravel(), padded.shape)]] = True
    return filled[1:-1, 1:-1, 1:-1]


def _seen_along_last_axis(foreground: np.ndarray) -> np.ndarray:
    """Background voxels before the first or after the last foreground voxel of their line
    along the last axis (every voxel of an empty line), bool like ``foreground``."""
    n = foreground.shape[-1]
    dtype = np.min_scalar_type(n)  # narrow integers: the comparisons below run several times faster
    first = np.argmax(foreground, axis=-1).astype(dtype)
    last = (n - 1 - np.argmax(foreground[..., ::-1], axis=-1)).astype(dtype)
    first[~foreground.any(axis=-1)] = n
    position = np.arange(n, dtype=dtype)
    seen = position < first[..., None]
    seen |= position > last[..., None]
    return seen


def _holes_among(index: np.ndarray, enclosed: np.ndarray, seen: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Which of the enclosed voxels (sorted flat ``index``) lie in holes: bool per voxel.

    ``enclosed``/``seen``: flat bool volumes of ``shape`` whose border voxels are all seen.
    """
    strides = (shape[1] * shape[2], shape[2], 1)
    touches_seen = np.zeros(index.size, dtype=bool)
    rows, cols = [], []
    for stride in strides:
        touches_seen |= seen[index + stride] | seen[index - stride]
        neighbour = index + stride
        linked = enclosed[neighbour]
        rows.append(np.flatnonzero(linked))
        cols.append(np.searchsorted(index, neighbour[linked]))
    row, col = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(row.size, dtype=np.int8), (row, col)), shape=(index.size, index.size))
    n_components, component = connected_components(graph, directed=False)
    outside = np.zeros(n_components, dtype=bool)
    outside[component[touches_seen]] = True
    return ~outside[component]


def _fill_holes_by_labelling(foreground: np.ndarray) -> np.ndarray:
    """``binary_fill_holes`` via one labelling pass: background components touching the array
    border stay background, all others are holes."""
    labels, n = ndimage.label(~foreground)
    outside = np.zeros(n + 1, dtype=bool)
    for face in (labels[0], labels[-1], labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]):
        outside[face] = True
    outside[0] = False  # label 0 is the foreground
    return ~outside[labels]


def brain_mask_from_image(image: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """Brain mask (X, Y, Z) uint8: ``image > threshold`` with enclosed holes filled.

    Equal to ``scipy.ndimage.binary_fill_holes(image > threshold)`` (tested), computed on the
    bounding box of the foreground grown by one voxel: background outside that box always
    reaches the border, so the result is unchanged and the work shrinks to the head. For
    skull-stripped input this is the brain; for input that still holds skull and scalp (the
    synthetic ATLAS data) it is the head: skull-strip first or raise ``threshold``.
    """
    foreground = image > threshold
    out = np.zeros(image.shape, dtype=np.uint8)
    if not foreground.any():
        return out
    box = tuple(slice(int(a), int(b)) for a, b in foreground_bbox(foreground, margin=1))
    out[box] = _fill_holes(foreground[box])
    return out


def _to_target_spacing(
    image: np.ndarray, lesion: np.ndarray | None, affine: np.ndarray, zooms: np.ndarray,
    target: tuple[float, float, float] | None, device: torch.device | None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
    """Resample image (trilinear) and lesion (nearest; None stays None) to ``target`` spacing
    when the zooms differ by more than 1e-3 mm; returns image, lesion, affine, spacing (mm) of
    the output grid."""
    if target is None or np.allclose(zooms, target, atol=1e-3, rtol=0.0):
        return image, lesion, affine, zooms
    shape = spacing_to_shape(image.shape, tuple(zooms), target)
    resampled = resample_to_shape(image, shape, is_label=False, device=device)
    resampled_lesion = None if lesion is None else resample_to_shape(lesion, shape, is_label=True, device=device)
    spacing = zooms * np.asarray(image.shape, dtype=np.float64) / np.asarray(shape, dtype=np.float64)
    return resampled, resampled_lesion, rescale_affine(affine, image.shape, shape), spacing


def normalise_in_brain(
    volume: np.ndarray, settings: PreprocessingConfig, device: torch.device | None, path: Path
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Brain mask, percentile clip and z-score of one T1w volume (X, Y, Z).

    Returns the normalised image float32 (0 outside the brain), the brain mask uint8 and the
    clip bounds (intensity units of ``volume``). Every step is independent of the axis order, so
    a Fortran-ordered volume (as nibabel returns it) is processed as its C-contiguous transpose
    and the results keep its order. Raises :class:`CaseError` naming ``path`` for an empty brain.
    """
    view, transposed = c_order_view(volume)
    brain = brain_mask_from_image(view, settings.brain_threshold)
    bounds = percentile_bounds(view, brain, settings.clip_percentile, device)
    if bounds is None:
        raise CaseError(f"{path}: empty brain mask (no voxel above {settings.brain_threshold:g})")
    normalised = zscore(clip_between(view, bounds[0], bounds[1], device), brain, device)
    return (normalised.T, brain.T, bounds) if transposed else (normalised, brain, bounds)


@dataclass(frozen=True)
class NormalisedT1:
    """A T1w case on the network's grid: ``image`` float32 (X, Y, Z) clipped and z-scored in
    the brain (0 outside), ``brain`` uint8 {0,1}, ``lesion`` uint8 {0,1} or None, ``affine``
    (4, 4) and ``spacing`` (3,) mm of that grid, ``clip_bounds`` in input intensity units."""

    image: np.ndarray
    brain: np.ndarray
    lesion: np.ndarray | None
    affine: np.ndarray
    spacing: np.ndarray
    clip_bounds: tuple[float, float]


def read_foundation_case(item: FoundationItem, require_mask: bool = True) -> tuple[Image, np.ndarray | None]:
    """Load a case's T1w image and (when present, or always when ``require_mask``) its lesion
    mask, checked at the door: same shape and affine (1e-3 mm), mask values 0/1. Returns the
    image and the mask uint8 (X, Y, Z) or None. Raises :class:`CaseError` naming the file."""
    if item.problem:
        raise CaseError(item.problem)
    image = load_image(item.image)
    if item.mask is None and not require_mask:
        return image, None
    mask = load_nifti(item.mask, dtype=None)  # mask labels checked in their own type
    check_same_grid(image, "image", (mask,))
    return image, as_binary_mask(mask.data, mask.path)


def normalise_foundation_case(
    image: Image, native_lesion: np.ndarray | None, settings: PreprocessingConfig, device: torch.device | None
) -> NormalisedT1:
    """Resample to ``settings.target_spacing`` (the actual spacing is the input field of view
    over the rounded grid), brain mask (:func:`brain_mask_from_image`), clip to the
    [100 - p, p] percentiles of brain voxels, z-score inside the brain (:func:`normalise_in_brain`)."""
    zooms = np.asarray(image.zooms, dtype=np.float64)
    volume, lesion, affine, spacing = _to_target_spacing(
        image.data, native_lesion, image.affine, zooms, settings.target_spacing, device
    )
    normalised, brain, bounds = normalise_in_brain(volume, settings, device, image.path)
    return NormalisedT1(normalised, brain, lesion, affine, spacing, bounds)


def _finished(npz_path: Path, meta_path: Path) -> bool:
    """Both outputs of a case exist and agree: the metadata (written second) records the CRC-32
    of each member of this very .npz, so a crash between the two writes of a rerun is redone."""
    if not (npz_path.exists() and meta_path.exists()):
        return False
    try:
        return read_json(meta_path).get("npz_crc32") == npz_member_crcs(npz_path)
    except (CaseError, AttributeError):
        return False


def preprocess_foundation_case(
    item: FoundationItem, output_dir: Path, settings: PreprocessingConfig, overwrite: bool
) -> CaseResult:
    """Preprocess one T1w image and its lesion mask; write ``<case>.npz`` and ``<case>_metadata.json``.

    Steps: image and mask must share shape and affine (1e-3 mm) and the mask be {0,1}; resample
    to ``settings.target_spacing`` (the actual output spacing is the input field of view over
    the rounded grid, recorded in the metadata); brain mask (:func:`brain_mask_from_image`);
    clip the whole image to the [100 - p, p] percentiles of brain voxels; z-score inside the
    brain, 0 outside. Intensity work runs on CUDA when ``settings.use_gpu`` and available.

    ``.npz`` keys, all (X, Y, Z): ``image`` float32, ``lesion_mask`` uint8 {0,1}, ``brain_mask``
    uint8 {0,1}. The metadata holds ids, source paths, shape, spacing (mm), affine (4x4), their
    originals, lesion volume (voxels and ml, output and native grid), ``has_lesion`` and the
    settings and ``npz_crc32`` (member -> CRC-32 of the .npz). Skipped when both outputs exist
    and agree, and not ``overwrite``.
    """
    if item.problem:
        raise CaseError(item.problem)
    npz_path, meta_path = output_dir / f"{item.case_id}.npz", output_dir / f"{item.case_id}_metadata.json"
    if not overwrite and _finished(npz_path, meta_path):
        return CaseResult(item.case_id, "skipped", reason="output exists (use --overwrite)")
    image, native_lesion = read_foundation_case(item)
    device = compute_device(settings.use_gpu)
    zooms = np.asarray(image.zooms, dtype=np.float64)
    case = normalise_foundation_case(image, native_lesion, settings, device)
    lesion, spacing = case.lesion, case.spacing
    save_npz(npz_path, {"image": case.image, "lesion_mask": lesion, "brain_mask": case.brain}, compress=False)  # memory-mapped by the trainer

    voxel_ml = float(np.prod(spacing)) / 1000.0
    lesion_voxels = int(lesion.sum())
    metadata = {
        "case_id": item.case_id,
        "dataset": item.dataset,
        "image_path": str(item.image),
        "mask_path": str(item.mask),
        "shape": list(case.image.shape),
        "spacing": spacing.tolist(),
        "affine": case.affine.tolist(),
        "original_shape": list(image.data.shape),
        "original_spacing": zooms.tolist(),
        "original_affine": image.affine.tolist(),
        "resampled": case.image.shape != image.data.shape or not np.array_equal(spacing, zooms),
        "lesion_voxels": lesion_voxels,
        "lesion_ml": lesion_voxels * voxel_ml,
        "original_lesion_voxels": int(native_lesion.sum()),
        "original_lesion_ml": float(native_lesion.sum()) * image.voxel_volume_ml,
        "has_lesion": lesion_voxels > 0,
        "brain_voxels": int(case.brain.sum()),
        "clip_bounds": list(case.clip_bounds),
        "preprocessing": {**asdict(settings), "device": str(device or "cpu"), "brain_mask": "image > brain_threshold, holes filled"},
        "npz_crc32": npz_member_crcs(npz_path),  # ties this metadata to this very .npz (see _finished)
    }
    write_json(meta_path, metadata)
    fingerprint = case_fingerprint({"image": image.data}, image.data > settings.brain_threshold, image.zooms, metadata["original_lesion_ml"])
    info = {"lesion_voxels": lesion_voxels, "lesion_ml": metadata["lesion_ml"], "has_lesion": lesion_voxels > 0, "shape": list(case.image.shape), "fingerprint": fingerprint}
    return CaseResult(item.case_id, "done", info=info)


# --------------------------------------------------------------------------- registry


def foundation_splits_name(name: str) -> str:
    """The splits file the foundation stage writes for config.json dataset ``name``."""
    return f"{name}_splits_5fold.json"


def foundation_case_dir(data_dir: Path, name: str) -> Path:
    """``data_dir/<name>`` when it exists (the stage's output base was given), else ``data_dir``."""
    return data_dir / name if (data_dir / name).is_dir() else data_dir


def load_foundation_case(case_dir: Path, case_id: str, input_keys: Sequence[str] = ("image",)) -> EvalCase:
    """Read ``<case_id>.npz`` (``input_keys``, lesion_mask) and ``<case_id>_metadata.json``
    (affine, spacing, shape) written by ``preprocess_stroke_foundation.py``; checks the three
    agree. Scored on the preprocessed grid (no crop)."""
    path, meta_path = case_dir / f"{case_id}.npz", case_dir / f"{case_id}_metadata.json"
    for needed in (path, meta_path):
        if not needed.is_file():
            raise CaseError(f"{case_id}: listed in the splits file but {needed} does not exist")
    data = load_npz(path, keys=(*input_keys, "lesion_mask"))
    meta = read_json(meta_path)
    missing = [k for k in ("affine", "spacing", "shape") if k not in meta]
    if missing:
        raise CaseError(f"{meta_path}: missing key(s) {missing}")
    check_finite(path, data)
    mask = data["lesion_mask"]
    shapes = {key: data[key].shape for key in input_keys}
    if any(shape != mask.shape for shape in shapes.values()) or list(mask.shape) != list(meta["shape"]):
        raise CaseError(f"{path}: {shapes}, lesion_mask {mask.shape} and metadata shape {meta['shape']} differ")
    return EvalCase(
        case_id=case_id,
        inputs={key: data[key].astype(np.float32, copy=False) for key in input_keys},
        reference=mask.astype(bool),
        affine=np.asarray(meta["affine"], dtype=np.float64),
        spacing=tuple(float(s) for s in meta["spacing"]),
    )


def foundation_dataset(name: str, display_name: str, preset: str = "atlas22") -> DatasetSpec:
    """The spec of a dataset preprocessed by ``preprocess_stroke_foundation.py`` (a config.json
    entry called ``name``): T1w ``image``, ``lesion_mask``, ``brain_mask``, whole-volume scoring,
    the settings recorded in the stage's run_args.json. Register it with
    :func:`strokeseg.datasets.registry.register_dataset` to train and evaluate a new cohort."""
    return DatasetSpec(
        name=name,
        display_name=display_name,
        input_keys=("image",),
        mask_key="lesion_mask",
        brain_key="brain_mask",
        splits_name=foundation_splits_name(name),
        preset=preset,
        table_layout="dataset",
        whole_brain=True,
        stage="foundation",
        find_case_dir=foundation_case_dir,
        read_preprocessing=functools.partial(
            settings_from_run_args,
            keys=("target_spacing", "normalization_method", "clip_percentile", "brain_threshold"),
            within=("resolved_config", "preprocessing"),
        ),
        load_eval_case=load_foundation_case,
        bids_suffixes=(("image", ("t1w",)), ("mask", ("mask",))),
    )


ATLAS = register_dataset(foundation_dataset("ATLAS", "ATLAS"))
UOA_PRIVATE = register_dataset(foundation_dataset("UOA_Private", "UOA"))
