"""BraTS 2024 adult glioma (GLI): case discovery and T2-FLAIR preprocessing for pretraining.

Layout: ``ROOT/BraTS-GLI-PPPPP-VVV/BraTS-GLI-PPPPP-VVV-{t1n,t1c,t2w,t2f,seg}.nii.gz``, possibly
nested deeper under ``ROOT`` (names matched case-insensitively). ``PPPPP`` is the patient and
``VVV`` the visit (``-100``, ``-101``): splits group by patient. Only ``t2f`` (T2-FLAIR) and
``seg`` are used; seg labels 1-4 (core, FLAIR hyperintensity, enhancing, resection cavity) are
merged into one binary mask.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..core.case import LABEL, Case, Image
from ..core.geometry import as_label_map, rescale_affine, resample_to_shape, zscore
from ..core.io import CaseError, check_same_grid, load_image, load_nifti, save_npz
from ..core.runner import CaseResult
from .registry import DatasetSpec, register_dataset, same_folder, settings_from_run_args

__all__ = [
    "brats_case", "BRATS_KEYS", "SEG_LABELS", "BRATS2024", "discover_brats_cases", "patient_id", "read_brats_case",
    "prepare_brats_case", "preprocess_brats_case",
]

BRATS_KEYS = ("image", "mask")
SEG_LABELS = (0, 1, 2, 3, 4)
_CASE_DIR = re.compile(r"^BraTS-GLI-(\d{5})-(\d{3})$", re.IGNORECASE)


def brats_case(case_id: str, patient: str, t2f: Path | None, seg: Path | None, problem: str = "") -> Case:
    """One BraTS visit found on disk, not read yet: ``sources`` ``image`` (the T2-FLAIR) and the
    label (the seg file; None: not found); ``meta`` its ``patient_id`` and a one-line discovery
    ``problem`` (duplicate case folder or file), reported when the case is processed."""
    meta = {"patient_id": patient, **({"problem": problem} if problem else {})}
    return Case(case_id, sources={"image": t2f, LABEL: seg}, meta=meta)


def _find_files(case_dir: Path, suffix: str) -> list[Path]:
    """``<case>-<suffix>.nii.gz`` (or ``.nii``) files inside ``case_dir``, matched case-insensitively."""
    wanted = {f"{case_dir.name}-{suffix}.nii.gz".lower(), f"{case_dir.name}-{suffix}.nii".lower()}
    return sorted(p for p in case_dir.iterdir() if p.is_file() and p.name.lower() in wanted)


def patient_id(case_id: str) -> str:
    """The 5-digit patient of a ``BraTS-GLI-PPPPP-VVV`` case id; :class:`CaseError` for another name."""
    match = _CASE_DIR.match(case_id)
    if not match:
        raise CaseError(f"{case_id}: not a BraTS-GLI-PPPPP-VVV case id")
    return match.group(1)


def _case_from_dir(case_dir: Path) -> Case:
    patient = patient_id(case_dir.name)
    t2f, seg = _find_files(case_dir, "t2f"), _find_files(case_dir, "seg")
    problem = ""
    for kind, hits in (("t2f", t2f), ("seg", seg)):
        if len(hits) > 1:
            problem = f"{case_dir}: several {kind} files: {[p.name for p in hits]}"
    return brats_case(case_dir.name, patient, t2f[0] if t2f else None, seg[0] if seg else None, problem)


def discover_brats_cases(brats_dir: str | Path) -> list[Case]:
    """Find every ``BraTS-GLI-PPPPP-VVV`` folder under ``brats_dir`` (at any depth).

    Returns cases (:func:`brats_case`) sorted by id, ``meta["patient_id"]`` the 5 digits. A case folder found twice
    becomes one case carrying a ``problem``. Raises :class:`CaseError` when the folder is missing
    or holds no case folder.
    """
    root = Path(brats_dir)
    if not root.is_dir():
        raise CaseError(f"{root}: BraTS folder not found")
    cases: dict[str, Case] = {}
    first_dir: dict[str, Path] = {}
    for case_dir in sorted(p for p in root.rglob("*") if p.is_dir() and _CASE_DIR.match(p.name)):
        key = case_dir.name.lower()
        if key in cases:
            problem = f"{case_dir}: case folder found twice (also {first_dir[key]})"
            cases[key] = brats_case(cases[key].case_id, cases[key].meta["patient_id"], None, None, problem)
            continue
        first_dir[key] = case_dir
        cases[key] = _case_from_dir(case_dir)
    if not cases:
        raise CaseError(f"{root}: no BraTS-GLI-PPPPP-VVV case folders found")
    return sorted(cases.values(), key=lambda c: c.case_id)


def read_brats_case(case: Case) -> Case:
    """Read a discovered visit: image ``image`` (T2-FLAIR float32) and the label uint8 {0,1},
    seg labels 1-4 merged. T2-FLAIR and seg must share shape and affine (1e-3 mm); seg values
    outside 0-4 are an error. Raises :class:`CaseError` naming the file or the missing one."""
    if case.problem:
        raise CaseError(case.problem)
    if case.source("image") is None:
        raise CaseError(f"{case.case_id}: no T2-FLAIR file ({case.case_id}-t2f.nii.gz)")
    if case.source(LABEL) is None:
        raise CaseError(f"{case.case_id}: no segmentation file ({case.case_id}-seg.nii.gz)")
    flair = load_image(case.source("image"))
    seg = load_nifti(case.source(LABEL))
    check_same_grid(flair, "T2-FLAIR", (seg,))
    tumour = (as_label_map(seg.data, SEG_LABELS, seg.path) > 0).astype(np.uint8)
    return case.replace(images={"image": flair}, label=Image(tumour, seg.affine, seg.zooms, seg.path))


def prepare_brats_case(case: Case, settings: Mapping[str, Any]) -> Case:
    """The network input of a read visit: T2-FLAIR resampled to ``settings["target_shape"]``
    (trilinear), then z-scored over its non-zero voxels (0 outside), float32 (X, Y, Z); the label
    resampled nearest-neighbour (never interpolated and re-thresholded). ``meta``: ``bbox`` and
    ``cropped_shape``, the whole native volume."""
    target_shape = tuple(int(n) for n in settings["target_shape"])
    flair = case.image("image")
    grid = rescale_affine(flair.affine, flair.shape, target_shape)
    image = Image(zscore(resample_to_shape(flair.data, target_shape, is_label=False)), grid, path=flair.path)
    label = None if case.label is None else Image(resample_to_shape(case.label.data, target_shape, is_label=True), grid, path=flair.path)
    meta = {"bbox": np.array([[0, n] for n in flair.shape], dtype=np.int64), "cropped_shape": flair.shape}
    return case.replace(images={"image": image}, label=label, meta=meta)


def preprocess_brats_case(case: Case, output_dir: Path, target_shape: tuple[int, int, int], overwrite: bool) -> CaseResult:
    """Read (:func:`read_brats_case`) and prepare (:func:`prepare_brats_case`) one visit; write
    ``<case>.npz``: ``image`` float32 (X, Y, Z) and ``mask`` uint8 {0,1} on the ``target_shape``
    grid. ``info`` holds the patient id and lesion volumes (voxels on the output grid, which
    orders the splits; ml on the native grid).
    """
    if case.problem:
        raise CaseError(case.problem)
    out_path = output_dir / f"{case.case_id}.npz"
    if out_path.exists() and not overwrite:
        return CaseResult(case.case_id, "skipped", reason="output exists (use --overwrite)")
    native = read_brats_case(case)
    prepared = prepare_brats_case(native, {"target_shape": target_shape})
    flair, tumour, mask = native.image("image"), native.label.data, prepared.label.data
    save_npz(out_path, {"image": prepared.image("image").data, "mask": mask}, compress=False)  # memory-mapped by the trainer
    info = {
        "patient_id": case.meta["patient_id"],
        "lesion_voxels": int(mask.sum()),
        "lesion_ml_native": float(tumour.sum()) * flair.voxel_volume_ml,
        "original_shape": list(flair.data.shape),
        "spacing_mm": list(flair.zooms),
    }
    return CaseResult(case.case_id, "done", info=info)


# Pretraining only: evaluate.py does not score BraTS (no load_eval_case).
BRATS2024 = register_dataset(DatasetSpec(
    name="BraTS2024",
    display_name="BraTS 2024",
    input_keys=("image",),
    mask_key="mask",
    splits_name="brats2024_t2flair_splits_5fold.json",
    preset="atlas22",
    table_layout="dataset",
    whole_brain=True,
    find_case_dir=same_folder,
    read_preprocessing=functools.partial(settings_from_run_args, keys=("target_shape",)),
    run_config_key="brats_dir",
    modalities=(("image", "**/BraTS-GLI-*-t2f.nii*"),),
    label_pattern="**/BraTS-GLI-*-seg.nii*",
    reader=discover_brats_cases,
    prepare=prepare_brats_case,
    scoring_grid="preprocessed",
    split_group=patient_id,
))
