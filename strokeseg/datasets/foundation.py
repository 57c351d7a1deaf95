"""ATLAS v2.0 / UOA full-volume preprocessing ("stroke foundation"): config, discovery, one case.

The paper's ``config.json`` drives it (see :func:`parse_config` for the schema). Per dataset,
images and masks are found by glob patterns under ``data_dir`` and paired by case id
(:func:`case_id_from_filename`). Per case: optional resampling to ``target_spacing``, a brain
mask, percentile clipping and z-scoring inside the brain; output ``<case>.npz`` plus
``<case>_metadata.json`` (see :func:`preprocess_foundation_case`).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..core.geometry import (
    brain_mask_from_image,
    c_order_view,
    clip_between,
    percentile_bounds,
    rescale_affine,
    resample_to_shape,
    spacing_to_shape,
    zscore,
)
from ..core.case import LABEL, Case, Image
from ..core.case_io import read_images
from ..core.metrics import PRESETS
from ..core.io import CaseError, check_finite, glob_files, load_npz, npz_member_crcs, read_json, save_npz, write_json
from ..core.runner import CaseResult
from .fingerprint import case_fingerprint
from .registry import DatasetSpec, register_dataset, registered_names, settings_from_run_args

__all__ = [
    "PreprocessingConfig",
    "DatasetConfig",
    "FoundationConfig",
    "FOUNDATION_KEYS",
    "ID_MARKERS",
    "parse_config",
    "load_config",
    "case_id_from_filename",
    "t1w_case",
    "discover_foundation_cases",
    "compute_device",
    "preprocessing_from_dict",
    "read_foundation_case",
    "prepare_foundation_case",
    "preprocess_foundation_case",
    "foundation_case_dir",
    "foundation_splits_name",
    "load_foundation_case",
    "read_t1w_root",
    "foundation_dataset",
    "register_config_datasets",
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
    ``id_markers``: where the case id ends in a file name (see :func:`case_id_from_filename`).
    An entry whose name no built-in dataset has registers a T1w dataset of that name on the
    registry's first look-up (:func:`register_config_datasets`) with ``display_name`` (tables;
    "" = the name), metrics ``preset`` and default training ``patch_size`` (voxels; None: the
    architecture's)."""

    name: str
    data_dir: Path
    image_pattern: str
    mask_pattern: str
    id_markers: tuple[str, ...] = ID_MARKERS
    display_name: str = ""
    preset: str = "atlas22"
    patch_size: int | None = None


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
_DATASET_KEYS = {
    "name": str, "data_dir": str, "image_pattern": str, "mask_pattern": str, "id_markers": list,
    "display_name": str, "preset": str, "patch_size": int,
}
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
    preset = values.get("preset", DatasetConfig.preset)
    if preset not in PRESETS:
        problems.append(f"{where}.preset must be one of {sorted(PRESETS)}, got {preset!r}")
    patch = values.get("patch_size")
    if patch is not None and (isinstance(patch, bool) or patch < 1):
        problems.append(f"{where}.patch_size must be a positive number of voxels, got {patch!r}")
    return DatasetConfig(
        name, Path(values["data_dir"]), values["image_pattern"], values["mask_pattern"], tuple(markers),
        values.get("display_name", ""), preset, patch,
    )


def parse_config(raw: Any, source: str | Path = "config") -> FoundationConfig:
    """Validate the config.json content and build a :class:`FoundationConfig`.

    Schema: ``output_base_dir`` (string), ``datasets`` (non-empty list of objects with string
    ``name``, ``data_dir``, ``image_pattern``, ``mask_pattern``, optional ``id_markers`` (list of
    strings, default :data:`ID_MARKERS`), ``display_name`` (string), ``preset`` (a metrics
    preset, default "atlas22") and ``patch_size`` (voxels); names unique, usable as folder names) and an optional ``preprocessing`` object whose keys default as in
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
    datasets = tuple(dataclasses.replace(d, data_dir=Path(data_dirs.get(d.name, d.data_dir))) for d in config.datasets)
    base = Path(output_base_dir) if output_base_dir is not None else config.output_base_dir
    return FoundationConfig(base, config.preprocessing, datasets)


def preprocessing_from_dict(block: Mapping[str, Any], source: str | Path = "preprocessing") -> PreprocessingConfig:
    """A validated :class:`PreprocessingConfig` from a ``preprocessing`` block (e.g. the one a
    checkpoint's data contract recorded); keys other than its fields are ignored, missing ones
    take the defaults. Raises :class:`ValueError` naming ``source`` for a wrong value."""
    problems: list[str] = []
    known = {key: list(value) if isinstance(value, tuple) else value for key, value in dict(block).items() if key in _PRE_KEYS}
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


def t1w_case(case_id: str, dataset: str, image: Path | None, mask: Path | None, problem: str = "") -> Case:
    """A T1w case found on disk, not read yet: ``sources`` image and label (None: not found),
    ``meta`` the dataset name and a one-line pairing ``problem`` (reported when it is read)."""
    meta = {"dataset": dataset, **({"problem": problem} if problem else {})}
    return Case(case_id, sources={"image": image, LABEL: mask}, meta=meta)


def discover_foundation_cases(dataset: DatasetConfig, require_masks: bool = True) -> dict[str, Case]:
    """Pair the files matching the image and mask patterns (recursive ``**``, following symbolic
    links to folders, each folder once; an empty pattern matches nothing) by case id.

    A file matching both patterns counts as a mask. An image without a mask (unless not
    ``require_masks``), a mask without an image, or two files of one kind for a case give a
    case carrying a problem (:func:`t1w_case`), reported when it is read. Raises :class:`CaseError` when
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
        items[case_id] = t1w_case(case_id, dataset.name, image, mask, problem)
    return items


# --------------------------------------------------------------------------- one case


def compute_device(use_gpu: bool) -> torch.device | None:
    """CUDA device when ``use_gpu`` and CUDA is available, else None (NumPy on the CPU)."""
    return torch.device("cuda") if use_gpu and torch.cuda.is_available() else None


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


def read_foundation_case(case: Case, require_mask: bool = True) -> Case:
    """Read a discovered case (:func:`t1w_case`): its T1w ``image`` and (when present, or
    always when ``require_mask``) its lesion label uint8 {0,1} (X, Y, Z), checked at the door:
    same shape and affine (1e-3 mm), mask values 0/1. Raises :class:`CaseError` naming the file
    (or the case's discovery problem)."""
    return read_images(case, ("image",), require_mask)


def prepare_foundation_case(case: Case, settings: Mapping[str, Any]) -> Case:
    """The network input of a read T1w case (the foundation stage's and prediction's ``prepare``).

    Resample to ``target_spacing`` (the actual spacing is the input field of view over the
    rounded grid; the label nearest-neighbour), brain mask (:func:`brain_mask_from_image`),
    clip to the [100 - p, p] percentiles of brain voxels, z-score inside the brain
    (:func:`normalise_in_brain`). settings: a ``preprocessing`` block
    (:func:`preprocessing_from_dict`; ``use_gpu`` runs it on CUDA when available). Returns a Case
    with images ``image`` float32 (0 outside the brain) and ``brain_mask`` uint8, the label
    uint8 (None stays None), ``meta`` ``bbox``/``cropped_shape`` (the whole native volume) and
    ``clip_bounds`` (input intensity units).
    """
    config = preprocessing_from_dict(settings, "preprocessing settings")
    device = compute_device(config.use_gpu)
    native = case.image("image")
    label = None if case.label is None else case.label.data
    zooms = np.asarray(native.zooms, dtype=np.float64)
    volume, lesion, affine, spacing = _to_target_spacing(native.data, label, native.affine, zooms, config.target_spacing, device)
    normalised, brain, bounds = normalise_in_brain(volume, config, device, native.path)
    grid = lambda data: Image(data, affine, tuple(float(v) for v in spacing), native.path)  # noqa: E731
    shape = native.shape
    meta = {"bbox": np.array([[0, n] for n in shape], dtype=np.int64), "cropped_shape": shape, "clip_bounds": bounds}
    return case.replace(images={"image": grid(normalised), "brain_mask": grid(brain)}, label=None if lesion is None else grid(lesion), meta=meta)


def _finished(npz_path: Path, meta_path: Path) -> bool:
    """Both outputs of a case exist and agree: the metadata (written second) records the CRC-32
    of each member of this very .npz, so a crash between the two writes of a rerun is redone."""
    if not (npz_path.exists() and meta_path.exists()):
        return False
    try:
        return read_json(meta_path).get("npz_crc32") == npz_member_crcs(npz_path)
    except (CaseError, AttributeError):
        return False


def preprocess_foundation_case(case: Case, output_dir: Path, settings: PreprocessingConfig, overwrite: bool) -> CaseResult:
    """Preprocess one T1w image and its lesion mask; write ``<case>.npz`` and ``<case>_metadata.json``.

    Reads the case (:func:`read_foundation_case`: image and mask share shape and affine, mask
    {0,1}) and prepares it as prediction does (:func:`prepare_foundation_case`: resample to
    ``settings.target_spacing``, brain mask, percentile clip, z-score in the brain, 0 outside;
    on CUDA when ``settings.use_gpu`` and available).

    ``.npz`` keys, all (X, Y, Z): ``image`` float32, ``lesion_mask`` uint8 {0,1}, ``brain_mask``
    uint8 {0,1}. The metadata holds ids, source paths, shape, spacing (mm), affine (4x4), their
    originals, lesion volume (voxels and ml, output and native grid), ``has_lesion`` and the
    settings and ``npz_crc32`` (member -> CRC-32 of the .npz). Skipped when both outputs exist
    and agree, and not ``overwrite``.
    """
    if case.problem:
        raise CaseError(case.problem)
    npz_path, meta_path = output_dir / f"{case.case_id}.npz", output_dir / f"{case.case_id}_metadata.json"
    if not overwrite and _finished(npz_path, meta_path):
        return CaseResult(case.case_id, "skipped", reason="output exists (use --overwrite)")
    native = read_foundation_case(case)
    prepared = prepare_foundation_case(native, asdict(settings))
    lesion = prepared.label.data
    arrays = {"image": prepared.image("image").data, "lesion_mask": lesion, "brain_mask": prepared.image("brain_mask").data}
    save_npz(npz_path, arrays, compress=False)  # memory-mapped by the trainer
    metadata = _foundation_metadata(native, prepared, settings)
    metadata["npz_crc32"] = npz_member_crcs(npz_path)  # ties this metadata to this very .npz (see _finished)
    write_json(meta_path, metadata)
    image = native.image("image")
    fingerprint = case_fingerprint({"image": image.data}, image.data > settings.brain_threshold, image.zooms, metadata["original_lesion_ml"])
    info = {"lesion_voxels": metadata["lesion_voxels"], "lesion_ml": metadata["lesion_ml"], "has_lesion": metadata["has_lesion"],
            "shape": metadata["shape"], "fingerprint": fingerprint}
    return CaseResult(case.case_id, "done", info=info)


def _foundation_metadata(native: Case, prepared: Case, settings: PreprocessingConfig) -> dict[str, Any]:
    """``<case>_metadata.json`` of a read native case and its prepared form (without ``npz_crc32``)."""
    image, out = native.image("image"), prepared.image("image")
    zooms, spacing = np.asarray(image.zooms, dtype=np.float64), np.asarray(out.zooms, dtype=np.float64)
    native_lesion, lesion_voxels = native.label.data, int(prepared.label.data.sum())
    device = compute_device(settings.use_gpu)
    return {
        "case_id": native.case_id,
        "dataset": native.meta.get("dataset"),
        "image_path": str(native.source("image")),
        "mask_path": str(native.source(LABEL)),
        "shape": list(out.shape),
        "spacing": spacing.tolist(),
        "affine": out.affine.tolist(),
        "original_shape": list(image.shape),
        "original_spacing": zooms.tolist(),
        "original_affine": image.affine.tolist(),
        "resampled": out.shape != image.shape or not np.array_equal(spacing, zooms),
        "lesion_voxels": lesion_voxels,
        "lesion_ml": lesion_voxels * out.voxel_volume_ml,
        "original_lesion_voxels": int(native_lesion.sum()),
        "original_lesion_ml": float(native_lesion.sum()) * image.voxel_volume_ml,
        "has_lesion": lesion_voxels > 0,
        "brain_voxels": int(prepared.image("brain_mask").data.sum()),
        "clip_bounds": list(prepared.meta["clip_bounds"]),
        "preprocessing": {**asdict(settings), "device": str(device or "cpu"), "brain_mask": "image > brain_threshold, holes filled"},
    }


# --------------------------------------------------------------------------- registry


def foundation_splits_name(name: str) -> str:
    """The splits file the foundation stage writes for config.json dataset ``name``."""
    return f"{name}_splits_5fold.json"


def foundation_case_dir(data_dir: Path, name: str) -> Path:
    """``data_dir/<name>`` when it exists (the stage's output base was given), else ``data_dir``."""
    return data_dir / name if (data_dir / name).is_dir() else data_dir


def load_foundation_case(case_dir: Path, case_id: str, input_keys: Sequence[str] = ("image",)) -> Case:
    """Read ``<case_id>.npz`` (``input_keys``, lesion_mask) and ``<case_id>_metadata.json``
    (affine, spacing, shape) written by ``preprocess_stroke_foundation.py``; checks the three
    agree. Returns a Case of the inputs float32 and the label bool, all on the preprocessed grid,
    which is also the scoring grid (no ``bbox`` in ``meta``)."""
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
    affine, spacing = np.asarray(meta["affine"], dtype=np.float64), tuple(float(s) for s in meta["spacing"])
    images = {key: Image(data[key].astype(np.float32, copy=False), affine, spacing, path) for key in input_keys}
    return Case(case_id, images, Image(mask.astype(bool), affine, spacing, path), {"npz": path})


def read_t1w_root(root: Path, name: str, image_pattern: str, mask_pattern: str, id_markers: Sequence[str] = ID_MARKERS) -> list[Case]:
    """A T1w dataset's ``reader``: the cases under ``root`` found by the two globs and paired
    by case id (:func:`discover_foundation_cases`; masks optional), sorted by id."""
    dataset = DatasetConfig(name, Path(root), image_pattern, mask_pattern, tuple(id_markers))
    return list(discover_foundation_cases(dataset, require_masks=False).values())


def foundation_dataset(
    name: str, display_name: str, preset: str = "atlas22", image_pattern: str = "**/*_T1w.nii.gz",
    mask_pattern: str = "**/*_mask.nii.gz", id_markers: Sequence[str] = ID_MARKERS, patch_size: int | None = None,
) -> DatasetSpec:
    """The spec of a T1w dataset preprocessed by ``preprocess_stroke_foundation.py`` (a config.json
    entry called ``name``): T1w ``image`` found by ``image_pattern`` and lesion masks by
    ``mask_pattern`` (globs under the raw root, case ids cut at ``id_markers``), read by
    :func:`read_t1w_root` and prepared by :func:`prepare_foundation_case`; ``lesion_mask``,
    ``brain_mask``, whole-volume scoring on the preprocessed grid, the settings recorded in the
    stage's run_args.json. A config.json entry registers one by itself
    (:func:`register_config_datasets`)."""
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
        find_case_dir=foundation_case_dir,
        read_preprocessing=functools.partial(
            settings_from_run_args,
            keys=("target_spacing", "normalization_method", "clip_percentile", "brain_threshold"),
            within=("resolved_config", "preprocessing"),
        ),
        load_eval_case=load_foundation_case,
        bids_suffixes=(("image", ("t1w",)), ("mask", ("mask",))),
        modalities=(("image", image_pattern),),
        label_pattern=mask_pattern,
        reader=functools.partial(read_t1w_root, name=name, image_pattern=image_pattern, mask_pattern=mask_pattern, id_markers=tuple(id_markers)),
        prepare=prepare_foundation_case,
        validate_settings=preprocessing_from_dict,
        scoring_grid="preprocessed",
        patch_size=patch_size,
        id_markers=tuple(id_markers),
    )


def register_config_datasets(path: str | Path) -> tuple[str, ...]:
    """Register a T1w dataset (:func:`foundation_dataset`) for every ``datasets`` entry of the
    config.json at ``path`` whose name is not registered yet (the paper's ATLAS and UOA_Private
    are built in); returns the names registered. A missing file registers nothing; an invalid
    one is a :class:`ValueError` naming it (:func:`parse_config`). The registry calls this on
    its first look-up (:func:`strokeseg.datasets.registry.config_path`), so a new cohort needs
    its config.json entry and nothing else."""
    path = Path(path)
    if not path.is_file():
        return ()
    added = []
    for entry in parse_config(read_json(path), source=path).datasets:
        if entry.name not in registered_names():
            spec = foundation_dataset(entry.name, entry.display_name or entry.name, entry.preset, entry.image_pattern,
                                      entry.mask_pattern, entry.id_markers, entry.patch_size)
            register_dataset(spec)
            added.append(entry.name)
    return tuple(added)


ATLAS = register_dataset(foundation_dataset("ATLAS", "ATLAS", image_pattern="**/*_T1w.nii.gz", mask_pattern="**/*_label-L_desc-T1lesion_mask.nii.gz"))
UOA_PRIVATE = register_dataset(foundation_dataset("UOA_Private", "UOA", image_pattern="**/*_T1_FNIRT_MNI.nii.gz", mask_pattern="**/*_lesion.nii.gz"))
