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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.geometry import as_label_map, resample_to_shape, zscore
from ..core.io import CaseError, check_same_grid, load_image, load_nifti, save_npz
from ..core.runner import CaseResult
from .registry import DatasetSpec, register_dataset, same_folder, settings_from_run_args

__all__ = ["BratsCase", "BRATS_KEYS", "SEG_LABELS", "BRATS2024", "discover_brats_cases", "patient_id", "preprocess_brats_case"]

BRATS_KEYS = ("image", "mask")
SEG_LABELS = (0, 1, 2, 3, 4)
_CASE_DIR = re.compile(r"^BraTS-GLI-(\d{5})-(\d{3})$", re.IGNORECASE)


@dataclass(frozen=True)
class BratsCase:
    """Paths of one BraTS visit. A missing file is None and a discovery problem (duplicate case
    folder or file) is a one-line ``problem``; both are reported when the case is processed."""

    case_id: str
    patient_id: str
    t2f: Path | None
    seg: Path | None
    problem: str = ""


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


def _case_from_dir(case_dir: Path) -> BratsCase:
    patient = patient_id(case_dir.name)
    t2f, seg = _find_files(case_dir, "t2f"), _find_files(case_dir, "seg")
    problem = ""
    for kind, hits in (("t2f", t2f), ("seg", seg)):
        if len(hits) > 1:
            problem = f"{case_dir}: several {kind} files: {[p.name for p in hits]}"
    return BratsCase(case_dir.name, patient, t2f[0] if t2f else None, seg[0] if seg else None, problem)


def discover_brats_cases(brats_dir: str | Path) -> list[BratsCase]:
    """Find every ``BraTS-GLI-PPPPP-VVV`` folder under ``brats_dir`` (at any depth).

    Returns cases sorted by id, with ``patient_id`` = the 5 digits. A case folder found twice
    becomes one case carrying a ``problem``. Raises :class:`CaseError` when the folder is missing
    or holds no case folder.
    """
    root = Path(brats_dir)
    if not root.is_dir():
        raise CaseError(f"{root}: BraTS folder not found")
    cases: dict[str, BratsCase] = {}
    first_dir: dict[str, Path] = {}
    for case_dir in sorted(p for p in root.rglob("*") if p.is_dir() and _CASE_DIR.match(p.name)):
        key = case_dir.name.lower()
        if key in cases:
            problem = f"{case_dir}: case folder found twice (also {first_dir[key]})"
            cases[key] = BratsCase(cases[key].case_id, cases[key].patient_id, None, None, problem)
            continue
        first_dir[key] = case_dir
        cases[key] = _case_from_dir(case_dir)
    if not cases:
        raise CaseError(f"{root}: no BraTS-GLI-PPPPP-VVV case folders found")
    return sorted(cases.values(), key=lambda c: c.case_id)


def preprocess_brats_case(
    case: BratsCase, output_dir: Path, target_shape: tuple[int, int, int], overwrite: bool
) -> CaseResult:
    """Resample T2-FLAIR and the merged tumour mask to ``target_shape``; write ``<case>.npz``.

    Keys: ``image`` float32 (X, Y, Z), trilinear, then z-scored over its non-zero voxels (0
    outside); ``mask`` uint8 {0,1} (X, Y, Z): seg labels 1-4 merged, resampled with nearest
    neighbour (never interpolated and re-thresholded). T2-FLAIR and seg must share shape and
    affine (1e-3 mm); seg values outside 0-4 are an error. ``info`` holds the patient id and
    lesion volumes (voxels on the output grid, which orders the splits; ml on the native grid).
    """
    if case.problem:
        raise CaseError(case.problem)
    out_path = output_dir / f"{case.case_id}.npz"
    if out_path.exists() and not overwrite:
        return CaseResult(case.case_id, "skipped", reason="output exists (use --overwrite)")
    if case.t2f is None:
        raise CaseError(f"{case.case_id}: no T2-FLAIR file ({case.case_id}-t2f.nii.gz)")
    if case.seg is None:
        raise CaseError(f"{case.case_id}: no segmentation file ({case.case_id}-seg.nii.gz)")
    flair = load_image(case.t2f)
    seg = load_nifti(case.seg)
    check_same_grid(flair, "T2-FLAIR", (seg,))
    tumour = (as_label_map(seg.data, SEG_LABELS, seg.path) > 0).astype(np.uint8)
    mask = resample_to_shape(tumour, target_shape, is_label=True)
    image = zscore(resample_to_shape(flair.data, target_shape, is_label=False))
    save_npz(out_path, {"image": image, "mask": mask}, compress=False)  # memory-mapped by the trainer
    info = {
        "patient_id": case.patient_id,
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
    stage="brats",
    find_case_dir=same_folder,
    read_preprocessing=functools.partial(settings_from_run_args, keys=("target_shape",)),
    run_config_key="brats_dir",
))
