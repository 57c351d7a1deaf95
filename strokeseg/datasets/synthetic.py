"""Synthetic MRI datasets written in the real on-disk layouts (SPEC.md section 1).

Every dataset is built from the same pure building blocks of :mod:`strokeseg.datasets.phantom`
(tissue label maps, lesions, rendering, oblique affines). Case ``i`` is drawn from
its own generator (:func:`synthetic_rng`), so its content depends on ``seed`` and ``i`` only, never
on how many cases are generated. Files are written with :func:`strokeseg.core.io.save_nifti`.

Example (tiny test-sized ISLES data, every 3rd case lesion-free)::

    python -m strokeseg.datasets.synthetic --dataset isles --out /tmp/isles --n-cases 6 --seed 0 \\
        --layout B --shape 40 40 24 --empty-every 3
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from ..core.io import save_nifti
from ..core.runner import progress, write_run_args
from .phantom import CONTRASTS, Tissue, blob, brain_phantom, check_shape, draw_centre, extent, lesion_mask, oblique_affine, render

__all__ = [
    "MARKER",
    "is_generated",
    "synthetic_rng",
    "make_isles",
    "make_atlas",
    "make_uoa",
    "make_brats",
    "main",
]

Shape3 = tuple[int, int, int]
MARKER = "synthetic.json"  # the demo's record of the datasets it generated, beside them (strokeseg.demo)


def is_generated(folder: str | Path) -> bool:
    """Whether the raw dataset ``folder`` was generated here: :data:`MARKER` in it or its parent."""
    folder = Path(folder)
    return (folder / MARKER).is_file() or (folder.parent / MARKER).is_file()


_GLIOTIC_RIM_VOXELS = 2  # chronic lesions: a CSF-dark core inside a rim this thick (both lesion)
_MNI_MIN_LESION_RADIUS = _GLIOTIC_RIM_VOXELS + 1.5  # voxels: room for a core inside the rim
_HEAD = {Tissue.SCALP: 0.75, Tissue.SKULL: 0.08}  # T1 of a head that was not skull-stripped

_DATASET_KEYS = {"isles": 1, "atlas": 2, "uoa": 3, "brats": 4, "isles24": 5}  # isles24: synthetic_isles24.py
_LESION_COUNTS, _LESION_COUNT_P = (1, 2, 3, 4), (0.4, 0.3, 0.15, 0.15)
_MNI_RADII = (0.36, 0.38, 0.34)  # brain semi-axes as fractions of an MNI grid (X, Y, Z)
_MNI_CENTRE_MM = (0.0, -18.0, 22.0)  # world position of the MNI grid's centre voxel
_ATLAS_SUBJECTS_PER_COHORT = 4
_UOA_ALT_SPACING_MM = (1.25, 1.5, 2.0)  # distinct per axis so axis-order mistakes show
_BRATS_RADII = (0.29, 0.36, 0.40)
_BRATS_SEG = {Tissue.CORE: 1, Tissue.OEDEMA: 2, Tissue.ENHANCING: 3, Tissue.CAVITY: 4}
_BRATS_MODALITIES = {"t1n": "t1", "t1c": "t1c", "t2w": "t2", "t2f": "flair"}


# --------------------------------------------------------------------------- building blocks


def synthetic_rng(seed: int, dataset: str, *key: int) -> np.random.Generator:
    """Generator for one case: ``dataset`` (isles, atlas, uoa, brats, isles24), then integer ``key`` parts
    (case index; BraTS adds the visit). Independent of how many cases are generated."""
    if seed < 0 or any(k < 0 for k in key):
        raise ValueError(f"seed and case keys must be >= 0, got seed={seed}, key={key}")
    if dataset not in _DATASET_KEYS:
        raise ValueError(f"dataset must be one of {sorted(_DATASET_KEYS)}, got {dataset!r}")
    return np.random.default_rng(np.random.SeedSequence([seed, _DATASET_KEYS[dataset], *key]))


# --------------------------------------------------------------------------- shared case logic



def _check_count(value: int, name: str, minimum: int) -> None:
    if int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")


def _every(index: int, every: int) -> bool:
    """True for case numbers every, 2*every, ... (index is 0-based); never when every == 0."""
    return every > 0 and (index + 1) % every == 0


def _lesion_count(rng: np.random.Generator, empty: bool) -> int:
    return 0 if empty else int(rng.choice(_LESION_COUNTS, p=_LESION_COUNT_P))


def _parenchyma(labels: np.ndarray) -> np.ndarray:
    return (labels == Tissue.GM) | (labels == Tissue.WM)


def _mni_case(rng: np.random.Generator, shape: Shape3, empty: bool, head: bool) -> tuple[np.ndarray, np.ndarray]:
    """T1 (float32, a.u.) and lesion (bool) of one MNI-space stroke case (ATLAS and UOA)."""
    labels = brain_phantom(rng, shape, np.asarray(_MNI_RADII) * rng.uniform(0.97, 1.03, 3))
    lesion = lesion_mask(rng, _parenchyma(labels), _lesion_count(rng, empty), (0.05, 0.4), _MNI_MIN_LESION_RADIUS)
    labels[lesion] = Tissue.GLIOSIS  # the core alone would be as dark as CSF
    labels[ndimage.binary_erosion(lesion, iterations=_GLIOTIC_RIM_VOXELS)] = Tissue.STROKE
    contrast = {**CONTRASTS["t1"], **_HEAD} if head else CONTRASTS["t1"]
    t1 = render(rng, labels, contrast, noise_sd=0.04) * np.float32(rng.uniform(60.0, 120.0))
    return t1, lesion


# --------------------------------------------------------------------------- ISLES 2022


def _isles_grid(rng: np.random.Generator, shape: Shape3 | None) -> tuple[Shape3, np.ndarray]:
    """Per-case DWI grid: shape (voxels) and anisotropic spacing (mm, X Y Z)."""
    in_plane, slices = rng.uniform(1.8, 2.2), rng.uniform(2.4, 5.0)
    spacing = np.array([in_plane, in_plane, slices])
    if shape is None:
        fov_mm = np.array([rng.uniform(210, 240)] * 2 + [rng.uniform(130, 160)])
        return check_shape(np.round(fov_mm / spacing)), spacing
    jitter = rng.uniform(0.9, 1.1, 2)
    return check_shape(np.round(np.asarray(shape) * jitter[[0, 0, 1]])), spacing


def _isles_case(seed: int, index: int, shape: Shape3 | None, empty: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Arrays and affines of one ISLES case: keys dwi, adc, msk (one grid) and flair (its own)."""
    rng = synthetic_rng(seed, "isles", index)
    grid, spacing = _isles_grid(rng, shape)
    angles = np.array([rng.choice([-1, 1]) * rng.uniform(3, 12), 0.0, 0.0])
    if rng.random() < 0.5:
        angles[2] = rng.choice([-1, 1]) * rng.uniform(1, 5)
    centre_mm = rng.uniform([-5, -25, 5], [5, -10, 25])
    affine = oblique_affine(grid, spacing, angles, centre_mm, axis_signs=(-1, 1, 1))
    labels = brain_phantom(rng, grid, rng.uniform(0.33, 0.39, 3))
    lesion = lesion_mask(rng, _parenchyma(labels), _lesion_count(rng, empty), (0.04, 0.4))
    labels[lesion] = Tissue.STROKE
    integer_scale = rng.random() < 0.5  # centres store 0-4095 integers or ~0-5 floats
    dwi = render(rng, labels, CONTRASTS["dwi"], noise_sd=0.05) * np.float32(rng.uniform(150, 1200))
    adc = render(rng, labels, CONTRASTS["adc"], noise_sd=0.08, bias_sd=0.03)
    if integer_scale:
        brain = labels >= Tissue.CSF
        dwi = np.where(brain, np.clip(np.round(dwi), 1, 32767), 0).astype(np.int16)
        adc = np.where(brain, np.clip(np.round(adc * 1000), 1, 4095), 0).astype(np.int16)
    else:
        dwi, adc = dwi.astype(np.float64), adc.astype(np.float64)
    flair_grid, flair_affine = _flair_grid(rng, grid, spacing, angles, centre_mm)
    to_dwi = np.linalg.inv(affine) @ flair_affine
    flair_labels = ndimage.affine_transform(
        labels, to_dwi[:3, :3], offset=to_dwi[:3, 3], output_shape=flair_grid, order=0, cval=0
    )
    flair = render(rng, flair_labels, CONTRASTS["flair"], noise_sd=0.04) * np.float32(rng.uniform(200, 2000))
    return {
        "dwi": (dwi, affine),
        "adc": (adc, affine),
        "msk": (lesion.astype(np.uint16), affine),
        "flair": (flair, flair_affine),
    }


def _flair_grid(
    rng: np.random.Generator, grid: Shape3, spacing: np.ndarray, angles: np.ndarray, centre_mm: np.ndarray
) -> tuple[Shape3, np.ndarray]:
    """FLAIR's own grid: finer in-plane, thicker slices, slightly different FOV and tilt."""
    in_plane = rng.uniform(0.8, 1.0)
    flair_spacing = np.array([in_plane, in_plane, rng.uniform(4.0, 6.0)])
    fov_mm = np.asarray(grid) * spacing * rng.uniform(1.0, 1.1)
    flair_grid = check_shape(np.maximum(np.round(fov_mm / flair_spacing), 8))
    flair_angles = angles + rng.uniform(-3, 3, 3)
    flair_centre = centre_mm + rng.uniform(-4, 4, 3)
    return flair_grid, oblique_affine(flair_grid, flair_spacing, flair_angles, flair_centre, axis_signs=(-1, 1, 1))


def _isles_paths(root: Path, case_id: str, layout: str) -> dict[str, Path]:
    session = f"{case_id}/ses-0001"
    stem = f"{case_id}_ses-0001"
    if layout == "A":
        raw = {
            "dwi": root / session / "dwi" / f"{stem}_dwi.nii.gz",
            "adc": root / session / "dwi" / f"{stem}_adc.nii.gz",
            "flair": root / session / "anat" / f"{stem}_FLAIR.nii.gz",
        }
    else:
        raw = {name: root / "rawdata" / session / f"{stem}_{name}.nii.gz" for name in ("dwi", "adc", "flair")}
    return {**raw, "msk": root / "derivatives" / session / f"{stem}_msk.nii.gz"}


def make_isles(
    root: str | os.PathLike,
    n_cases: int,
    layout: str = "A",
    seed: int = 0,
    shape: Sequence[int] | None = None,
    empty_every: int = 0,
) -> list[str]:
    """Write ``n_cases`` ISLES 2022-like cases under ``root``; return their ids (sub-strokecaseNNNN).

    layout: "A" (Zenodo BIDS: <sub>/ses-0001/dwi/..._dwi|_adc, anat/..._FLAIR) or "B" (organisers'
    sample: rawdata/<sub>/ses-0001/..._dwi|_adc|_flair); masks in derivatives/<sub>/ses-0001/..._msk.
    DWI, ADC and mask (uint16 {0,1}) share one oblique grid, anisotropic (about 2 x 2 x 2.4-5 mm);
    FLAIR has its own grid. ``shape`` (voxels, X Y Z) is the nominal DWI grid, varied by up to
    10 % per case; None gives realistic sizes (about 110 x 110 x 30-65). About half the cases
    store DWI/ADC as int16 with ADC in 1e-6 mm^2/s (0-4095), the others as float64 with ADC in
    1e-3 mm^2/s (0-5). DWI and ADC are 0 outside the brain. Every ``empty_every``-th case
    (0 = none) has an empty mask.
    """
    if layout not in ("A", "B"):
        raise ValueError(f"layout must be 'A' or 'B', got {layout!r}")
    _check_count(n_cases, "n_cases", 1)
    _check_count(empty_every, "empty_every", 0)
    nominal = None if shape is None else check_shape(shape)
    root = Path(root)
    case_ids = []
    for index in progress(range(n_cases), total=n_cases, desc="isles"):
        case_id = f"sub-strokecase{index + 1:04d}"
        volumes = _isles_case(seed, index, nominal, _every(index, empty_every))
        for name, path in _isles_paths(root, case_id, layout).items():
            save_nifti(path, *volumes[name])
        case_ids.append(case_id)
    return case_ids


# --------------------------------------------------------------------------- ATLAS v2.0 and UOA


def make_atlas(
    root: str | os.PathLike,
    n_cases: int,
    seed: int = 0,
    shape: Sequence[int] = (197, 233, 189),
    empty_every: int = 0,
) -> list[str]:
    """Write ``n_cases`` ATLAS v2.0-like cases; return their ids (``sub-r001s001_ses-1``: the file
    name before ``_space-``, as SPEC.md defines the ATLAS case id).

    Files: root/Training/R001/sub-r001s001/ses-1/anat/sub-r001s001_ses-1_space-MNI152NLin2009aSym_
    T1w.nii.gz (float32, head with skull, background 0; lesions: a CSF-dark core in a 2-voxel
    gliotic rim, semi-axes at least 3.5 voxels so that the core has room) and ..._label-L_desc-
    T1lesion_mask.nii.gz (uint8 {0,1}); 4 subjects per cohort folder R001, R002, ... 1 mm
    isotropic, axis-aligned MNI affine; ``shape`` in voxels. Every ``empty_every``-th case
    (0 = none) has an empty mask.
    """
    _check_count(n_cases, "n_cases", 1)
    _check_count(empty_every, "empty_every", 0)
    shape = check_shape(shape)
    affine = oblique_affine(shape, (1.0, 1.0, 1.0), centre_mm=_MNI_CENTRE_MM)
    case_ids = []
    for index in progress(range(n_cases), total=n_cases, desc="atlas"):
        cohort = index // _ATLAS_SUBJECTS_PER_COHORT + 1
        subject = f"sub-r{cohort:03d}s{index % _ATLAS_SUBJECTS_PER_COHORT + 1:03d}"
        anat = Path(root) / "Training" / f"R{cohort:03d}" / subject / "ses-1" / "anat"
        stem = anat / f"{subject}_ses-1_space-MNI152NLin2009aSym"
        t1, lesion = _mni_case(synthetic_rng(seed, "atlas", index), shape, _every(index, empty_every), head=True)
        save_nifti(f"{stem}_T1w.nii.gz", t1, affine)
        save_nifti(f"{stem}_label-L_desc-T1lesion_mask.nii.gz", lesion.astype(np.uint8), affine)
        case_ids.append(f"{subject}_ses-1")
    return case_ids


def make_uoa(
    root: str | os.PathLike,
    n_cases: int,
    seed: int = 0,
    shape: Sequence[int] = (182, 218, 182),
    empty_every: int = 0,
    spacing_every: int = 0,
) -> list[str]:
    """Write ``n_cases`` UOA-like cases; return their ids (UOA001, ...).

    Files: root/UOA001/UOA001_T1_FNIRT_MNI.nii.gz (float32, skull-stripped, lesions as in ATLAS) and
    root/UOA001/UOA001_lesion.nii.gz (float32 {0., 1.}), FSL-style MNI affine (x flipped).
    ``shape`` is the 1 mm grid in voxels. Every ``spacing_every``-th case (0 = none) is stored at
    1.25 x 1.5 x 2.0 mm instead, on a grid of about ``shape / spacing`` voxels covering the same
    field of view; every ``empty_every``-th case (0 = none) has an empty mask.
    """
    _check_count(n_cases, "n_cases", 1)
    _check_count(empty_every, "empty_every", 0)
    _check_count(spacing_every, "spacing_every", 0)
    shape = check_shape(shape)
    case_ids = []
    for index in progress(range(n_cases), total=n_cases, desc="uoa"):
        spacing = _UOA_ALT_SPACING_MM if _every(index, spacing_every) else (1.0, 1.0, 1.0)
        grid = check_shape(np.round(np.asarray(shape) / np.asarray(spacing)))
        affine = oblique_affine(grid, spacing, centre_mm=_MNI_CENTRE_MM, axis_signs=(-1, 1, 1))
        t1, lesion = _mni_case(synthetic_rng(seed, "uoa", index), grid, _every(index, empty_every), head=False)
        case_id = f"UOA{index + 1:03d}"
        save_nifti(Path(root) / case_id / f"{case_id}_T1_FNIRT_MNI.nii.gz", t1, affine)
        save_nifti(Path(root) / case_id / f"{case_id}_lesion.nii.gz", lesion.astype(np.float32), affine)
        case_ids.append(case_id)
    return case_ids


# --------------------------------------------------------------------------- BraTS 2024 GLI


def _brats_labels(seed: int, patient: int, visit: int, shape: Shape3) -> np.ndarray:
    """Label map of one visit: the patient's anatomy and tumour site, the visit's tumour shape.

    Visit 100 has a resection cavity with probability 0.3; later visits always have one and a
    tumour shrunk to 70 %.
    """
    rng = synthetic_rng(seed, "brats", patient)
    labels = brain_phantom(rng, shape, np.asarray(_BRATS_RADII) * rng.uniform(0.97, 1.03, 3))
    parenchyma = _parenchyma(labels)
    centre = draw_centre(rng, parenchyma, 0.6)
    oedema_radii = rng.uniform(0.3, 0.5) * extent(parenchyma)[1] * rng.uniform(0.8, 1.2, 3)
    visit_rng = synthetic_rng(seed, "brats", patient, visit)
    post_op = visit > 100 or visit_rng.random() < 0.3
    radii = oedema_radii * (0.7 if visit > 100 else 1.0)
    brain = labels >= Tissue.CSF
    for tissue, frac, lobes in ((Tissue.OEDEMA, 1.0, 2), (Tissue.ENHANCING, 0.6, 1), (Tissue.CORE, 0.4, 1)):
        box, mask = blob(visit_rng, shape, centre, radii * frac, n_lobes=lobes, roughness=0.15)
        labels[box][mask & brain[box]] = tissue
    if post_op:
        direction = visit_rng.standard_normal(3)
        cavity = centre + 0.45 * oedema_radii * direction / np.linalg.norm(direction)
        box, mask = blob(visit_rng, shape, cavity, 0.3 * oedema_radii, roughness=0.1)
        labels[box][mask & brain[box]] = Tissue.CAVITY
    return labels


def make_brats(
    root: str | os.PathLike,
    n_patients: int,
    seed: int = 0,
    shape: Sequence[int] = (240, 240, 155),
    second_visit_every: int = 3,
) -> list[str]:
    """Write BraTS 2024 GLI-like visits; return their ids (BraTS-GLI-PPPPP-VVV), sorted.

    Patient ``i`` gets the 5-digit id ``5 + 2 i`` and visit 100; every ``second_visit_every``-th
    patient (0 = none) also visit 101 (same anatomy, treated tumour). Files: root/<id>/<id>-
    {t1n,t1c,t2w,t2f}.nii.gz (float32, skull-stripped) and <id>-seg.nii.gz (uint8: 0 background,
    1 tumour core, 2 FLAIR hyperintensity, 3 enhancing, 4 resection cavity, nested). T2-FLAIR
    is bright over labels 1-3. 1 mm grid of ``shape`` voxels with the BraTS LPS-style affine.
    """
    _check_count(n_patients, "n_patients", 1)
    _check_count(second_visit_every, "second_visit_every", 0)
    shape = check_shape(shape)
    # BraTS headers: diag(-1, -1, 1) with the origin at (0, Y - 1, 0)
    centre_mm = (np.asarray(shape) - 1) / 2 * np.array([-1, 1, 1])
    affine = oblique_affine(shape, (1.0, 1.0, 1.0), centre_mm=centre_mm, axis_signs=(-1, -1, 1))
    seg_table = np.zeros(len(Tissue), dtype=np.uint8)
    for tissue, value in _BRATS_SEG.items():
        seg_table[tissue] = value
    case_ids = []
    for patient in progress(range(n_patients), total=n_patients, desc="brats"):
        visits = (100, 101) if _every(patient, second_visit_every) else (100,)
        for visit in visits:
            case_id = f"BraTS-GLI-{5 + 2 * patient:05d}-{visit}"
            labels = _brats_labels(seed, patient, visit, shape)
            rng = synthetic_rng(seed, "brats", patient, visit, 1)  # image noise, separate from the tumour draw
            for suffix, modality in _BRATS_MODALITIES.items():
                image = render(rng, labels, CONTRASTS[modality], noise_sd=0.04) * np.float32(rng.uniform(300, 3000))
                save_nifti(Path(root) / case_id / f"{case_id}-{suffix}.nii.gz", image, affine)
            save_nifti(Path(root) / case_id / f"{case_id}-seg.nii.gz", seg_table[labels], affine)
            case_ids.append(case_id)
    return sorted(case_ids)


# --------------------------------------------------------------------------- command line

_FILES_PER_CASE = {"isles": 4, "atlas": 2, "uoa": 2, "brats": 5}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m strokeseg.datasets.synthetic",
        description="Write a synthetic dataset in the on-disk layout of ISLES 2022, ATLAS v2.0, UOA or BraTS 2024.",
    )
    add = parser.add_argument
    add("--dataset", required=True, choices=sorted(_FILES_PER_CASE), help="which layout to write")
    add("--out", required=True, type=Path, metavar="DIR", help="dataset root directory (created)")
    add("--n-cases", required=True, type=int, metavar="N", help="number of cases (BraTS: patients), >= 1")
    add("--seed", type=int, default=0, metavar="S", help="random seed >= 0 (default 0); case i depends on S and i only")
    add("--layout", choices=("A", "B"), default=None,
        help="ISLES only: A = Zenodo BIDS, B = rawdata/ + derivatives/ (default A)")
    add("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), default=None,
        help="grid size in voxels (default: ISLES varied about 110x110x30-65 at ~2x2x2.4-5 mm, "
             "ATLAS 197 233 189, UOA 182 218 182, BraTS 240 240 155, all 1 mm)")
    add("--empty-every", type=int, default=0, metavar="K",
        help="every K-th case gets an empty lesion mask, 0 = none (default 0; not BraTS)")
    add("--spacing-every", type=int, default=0, metavar="K",
        help="UOA only: every K-th case at 1.25 x 1.5 x 2.0 mm instead of 1 mm, 0 = none (default 0)")
    add("--second-visit-every", type=int, default=3, metavar="K",
        help="BraTS only: every K-th patient also gets visit -101, 0 = none (default 3)")
    args = parser.parse_args(argv)
    if args.layout is not None and args.dataset != "isles":
        parser.error("--layout applies to --dataset isles only")
    if args.empty_every and args.dataset == "brats":
        parser.error("--empty-every does not apply to --dataset brats")
    if args.spacing_every and args.dataset != "uoa":
        parser.error("--spacing-every applies to --dataset uoa only")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dataset == "isles":
        case_ids = make_isles(args.out, args.n_cases, args.layout or "A", args.seed, args.shape, args.empty_every)
    elif args.dataset == "atlas":
        case_ids = make_atlas(args.out, args.n_cases, args.seed, args.shape or (197, 233, 189), args.empty_every)
    elif args.dataset == "uoa":
        shape = args.shape or (182, 218, 182)
        case_ids = make_uoa(args.out, args.n_cases, args.seed, shape, args.empty_every, args.spacing_every)
    else:
        case_ids = make_brats(args.out, args.n_cases, args.seed, args.shape or (240, 240, 155), args.second_visit_every)
    write_run_args(args.out, args)
    n_files = len(case_ids) * _FILES_PER_CASE[args.dataset]
    print(f"{args.dataset}: wrote {len(case_ids)} case(s), {n_files} NIfTI file(s) under {args.out}")
    for case_id in case_ids:
        print(f"  {case_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
