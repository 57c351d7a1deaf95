"""ISLES 2022: case discovery in both release layouts and per-case preprocessing.

Layout A (Zenodo BIDS): ``ROOT/<sub>/ses-*/dwi/<sub>_ses-*_{dwi,adc}.nii.gz``;
layout B (organisers' sample): ``ROOT/rawdata/<sub>/ses-*/<sub>_ses-*_{dwi,adc}.nii.gz``;
both with masks in ``ROOT/derivatives/<sub>/ses-*/<sub>_ses-*_msk.nii.gz``. ``--isles-dir`` may
be ROOT or its ``derivatives/`` folder. File names are matched case-insensitively.
"""
from __future__ import annotations

import argparse
import functools
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core.geometry import as_binary_mask, crop, foreground_bbox, resample_to_shape, zscore
from ..core.io import CaseError, NiftiVolume, check_finite, check_same_grid, load_image, load_nifti, load_npz, save_npz, walk_files
from ..core.runner import CaseResult, add_run_arguments
from .fingerprint import case_fingerprint
from .registry import DatasetSpec, EvalCase, register_dataset, same_folder, settings_from_run_args
from .splits import add_rebuild_splits_argument

__all__ = [
    "IslesCase",
    "IslesVolumes",
    "discover_isles_cases",
    "read_isles_case",
    "isles_arrays",
    "preprocess_isles_case",
    "add_isles_arguments",
    "IslesSettings",
    "load_isles_case",
    "ISLES2022",
    "TRAIN_KEYS",
    "BBOX_KEYS",
    "lesion_volumes_ml",
]

TRAIN_KEYS = ("dwi", "adc", "mask", "lesion_ml")
BBOX_KEYS = TRAIN_KEYS + ("bbox", "original_shape", "cropped_shape", "original_affine", "original_mask", "spacing")
_FILE = re.compile(r"^(sub-[^_]+)_(ses-[^_]+)_(dwi|adc|msk)\.nii(\.gz)?$", re.IGNORECASE)


@dataclass(frozen=True)
class IslesCase:
    """Paths of one ISLES case. A missing modality is None and a discovery problem (two files of
    one kind) is a one-line ``problem``; both are reported when the case is read. ``root`` and
    ``stem`` (``sub-X_ses-Y``) say where discovery looked, for that report."""

    case_id: str
    dwi: Path | None
    adc: Path | None
    mask: Path | None
    problem: str = ""
    root: Path | None = None
    stem: str = ""


_KIND_NAMES = {"dwi": "DWI", "adc": "ADC", "msk": "mask"}


def _dataset_root(isles_dir: Path) -> Path:
    if not isles_dir.is_dir():
        raise CaseError(f"{isles_dir}: ISLES folder not found")
    return isles_dir.parent if isles_dir.name.lower() == "derivatives" else isles_dir


def _find_isles_files(root: Path) -> dict[tuple[str, str], dict[str, list[Path]]]:
    """(subject, session) in lower case -> kind (dwi/adc/msk) -> files, following symbolic links.
    Masks count only under a ``derivatives`` folder, images only outside it."""
    found: dict[tuple[str, str], dict[str, list[Path]]] = {}
    for path in walk_files(root):
        match = _FILE.match(path.name)
        if not match:
            continue
        kind = match.group(3).lower()
        in_derivatives = any(part.lower() == "derivatives" for part in path.relative_to(root).parts)
        if (kind == "msk") == in_derivatives:
            key = (match.group(1).lower(), match.group(2).lower())  # letter case never splits a case
            found.setdefault(key, {}).setdefault(kind, []).append(path)
    return found


def _isles_case(root: Path, files: dict[str, list[Path]], with_session: bool) -> IslesCase:
    """The case of one subject/session; its id is spelled as in its first image file."""
    first = next(files[kind][0] for kind in ("dwi", "adc", "msk") if kind in files)
    match = _FILE.match(first.name)
    case_id = f"{match.group(1)}_{match.group(2)}" if with_session else match.group(1)
    problem = ""
    for kind in ("dwi", "adc", "msk"):
        paths = files.get(kind, [])
        if len(paths) > 1:
            problem = problem or f"{case_id}: {len(paths)} {_KIND_NAMES[kind]} files: {', '.join(str(p) for p in paths)}"
    single = {kind: files[kind][0] if files.get(kind) else None for kind in ("dwi", "adc", "msk")}
    stem = f"{match.group(1)}_{match.group(2)}"
    return IslesCase(case_id, single["dwi"], single["adc"], single["msk"], problem, root, stem)


def discover_isles_cases(isles_dir: str | Path) -> list[IslesCase]:
    """Find every subject with any of DWI, ADC or mask under the dataset root, in either layout.

    Returns cases sorted by id (``sub-strokecaseNNNN``; the session is added only when a
    subject has several). Folders reached through symbolic links are searched (each once).
    A missing or duplicated file (``X_dwi.nii`` beside ``X_dwi.nii.gz``) becomes the case's
    ``problem``. Raises :class:`CaseError` when the folder is missing or nothing ISLES-like is found.
    """
    root = _dataset_root(Path(isles_dir))
    found = _find_isles_files(root)
    if not found:
        raise CaseError(f"{root}: no ISLES 2022 files (*_dwi/_adc/_msk.nii.gz) found")
    sessions_per_sub: dict[str, int] = {}
    for sub, _ in found:
        sessions_per_sub[sub] = sessions_per_sub.get(sub, 0) + 1
    cases = [_isles_case(root, files, sessions_per_sub[sub] > 1) for (sub, _), files in found.items()]
    return sorted(cases, key=lambda c: c.case_id)


def _require(case: IslesCase, kind: str) -> Path:
    """The case's file of ``kind`` (dwi, adc, msk); :class:`CaseError` saying where discovery
    looked when there is none."""
    path = {"dwi": case.dwi, "adc": case.adc, "msk": case.mask}[kind]
    if path is not None:
        return path
    where = ""
    if case.root is not None:
        folder = f"{case.root / 'derivatives'}" if kind == "msk" else f"{case.root} outside derivatives/"
        where = f" (looked for {case.stem}_{kind}.nii[.gz] under {folder})"
    raise CaseError(f"{case.case_id}: no {_KIND_NAMES[kind]} file found{where}")


@dataclass(frozen=True)
class IslesVolumes:
    """One case read and checked at the door: DWI and ADC on one grid, the lesion mask uint8
    {0,1} (X, Y, Z) on that grid, or None when the case has none (prediction input). ADC is None
    only for prediction with a model that reads the DWI alone."""

    dwi: NiftiVolume
    adc: NiftiVolume | None
    mask: np.ndarray | None


def read_isles_case(case: IslesCase, require_mask: bool = True) -> IslesVolumes:
    """Load DWI, ADC and (when present, or always when ``require_mask``) the mask of a case.

    Raises :class:`CaseError` naming the file for a missing or duplicated modality, an
    unreadable, non-3-D or non-finite volume, a constant or near-empty DWI or ADC
    (:func:`strokeseg.core.io.check_image_content`), a shape or affine (1e-3) differing from the
    DWI's, or mask values other than 0/1.
    """
    if case.problem:
        raise CaseError(case.problem)
    dwi, adc = load_image(_require(case, "dwi")), load_image(_require(case, "adc"))
    msk = load_nifti(_require(case, "msk")) if require_mask or case.mask is not None else None
    check_same_grid(dwi, "DWI", (adc, msk) if msk is not None else (adc,))
    return IslesVolumes(dwi, adc, as_binary_mask(msk.data, msk.path) if msk is not None else None)


def isles_arrays(volumes: IslesVolumes, target_shape: tuple[int, int, int], margin: int) -> dict[str, np.ndarray]:
    """The arrays of :data:`BBOX_KEYS` for a case (``mask``, ``lesion_ml`` and ``original_mask``
    only with a mask).

    The volume is cropped to the DWI's non-zero box grown by ``margin`` voxels, resampled to
    ``target_shape`` (images trilinear, mask nearest) and DWI/ADC are z-scored on their non-zero
    voxels (no ``adc`` key when the case has no ADC). Raises :class:`CaseError` for an empty DWI.
    """
    dwi, adc, mask = volumes.dwi, volumes.adc, volumes.mask
    bbox = foreground_bbox(dwi.data, margin, path=dwi.path)
    arrays = {"dwi": zscore(resample_to_shape(crop(dwi.data, bbox), target_shape, is_label=False))}
    if adc is not None:
        arrays["adc"] = zscore(resample_to_shape(crop(adc.data, bbox), target_shape, is_label=False))
    if mask is not None:
        arrays["mask"] = resample_to_shape(crop(mask, bbox), target_shape, is_label=True)
        arrays["lesion_ml"] = np.float64(float(mask.sum()) * dwi.voxel_volume_ml)  # native grid
    arrays.update(
        bbox=bbox,
        original_shape=np.array(dwi.data.shape, dtype=np.int64),
        cropped_shape=bbox[:, 1] - bbox[:, 0],
        original_affine=dwi.affine,
    )
    if mask is not None:
        arrays["original_mask"] = mask
    arrays["spacing"] = np.array(dwi.zooms, dtype=np.float64)
    return arrays


def preprocess_isles_case(
    case: IslesCase, output_dir: Path, target_shape: tuple[int, int, int], margin: int, with_bbox: bool, overwrite: bool
) -> CaseResult:
    """Crop to the DWI brain, resample to ``target_shape``, z-score DWI/ADC, write ``<case>.npz``
    (:func:`read_isles_case`, :func:`isles_arrays`).

    Keys: ``dwi``, ``adc`` float32 (X, Y, Z) z-scored on non-zero voxels; ``mask`` uint8 {0,1};
    ``lesion_ml`` float64 scalar: lesion volume in ml on the native grid (what the splits stratify on).
    With ``with_bbox`` also: ``bbox`` int64 (3, 2) [start, stop) in native voxels,
    ``original_shape``/``cropped_shape`` int64 (3,), ``original_affine`` float64 (4, 4),
    ``original_mask`` uint8 native grid, ``spacing`` float64 (3,) mm.
    """
    if case.problem:
        raise CaseError(case.problem)
    out_path = output_dir / f"{case.case_id}.npz"
    if out_path.exists() and not overwrite:
        return CaseResult(case.case_id, "skipped", reason="output exists (use --overwrite)")
    volumes = read_isles_case(case)
    arrays = isles_arrays(volumes, target_shape, margin)
    save_npz(out_path, {key: arrays[key] for key in (BBOX_KEYS if with_bbox else TRAIN_KEYS)})
    mask, dwi = volumes.mask, volumes.dwi
    info = {
        "lesion_voxels_native": int(mask.sum()),
        "lesion_ml": float(arrays["lesion_ml"]),
        "original_shape": list(dwi.data.shape),
        "spacing_mm": list(dwi.zooms),
        # the brain is the DWI's non-zero voxels, as its crop box
        "fingerprint": case_fingerprint({"dwi": dwi.data, "adc": volumes.adc.data}, dwi.data != 0, dwi.zooms, float(arrays["lesion_ml"])),
    }
    return CaseResult(case.case_id, "done", info=info)


def add_isles_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of both ISLES preprocessing scripts (the paper's, plus margin, splits, workers, overwrite)."""
    parser.add_argument("--isles-dir", type=Path, required=True, help="ISLES 2022 dataset root or its derivatives/ folder (layout A or B)")
    parser.add_argument("--output-dir", type=Path, required=True, help="folder for <case>.npz, the splits file, summary and run_args.json")
    parser.add_argument("--target-shape", type=int, nargs=3, default=(96, 96, 96), metavar=("X", "Y", "Z"), help="resampled shape in voxels (default 96 96 96)")
    parser.add_argument("--margin", type=int, default=4, help="voxels kept around the DWI brain bounding box (default 4)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of cases held out as the fixed test set (default 0.2: 50 of 250)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the splits (default 42)")
    add_rebuild_splits_argument(parser)
    add_run_arguments(parser)


@dataclass(frozen=True)
class IslesSettings:
    """One ISLES preprocessing run: target_shape (voxels) and margin (voxels around the DWI
    brain bounding box) shape the data; with_bbox adds the native-space keys evaluation needs;
    test_fraction and seed make the splits file."""

    target_shape: tuple[int, int, int] = (96, 96, 96)
    margin: int = 4
    with_bbox: bool = False
    test_fraction: float = 0.2
    seed: int = 42

    def recorded(self, isles_dir: Path) -> dict[str, Any]:
        """What shapes an output folder (see :func:`strokeseg.core.runner.check_settings`): these
        settings and the resolved dataset root (so ``ROOT`` and ``ROOT/derivatives`` agree)."""
        root = _dataset_root(Path(isles_dir)).resolve()
        return {"isles_dir": str(root), **asdict(self), "target_shape": list(self.target_shape)}


def lesion_volumes_ml(output_dir: Path, case_ids: list[str]) -> dict[str, float]:
    """Case id -> lesion volume in ml on the native grid, read from ``lesion_ml`` of each
    ``<case>.npz`` in ``output_dir`` (what the splits stratify on: voxels of the resampled grid
    would scale with each case's crop). Raises :class:`CaseError` naming a file without it."""
    volumes = {}
    for case_id in case_ids:
        try:
            volumes[case_id] = float(load_npz(output_dir / f"{case_id}.npz", keys=("lesion_ml",))["lesion_ml"])
        except CaseError as err:  # e.g. written by a version that did not store it
            raise CaseError(f"{err}; rerun with --overwrite to rebuild it") from None
    return volumes


_EVAL_GEOMETRY = ("bbox", "cropped_shape", "original_shape", "original_affine", "original_mask", "spacing")


def load_isles_case(case_dir: Path, case_id: str, input_keys: Sequence[str]) -> EvalCase:
    """Read ``<case_id>.npz`` written by ``preprocess_isles_WITH_BBOX.py`` (needs its bbox keys):
    ``input_keys`` on the resampled crop, the reference on the native grid."""
    path = case_dir / f"{case_id}.npz"
    if not path.is_file():
        raise CaseError(f"{case_id}: listed in the splits file but {path} does not exist")
    data = load_npz(path)
    missing = [key for key in (*input_keys, *_EVAL_GEOMETRY) if key not in data]
    if missing:
        raise CaseError(f"{path}: missing key(s) {missing}; evaluation reads the output of preprocess_isles_WITH_BBOX.py")
    check_finite(path, {key: data[key] for key in (*input_keys, "spacing", "original_affine")})
    reference = data["original_mask"].astype(bool)
    if tuple(reference.shape) != tuple(int(s) for s in data["original_shape"]):
        raise CaseError(f"{path}: original_mask shape {reference.shape} differs from original_shape {data['original_shape'].tolist()}")
    return EvalCase(
        case_id=case_id,
        inputs={key: data[key].astype(np.float32, copy=False) for key in input_keys},
        reference=reference,
        affine=data["original_affine"].astype(np.float64),
        spacing=tuple(float(s) for s in data["spacing"]),
        bbox=data["bbox"],
        cropped_shape=tuple(int(s) for s in data["cropped_shape"]),
    )


ISLES2022 = register_dataset(DatasetSpec(
    name="ISLES2022",
    display_name="ISLES 2022",
    input_keys=("dwi", "adc"),
    mask_key="mask",
    splits_name="isles2022_splits_5fold.json",
    preset="isles22",
    table_layout="strategy",
    whole_brain=False,  # cropped to the DWI brain bounding box
    stage="isles",
    find_case_dir=same_folder,
    read_preprocessing=functools.partial(settings_from_run_args, keys=("target_shape", "margin")),
    load_eval_case=load_isles_case,
    pretrained_label="BraTS",
    run_config_key="isles_dir",
    bids_suffixes=(("dwi", ("dwi",)), ("adc", ("adc",)), ("mask", ("msk", "mask"))),
    # The challenge's DWI is the b=1000 trace image; its ADC maps hold 10^-3 mm²/s-like values
    # (brain median about 0.8-0.9).
    acquisition=(("dwi_b_value", 1000.0), ("adc_unit", 1e-3)),
))
