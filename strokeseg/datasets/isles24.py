"""ISLES 2024 (acute stroke CT): the reader, the preparation and the dataset spec, in one file.

Layout (SPEC.md section 1; the release uses ``sub-strokeNNNN``, ``ses-01`` acute, ``ses-02``
follow-up)::

    ROOT/rawdata/<sub>/ses-01/<sub>_ses-01_ncct.nii.gz
    ROOT/derivatives/<sub>/ses-01/perfusion-maps/<sub>_ses-01_space-ncct_{cbf,cbv,mtt,tmax}.nii.gz
    ROOT/derivatives/<sub>/ses-02/<sub>_ses-02_lesion-msk.nii.gz   (final infarct, NCCT grid)

The network reads NCCT and the four perfusion maps, all on the NCCT grid (CTA and the 4-D CTP
series are not used). ``--isles-dir`` may be ROOT or its ``derivatives/`` folder; file names
match case-insensitively. Preparation is the ISLES 2022 recipe (crop to the brain's box grown by
a margin, resample to a target shape, z-score inside the brain) with a window per modality:
NCCT clipped to the brain window (:data:`NCCT_WINDOW_HU`), each perfusion map to its
:data:`PERFUSION_CLIP_PERCENTILE` within the brain (vessels reach CBF/CBV far above tissue). The
brain is where any perfusion map is non-zero (the maps are computed inside the brain only).
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..core.case import LABEL, Case, Image
from ..core.geometry import clip_between, clip_percentile, crop, crop_affine, foreground_bbox, resample_to_shape, zscore
from ..core.io import CaseError, glob_regex, walk_files
from .isles import isles_settings, load_isles_case
from .registry import DatasetSpec, register_dataset, same_folder, settings_from_run_args

__all__ = [
    "INPUT_KEYS",
    "PERFUSION_KEYS",
    "NCCT_WINDOW_HU",
    "PERFUSION_CLIP_PERCENTILE",
    "read_isles24_cases",
    "brain_region",
    "window",
    "prepare_isles24",
    "ISLES2024",
]

NAME = "ISLES2024"
PERFUSION_KEYS = ("cbf", "cbv", "mtt", "tmax")
INPUT_KEYS = ("ncct", *PERFUSION_KEYS)  # channel order
NCCT_WINDOW_HU = (0.0, 80.0)  # the brain window (level 40, width 80 HU)
PERFUSION_CLIP_PERCENTILE = 99.5  # each map clipped to its 0.5-99.5 % range inside the brain

# Modality key -> file glob relative to the dataset root (channel order), and the label's glob.
MODALITIES = (
    ("ncct", "rawdata/*/ses-01/*_ses-01_ncct.nii*"),
    *((key, f"derivatives/*/ses-01/perfusion-maps/*_ses-01_space-ncct_{key}.nii*") for key in PERFUSION_KEYS),
)
LABEL_PATTERN = "derivatives/*/ses-02/*_ses-02_lesion-msk.nii*"
_SUBJECT = re.compile(r"^(sub-[^_/]+)_", re.IGNORECASE)


def _dataset_root(isles_dir: Path) -> Path:
    """ROOT for ROOT or ROOT/derivatives; :class:`CaseError` when the folder is missing."""
    if not isles_dir.is_dir():
        raise CaseError(f"{isles_dir}: ISLES 2024 folder not found")
    return isles_dir.parent if isles_dir.name.lower() == "derivatives" else isles_dir


def read_isles24_cases(isles_dir: Path) -> list[Case]:
    """The cases under an ISLES 2024 root (or its ``derivatives/``), sorted by id (the subject,
    ``sub-strokeNNNN``, spelled as in its first file): ``sources`` name the files of
    :data:`INPUT_KEYS` and of the label (None where none was found), images are not read.
    Two files of one kind for a subject become ``meta["problem"]``. Raises :class:`CaseError`
    when the folder is missing or holds no ISLES 2024 file."""
    root = _dataset_root(Path(isles_dir))
    patterns = [(key, glob_regex(glob, ignore_case=True)) for key, glob in (*MODALITIES, (LABEL, LABEL_PATTERN))]
    found: dict[str, dict[str, list[Path]]] = {}
    for path in walk_files(root):
        relative = path.relative_to(root).as_posix()
        key = next((key for key, regex in patterns if regex.match(relative)), None)
        subject = _SUBJECT.match(path.name)
        if key is not None and subject:
            found.setdefault(subject.group(1).lower(), {}).setdefault(key, []).append(path)
    if not found:
        raise CaseError(f"{root}: no ISLES 2024 files (rawdata/*/ses-01/*_ncct.nii.gz, perfusion-maps, ses-02 lesion-msk) found")
    return sorted((_case(files) for files in found.values()), key=lambda case: case.case_id)


def _case(files: Mapping[str, list[Path]]) -> Case:
    """The unread case of one subject's files (kind -> paths)."""
    first = next(paths[0] for paths in files.values())
    case_id = _SUBJECT.match(first.name).group(1)
    doubled = [f"{len(paths)} {key} files: {', '.join(map(str, paths))}" for key, paths in files.items() if len(paths) > 1]
    sources = {key: files[key][0] if key in files else None for key in (*INPUT_KEYS, LABEL)}
    meta = {"dataset": NAME, **({"problem": f"{case_id}: {doubled[0]}"} if doubled else {})}
    return Case(case_id, sources=sources, meta=meta)


def brain_region(case: Case) -> np.ndarray:
    """Bool (X, Y, Z): voxels where any perfusion map of a read case is non-zero."""
    return np.any([case.image(key).data != 0 for key in PERFUSION_KEYS], axis=0)


def window(key: str, volume: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """The intensity window of modality ``key`` on the native grid, float32 (X, Y, Z): NCCT
    clipped to :data:`NCCT_WINDOW_HU` (skull and air no longer dominate its scale), a perfusion
    map to its :data:`PERFUSION_CLIP_PERCENTILE` bounds over ``brain`` (bool (X, Y, Z))."""
    if key == "ncct":
        return clip_between(volume, *NCCT_WINDOW_HU)
    return clip_percentile(volume, brain, PERFUSION_CLIP_PERCENTILE)


def prepare_isles24(case: Case, settings: Mapping[str, Any]) -> Case:
    """A read native case (:func:`strokeseg.core.case_io.read_images` of :data:`INPUT_KEYS`; the
    label optional) -> the network input: each of :data:`INPUT_KEYS` windowed
    (:func:`window`), cropped to the brain's box grown by ``settings["margin"]`` voxels,
    resampled to ``settings["target_shape"]`` (trilinear; the label nearest neighbour) and
    z-scored over the resampled brain (0 outside it), float32.

    The result's images carry the network grid's affine; ``meta`` holds ``bbox`` int64 (3, 2)
    [start, stop) native voxels, ``cropped_shape`` (voxels), ``brain`` (bool, native grid: where
    the stage summarises intensities) and with a label ``lesion_ml`` (native volume, ml). Raises
    ValueError for settings other than :func:`strokeseg.datasets.isles.isles_settings` accepts and
    :class:`CaseError` for a case whose perfusion maps are empty."""
    target_shape, margin = isles_settings(settings, "preprocessing settings")
    native = case.image("ncct")
    brain = brain_region(case)
    bbox = foreground_bbox(brain, margin, path=case.source("tmax") or case.case_id)
    affine = crop_affine(native.affine, bbox, target_shape)
    net_brain = resample_to_shape(crop(brain, bbox), target_shape, is_label=True)
    images = {}
    for key in INPUT_KEYS:
        windowed = crop(window(key, case.image(key).data, brain), bbox)
        images[key] = Image(zscore(resample_to_shape(windowed, target_shape, is_label=False), net_brain), affine)
    meta: dict[str, Any] = {"bbox": bbox, "cropped_shape": tuple(int(n) for n in bbox[:, 1] - bbox[:, 0]), "brain": brain}
    label = None
    if case.label is not None:
        label = Image(resample_to_shape(crop(case.label.data, bbox), target_shape, is_label=True), affine)
        meta["lesion_ml"] = float(case.label.data.sum()) * native.voxel_volume_ml
    return case.replace(images=images, label=label, meta=meta)


ISLES2024 = register_dataset(DatasetSpec(
    name=NAME,
    display_name="ISLES 2024",
    input_keys=INPUT_KEYS,
    mask_key="mask",
    splits_name="isles2024_splits_5fold.json",
    preset="isles24",
    table_layout="strategy",
    whole_brain=False,  # cropped to the brain's bounding box
    find_case_dir=same_folder,
    read_preprocessing=functools.partial(settings_from_run_args, keys=("target_shape", "margin")),
    load_eval_case=load_isles_case,  # the ISLES .npz contract: inputs on the crop, reference native
    bids_suffixes=(*((key, (key,)) for key in INPUT_KEYS), ("mask", ("lesion-msk", "msk"))),
    modalities=MODALITIES,
    label_pattern=LABEL_PATTERN,
    reader=read_isles24_cases,
    prepare=prepare_isles24,
    validate_settings=isles_settings,
    scoring_grid="native",
))
