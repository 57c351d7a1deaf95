"""Synthetic ISLES 2024 cases (acute stroke CT) written in the release's layout (SPEC.md section 1).

Per case ``sub-strokeNNNN`` (``N`` = case index + 1)::

    ROOT/rawdata/<sub>/ses-01/<sub>_ses-01_{ncct,cta}.nii.gz, <sub>_ses-01_ctp.nii.gz (4-D)
    ROOT/derivatives/<sub>/ses-01/perfusion-maps/<sub>_ses-01_space-ncct_{cbf,cbv,mtt,tmax}.nii.gz
    ROOT/derivatives/<sub>/ses-01/<sub>_ses-01_space-ncct_{cta,ctp}.nii.gz
    ROOT/derivatives/<sub>/ses-02/<sub>_ses-02_lesion-msk.nii.gz

Every volume lies on the case's NCCT grid (the raw CTA and CTP too: the release registers them,
here they are born registered). The head is the phantom of :mod:`strokeseg.datasets.phantom`
rendered in CT units: NCCT and CTA in Hounsfield units (int16, air -1024), the perfusion maps
(float32, 0 outside the brain) in their clinical units: CBF ml/100 g/min, CBV ml/100 g, MTT and
Tmax in seconds. The final infarct (the ``ses-02`` label) is the learnable signal: Tmax high,
CBF and CBV low, MTT long, faintly hypodense on NCCT; a hypoperfused rim around it (delayed Tmax,
reduced CBF, not infarcted) makes the task more than a Tmax threshold. Case ``i`` depends on
``seed`` and ``i`` only (:func:`strokeseg.datasets.synthetic.synthetic_rng`, key "isles24").

Example (tiny test-sized data)::

    python -m strokeseg.datasets.synthetic_isles24 --out /tmp/isles24 --n-cases 6 --shape 48 48 16
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
from .phantom import Tissue, brain_phantom, check_shape, lesion_mask, oblique_affine, render
from .synthetic import _check_count, _every, synthetic_rng

__all__ = ["PERFUSION_MAPS", "AIR_HU", "isles24_paths", "isles24_case", "make_isles24", "main"]

Shape3 = tuple[int, int, int]
PERFUSION_MAPS = ("cbf", "cbv", "mtt", "tmax")
AIR_HU = -1024.0  # CT background (air), Hounsfield units

# Tissue values: NCCT/CTA in HU; CBF ml/100 g/min, CBV ml/100 g, MTT and Tmax s. The acute
# infarct (STROKE) is about 6 HU darker than grey matter on NCCT and not enhanced on CTA.
_CT = {
    "ncct": {Tissue.SCALP: 40.0, Tissue.SKULL: 1000.0, Tissue.CSF: 6.0, Tissue.GM: 38.0, Tissue.WM: 28.0, Tissue.STROKE: 24.0},
    "cta": {Tissue.SCALP: 50.0, Tissue.SKULL: 1000.0, Tissue.CSF: 6.0, Tissue.GM: 50.0, Tissue.WM: 34.0, Tissue.STROKE: 25.0},
}
_PERFUSION = {
    "cbf": {Tissue.CSF: 3.0, Tissue.GM: 55.0, Tissue.WM: 25.0, Tissue.STROKE: 8.0},
    "cbv": {Tissue.CSF: 0.5, Tissue.GM: 4.0, Tissue.WM: 2.2, Tissue.STROKE: 1.0},
    "mtt": {Tissue.CSF: 2.0, Tissue.GM: 4.0, Tissue.WM: 4.8, Tissue.STROKE: 9.0},
    "tmax": {Tissue.CSF: 1.0, Tissue.GM: 1.0, Tissue.WM: 1.5, Tissue.STROKE: 12.0},
}
_PERFUSION_NOISE = {"cbf": 5.0, "cbv": 0.4, "mtt": 0.8, "tmax": 1.0}  # per map, its units
_RIM_FACTOR = {"cbf": 0.6, "cbv": 1.0, "mtt": 1.5, "tmax": 5.0}  # hypoperfused, not infarcted
_RIM_VOXELS = 2  # rim width in voxels around the infarct
_LESION_COUNTS = (1, 2, 3)  # real masks are often multi-focal
_LESION_SIZE = (0.15, 0.45)  # semi-axes as fractions of the parenchyma's half-extent: real infarcts are large
_CTP_FRAMES = 4  # time points of the 4-D CTP series (a stub: real series have 30-50)


def isles24_paths(root: str | os.PathLike, case_id: str) -> dict[str, Path]:
    """Name -> path of every file of case ``case_id`` (``sub-strokeNNNN``) under ``root``:
    ``ncct``, ``cta``, ``ctp`` (raw), ``cbf``/``cbv``/``mtt``/``tmax``, ``cta_ncct``/``ctp_ncct``
    (derivatives, ``space-ncct``) and ``msk`` (``ses-02`` label)."""
    root = Path(root)
    raw, acute = root / "rawdata" / case_id / "ses-01", root / "derivatives" / case_id / "ses-01"
    stem = f"{case_id}_ses-01"
    paths = {name: raw / f"{stem}_{name}.nii.gz" for name in ("ncct", "cta", "ctp")}
    paths.update({name: acute / "perfusion-maps" / f"{stem}_space-ncct_{name}.nii.gz" for name in PERFUSION_MAPS})
    paths.update({f"{name}_ncct": acute / f"{stem}_space-ncct_{name}.nii.gz" for name in ("cta", "ctp")})
    paths["msk"] = root / "derivatives" / case_id / "ses-02" / f"{case_id}_ses-02_lesion-msk.nii.gz"
    return paths


def _grid(rng: np.random.Generator, shape: Shape3 | None) -> tuple[Shape3, np.ndarray]:
    """Per-case NCCT grid: shape (voxels) and spacing (mm, X Y Z), about 0.4 x 0.4 x 2 mm.
    ``shape`` None: 512 x 512 x 70-100 voxels; else ``shape`` varied by up to 10 % in-plane."""
    in_plane = rng.uniform(0.39, 0.47)
    spacing = np.array([in_plane, in_plane, 2.0])
    if shape is None:
        return (512, 512, int(rng.integers(70, 101))), spacing
    jitter = rng.uniform(0.9, 1.1)
    return check_shape((round(shape[0] * jitter), round(shape[1] * jitter), shape[2])), spacing


def _ct(rng: np.random.Generator, labels: np.ndarray, name: str) -> np.ndarray:
    """NCCT or CTA of a label map: HU, int16, air :data:`AIR_HU` outside the head."""
    image = render(rng, labels, _CT[name], noise_sd=3.0, bias_sd=0.02)
    image[labels == Tissue.BACKGROUND] = AIR_HU
    return np.round(image).astype(np.int16)


def _perfusion(rng: np.random.Generator, labels: np.ndarray, rim: np.ndarray) -> dict[str, np.ndarray]:
    """CBF, CBV, MTT, Tmax of a label map: float32, positive inside the brain, 0 outside."""
    brain = labels >= Tissue.CSF
    maps = {}
    for name in PERFUSION_MAPS:
        image = render(rng, labels, _PERFUSION[name], noise_sd=_PERFUSION_NOISE[name], bias_sd=0.05)
        image[rim] *= np.float32(_RIM_FACTOR[name])
        floor = np.float32(0.01 * _PERFUSION[name][Tissue.GM])  # a perfused voxel is never exactly 0
        maps[name] = np.where(brain, np.maximum(image, floor), np.float32(0)).astype(np.float32)
    return maps


def _ctp_series(ncct: np.ndarray, cbv: np.ndarray, tmax: np.ndarray) -> np.ndarray:
    """A 4-D CTP stub (X, Y, Z, T) int16 HU: NCCT plus a contrast bolus scaled by CBV, peaking
    later where Tmax is long."""
    times = np.linspace(0.0, 24.0, _CTP_FRAMES, dtype=np.float32)  # s
    delay = (tmax + 6.0)[..., None]
    bolus = np.exp(-0.5 * ((times - delay) / 4.0) ** 2)
    return np.round(ncct[..., None] + 10.0 * cbv[..., None] * bolus).astype(np.int16)


def isles24_case(seed: int, index: int, shape: Sequence[int] | None, empty: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Arrays of case ``index`` (keys of :func:`isles24_paths`; ``msk`` uint8 {0,1}) and their
    common (4, 4) affine: LAS or LPS, tilted about the left-right axis like a CT gantry."""
    rng = synthetic_rng(seed, "isles24", index)
    grid, spacing = _grid(rng, None if shape is None else check_shape(shape))
    angles = (rng.uniform(-15.0, 15.0), 0.0, 0.0)
    signs = (-1, 1, 1) if rng.random() < 0.5 else (-1, -1, 1)
    affine = oblique_affine(grid, spacing, angles, rng.uniform([-5, -25, 5], [5, -10, 25]), axis_signs=signs)
    labels = brain_phantom(rng, grid, rng.uniform(0.36, 0.42, 3))
    parenchyma = (labels == Tissue.GM) | (labels == Tissue.WM)
    lesion = lesion_mask(rng, parenchyma, 0 if empty else int(rng.choice(_LESION_COUNTS)), _LESION_SIZE, min_radius=2.0)
    rim = ndimage.binary_dilation(lesion, iterations=_RIM_VOXELS) & parenchyma & ~lesion
    labels[lesion] = Tissue.STROKE
    arrays = {"ncct": _ct(rng, labels, "ncct"), "cta": _ct(rng, labels, "cta"), **_perfusion(rng, labels, rim)}
    arrays["ctp"] = _ctp_series(arrays["ncct"], arrays["cbv"], arrays["tmax"])
    arrays.update(cta_ncct=arrays["cta"], ctp_ncct=arrays["ctp"], msk=lesion.astype(np.uint8))
    return arrays, affine


def make_isles24(
    root: str | os.PathLike, n_cases: int, seed: int = 0, shape: Sequence[int] | None = None, empty_every: int = 0
) -> list[str]:
    """Write ``n_cases`` ISLES 2024-like cases under ``root``; return their ids (``sub-strokeNNNN``).

    ``shape`` (voxels, X Y Z) is the nominal NCCT grid (None: 512 x 512 x 70-100, heavy); every
    ``empty_every``-th case (0 = none) has an empty label. See the module docstring for files,
    units and the lesion signal.
    """
    _check_count(n_cases, "n_cases", 1)
    _check_count(empty_every, "empty_every", 0)
    case_ids = []
    for index in progress(range(n_cases), total=n_cases, desc="isles24"):
        case_id = f"sub-stroke{index + 1:04d}"
        arrays, affine = isles24_case(seed, index, shape, _every(index, empty_every))
        for name, path in isles24_paths(root, case_id).items():
            save_nifti(path, arrays[name], affine)  # the 4-D CTP series too: one spatial affine
        case_ids.append(case_id)
    return case_ids


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m strokeseg.datasets.synthetic_isles24",
        description="Write a synthetic ISLES 2024 dataset (NCCT, CTA, CTP, perfusion maps, ses-02 label) in the release layout.",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="dataset root directory (created)")
    parser.add_argument("--n-cases", required=True, type=int, metavar="N", help="number of cases, >= 1")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed >= 0 (default 0); case i depends on S and i only")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), default=None,
                        help="nominal NCCT grid in voxels (default: 512 512 70-100 at about 0.4 x 0.4 x 2 mm)")
    parser.add_argument("--empty-every", type=int, default=0, metavar="K", help="every K-th case gets an empty label, 0 = none (default 0)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    case_ids = make_isles24(args.out, args.n_cases, args.seed, args.shape, args.empty_every)
    write_run_args(args.out, args)
    print(f"isles24: wrote {len(case_ids)} case(s), {len(case_ids) * 10} NIfTI file(s) under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
