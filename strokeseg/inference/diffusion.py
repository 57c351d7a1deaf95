"""Diffusion images as scanners export them, made into what an ISLES-trained network read.

- A 4-D DWI (b=0 and b=1000 volumes, several directions) with an FSL ``.bval`` file or a BIDS
  JSON (``bval`` / ``DiffusionBValue``) beside it gives the trace image at the b-value of the
  training data (the data contract's ``acquisition.dwi_b_value``): the geometric mean of the
  directions of that shell. ``--dwi-volume K`` picks one volume instead.
- Without an ADC map, ADC = ln(S0 / Sb) / b is computed from the b=0 and the chosen shell, in
  the contract's ADC unit (``acquisition.adc_unit``, mm²/s per stored unit).
- An ADC map's unit (mm²/s, 10⁻³ or 10⁻⁶ mm²/s) is told from its brain median and converted to
  the training unit; DWI and ADC passed the other way round, or a DWI that is an ADC map, are
  refused naming the files.

Every choice is returned as a record for the mask's sidecar and logged on one line.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import nibabel as nib
import numpy as np

from ..core.case import LABEL, Case, Image
from ..core.io import CaseError, check_image_content, check_same_grid, load_image, load_nifti, one_line, read_json
from ..core.geometry import as_binary_mask
from ..core.runner import get_logger
from ..datasets.isles import isles_case, read_isles_case

__all__ = [
    "diffusion_case",
    "B0_MAX",
    "read_b_values",
    "select_dwi",
    "compute_adc",
    "adc_unit",
    "brain_region",
    "adc_likeness",
    "check_dwi_adc",
    "read_diffusion_case",
    "log_record",
]

B0_MAX = 50.0  # s/mm²: volumes at or below this b-value are b=0 images
# A shell matches the training b-value within this fraction: scanners round (995, 1005), and
# ISLES 2022 itself mixes b=800 and b=1000 centres (the sample case's JSON says 800).
B_TOLERANCE = 0.25
# Plausible brain-median ADC in mm²/s (tissue about 0.7-0.9e-3, CSF up to 3e-3): each unit's
# window is narrower than the factor 1000 between units, so at most one unit fits.
ADC_MEDIAN_MM2_S = (2e-4, 5e-3)
ADC_UNITS = {1.0: "mm²/s", 1e-3: "10⁻³ mm²/s", 1e-6: "10⁻⁶ mm²/s"}
# 95th percentile / median over the brain: an ADC map's CSF is about 3-4 times tissue (real and
# synthetic ISLES cases 3.0-3.9), a b=1000 DWI's brightest tissue about 1.3-1.5 times, up to about
# 2.8 with a large bright lesion: a DWI alone is refused as an ADC map only from 3.0 on.
ADC_LIKE_RATIO = 3.0
DWI_LIKE_RATIO = 1.8


def diffusion_case(
    case_id: str, dwi: Path | None, adc: Path | None, mask: Path | None, problem: str = "",
    root: Path | None = None, stem: str = "", dwi_volume: int | None = None,
) -> Case:
    """One case of a DWI model to predict (:func:`strokeseg.datasets.isles.isles_case`): file
    paths in ``sources`` (None when absent; ``adc`` None also when the model reads the DWI alone
    or the ADC is computed), a discovery ``problem`` (one line), ``root``/``stem`` of the ISLES
    layouts (for their messages) and ``dwi_volume`` in ``meta``: the volume of a 4-D DWI to use
    (None: by b-value)."""
    case = isles_case(case_id, dwi, adc, mask, problem, root, stem)
    return case if dwi_volume is None else case.replace(meta={"dwi_volume": dwi_volume})


def _sidecar(path: Path, ext: str) -> Path:
    name = re.sub(r"\.nii(\.gz)?$", "", path.name, flags=re.IGNORECASE)
    return path.with_name(name + ext)


def read_b_values(dwi: Path) -> np.ndarray | None:
    """b-values (s/mm², float64 (N,)) of the DWI file ``dwi``: its FSL ``.bval`` (same name),
    else its BIDS JSON's ``bval`` list or ``DiffusionBValue`` (number or list); None when there
    are none. Raises :class:`CaseError` naming an unreadable file."""
    bval = _sidecar(dwi, ".bval")
    if bval.is_file():
        try:
            return np.array(bval.read_text().split(), dtype=np.float64)
        except (OSError, ValueError) as err:
            raise CaseError(f"{bval}: unreadable b-values ({one_line(err)})") from err
    meta = _sidecar(dwi, ".json")
    if not meta.is_file():
        return None
    recorded = read_json(meta)
    value = recorded.get("bval", recorded.get("DiffusionBValue")) if isinstance(recorded, dict) else None
    if value is None:
        return None
    try:
        return np.atleast_1d(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError) as err:
        raise CaseError(f"{meta}: bval/DiffusionBValue is not a number or list of numbers ({value!r})") from err


def select_dwi(series: np.ndarray, b_values: np.ndarray | None, b_target: float, volume: int | None, path: Path) -> tuple[np.ndarray, np.ndarray | None, float | None, dict]:
    """The DWI a network trained at ``b_target`` (s/mm²) reads, from a 4-D ``series`` (X, Y, Z, N).

    ``volume`` given: that volume (0-based). Else the shell of volumes whose b-value is within
    ``B_TOLERANCE`` of ``b_target`` (the one nearest it), averaged as the trace image does: the
    geometric mean of its directions (the arithmetic mean where a direction is <= 0: background,
    noise). Returns (DWI float32 (X, Y, Z),
    mean of the b=0 volumes or None, the DWI's b-value or None, record). Raises
    :class:`CaseError` naming ``path`` without b-values (and no ``volume``), with as many b-values
    as volumes, or no shell near ``b_target``; the message names ``--dwi-volume``.
    """
    n = series.shape[3]
    if b_values is not None and b_values.size != n:
        raise CaseError(f"{path}: {n} volumes but {b_values.size} b-values beside it")
    b0 = None
    if b_values is not None and (b_values <= B0_MAX).any():
        b0 = series[..., b_values <= B0_MAX].mean(axis=3, dtype=np.float64).astype(np.float32)
    if volume is not None:
        if not 0 <= volume < n:
            raise CaseError(f"{path}: --dwi-volume {volume} but the DWI has {n} volumes (0 to {n - 1})")
        b = None if b_values is None else float(b_values[volume])
        return series[..., volume].astype(np.float32), b0, b, {"DwiVolumes": [volume], "DwiBValue": b}
    if b_values is None:
        raise CaseError(f"{path}: 4-D DWI ({n} volumes) without b-values (no {_sidecar(path, '.bval').name} or JSON bval/DiffusionBValue beside it): "
                        f"pick the b={b_target:g} volume with --dwi-volume K (0 to {n - 1})")
    shells = sorted({float(b) for b in b_values if b > B0_MAX and abs(b - b_target) <= B_TOLERANCE * b_target}, key=lambda b: abs(b - b_target))
    if not shells:
        raise CaseError(f"{path}: no volume near b={b_target:g} (the model's training b-value) among b-values {sorted(set(b_values.tolist()))}: "
                        f"pick one with --dwi-volume K (0 to {n - 1})")
    chosen = np.flatnonzero(np.abs(b_values - shells[0]) <= 0.05 * shells[0])  # one shell: rounding differences only
    directions = series[..., chosen].astype(np.float64)
    positive = (directions > 0).all(axis=3)
    trace = np.where(positive, np.exp(np.log(np.where(positive[..., None], directions, 1.0)).mean(axis=3)), directions.mean(axis=3))
    b = float(b_values[chosen].mean())
    return trace.astype(np.float32), b0, b, {"DwiVolumes": chosen.tolist(), "DwiBValue": b, "DwiTrace": f"geometric mean of {chosen.size} volume(s)"}


def compute_adc(b0: np.ndarray, dwi: np.ndarray, b_value: float, unit: float) -> np.ndarray:
    """ADC = ln(S0 / Sb) / b in units of ``unit`` mm²/s (``b_value`` in s/mm²), float32 (X, Y, Z).

    0 where either signal is <= 0 (background); negative values (noise, Sb > S0) become 0."""
    valid = (b0 > 0) & (dwi > 0)
    ratio = np.where(valid, b0, 1.0).astype(np.float64) / np.where(valid, dwi, 1.0)
    adc = np.where(valid, np.log(ratio) / b_value / unit, 0.0)
    return np.maximum(adc, 0.0).astype(np.float32)


def brain_region(dwi: np.ndarray) -> np.ndarray:
    """Voxels of a DWI (X, Y, Z) above 5 % of its 99th percentile of positive values: the brain
    of a skull-stripped image, brain and scalp without background noise otherwise (bool)."""
    positive = dwi[dwi > 0]
    if positive.size == 0:
        return np.zeros(dwi.shape, dtype=bool)
    return dwi > 0.05 * float(np.percentile(positive, 99))


def adc_likeness(values: np.ndarray) -> float:
    """95th percentile / median of brain ``values`` (1-D): about 3-4 for an ADC map (bright CSF),
    about 1.3-1.5 for a DWI; independent of the unit."""
    median = float(np.median(values))
    return float(np.percentile(values, 95)) / median if median > 0 else float("inf")


def adc_unit(median: float, path: Path) -> float:
    """The unit (mm²/s per stored value: 1, 1e-3 or 1e-6) whose brain median ADC ``median``
    is plausible (:data:`ADC_MEDIAN_MM2_S`). Raises :class:`CaseError` naming ``path`` when none is."""
    for unit in ADC_UNITS:
        if ADC_MEDIAN_MM2_S[0] <= median * unit <= ADC_MEDIAN_MM2_S[1]:
            return unit
    raise CaseError(f"{path}: ADC brain median {median:.4g} fits no unit (about 0.0008 in mm²/s, 0.8 in 10⁻³ mm²/s, 800 in 10⁻⁶ mm²/s): not an ADC map?")


def check_dwi_adc(dwi: Image, adc: Image | None, unit: float) -> tuple[Image | None, dict]:
    """Refuse a DWI that looks like an ADC map, and DWI/ADC passed the other way round
    (:func:`adc_likeness` over :func:`brain_region` of the DWI); convert the ADC map to the training
    ``unit`` (mm²/s per value). Returns the ADC (converted; None stays None) and the record
    (``AdcUnit`` found, ``AdcConvertedTo``). Raises :class:`CaseError` naming both files."""
    brain = brain_region(dwi.data)
    dwi_ratio = adc_likeness(dwi.data[brain])
    if adc is None:
        if dwi_ratio >= ADC_LIKE_RATIO:
            raise CaseError(f"{dwi.path}: looks like an ADC map, not a DWI (brain 95th percentile {dwi_ratio:.1f}x its median; a DWI's is about 1.5x)")
        return None, {}
    adc_ratio = adc_likeness(adc.data[brain])
    # Relative order, not the DWI's own value: a DWI with a large bright lesion reaches about 2.8.
    if adc_ratio < dwi_ratio or adc_ratio < DWI_LIKE_RATIO:
        raise CaseError(f"{dwi.path} (given as DWI) and {adc.path} (given as ADC) look swapped or mislabelled: brain 95th percentile / median "
                        f"{dwi_ratio:.1f} and {adc_ratio:.1f} (a DWI about 1.5, an ADC map about 3-4); pass the DWI as --dwi and the ADC map as --adc")
    found = adc_unit(float(np.median(adc.data[brain])), adc.path)
    record = {"AdcUnit": ADC_UNITS[found]}
    if found != unit:
        adc = Image((adc.data * np.float32(found / unit)).astype(np.float32), adc.affine, adc.zooms, adc.path)
        record["AdcConvertedTo"] = ADC_UNITS.get(unit, f"{unit:g} mm²/s")
    return adc, record


def _load_series(path: Path) -> tuple[np.ndarray, Image]:
    """A 3-D or 4-D DWI as float32 (X, Y, Z[, N]) and a Image of its grid (first volume)."""
    if not _is_series(path):  # 3-D (or one volume): read and checked as every stage reads it
        volume = load_nifti(path)
        return volume.data, volume
    try:
        img = nib.load(str(path))
        series = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:  # nibabel raises many types for corrupt files
        raise CaseError(f"{path}: unreadable NIfTI ({one_line(err)})") from err
    if series.ndim != 4:
        raise CaseError(f"{path}: expected a 3-D or 4-D DWI, got shape {series.shape}")
    if not np.isfinite(series).all():
        raise CaseError(f"{path}: {int(series.size - np.isfinite(series).sum())} NaN/Inf voxel(s)")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return series, Image(series[..., 0], np.asarray(img.affine, dtype=np.float64), zooms, path)


def _is_series(path: Path | None) -> bool:
    """Whether ``path`` is a 4-D NIfTI with several volumes (header only; unreadable: False, the reader reports it)."""
    try:
        shape = nib.load(str(path)).shape if path is not None else ()
    except Exception:  # nibabel raises many types for corrupt files
        return False
    return len(shape) == 4 and shape[3] > 1


def _read_dwi(item: Case, acquisition: Mapping[str, float]) -> tuple[Image, np.ndarray | None, float | None, dict]:
    """The DWI to use (3-D, checked), the b=0 mean or None, the DWI's b-value or None, record."""
    path = item.source("dwi")
    series, grid = _load_series(path)  # type: ignore[arg-type]
    if series.ndim == 3:
        return check_image_content(grid), None, None, {}
    b_values = read_b_values(path)  # type: ignore[arg-type]
    dwi, b0, b, record = select_dwi(series, b_values, float(acquisition["dwi_b_value"]), item.meta.get("dwi_volume"), path)  # type: ignore[arg-type]
    return check_image_content(Image(dwi, grid.affine, grid.zooms, grid.path)), b0, b, record


def read_diffusion_case(item: Case, needs_adc: bool, acquisition: Mapping[str, float]) -> tuple[Case, dict]:
    """Read a case for a model reading DWI (and ADC when ``needs_adc``), checked as the ISLES
    preprocessing stage checks it (:func:`strokeseg.datasets.isles.read_isles_case`, whose
    messages a 3-D DWI with an ADC file gets), plus :func:`check_dwi_adc`. A 4-D DWI gives the
    volume of :func:`select_dwi`; a missing ADC is computed from its b=0 (:func:`compute_adc`).
    ``acquisition``: the contract's ``dwi_b_value`` (s/mm²) and ``adc_unit`` (mm²/s). Returns the
    read case (images ``dwi`` and, when ``needs_adc``, ``adc``; the label or None) and the record
    for the sidecar; raises :class:`CaseError` (one line naming the file)."""
    if item.problem:
        raise CaseError(item.problem)
    unit = float(acquisition["adc_unit"])
    dwi_path, adc_path, mask_path = item.source("dwi"), item.source("adc"), item.source(LABEL)
    series = _is_series(dwi_path)
    if dwi_path is None or (needs_adc and not series and (adc_path is not None or item.meta.get("root") is not None)):
        pair = item.replace(sources={**item.sources, "adc": adc_path if needs_adc else dwi_path})
        volumes = read_isles_case(pair, require_mask=False)
        adc, record = check_dwi_adc(volumes.image("dwi"), volumes.image("adc") if needs_adc else None, unit)
        return _diffusion_volumes(item, volumes.image("dwi"), adc, volumes.label), record
    dwi, b0, b, record = _read_dwi(item, acquisition)
    adc = None
    if needs_adc and adc_path is not None:
        adc = load_image(adc_path)
    elif needs_adc:
        if b0 is None or b is None:
            raise CaseError(f"{dwi_path}: no ADC map for {item.case_id} and no b=0 volume with b-values in the DWI to compute one: give --adc FILE (or an *_adc file)")
        adc = Image(compute_adc(b0, dwi.data, b, unit), dwi.affine, dwi.zooms, dwi.path)
        record["AdcSource"] = f"computed ln(S0/Sb)/b from {dwi_path} (b=0 and b={b:g}) in {ADC_UNITS.get(unit, f'{unit:g} mm²/s')}"
    mask = load_nifti(mask_path, dtype=None) if mask_path is not None else None
    check_same_grid(dwi, "DWI", [v for v in (adc, mask) if v is not None])
    adc, checked = check_dwi_adc(dwi, adc, unit) if "AdcSource" not in record else (adc, {})
    label = None if mask is None else Image(as_binary_mask(mask.data, mask.path), mask.affine, mask.zooms, mask.path)
    return _diffusion_volumes(item, dwi, adc, label), {**record, **checked}


def _diffusion_volumes(item: Case, dwi: Image, adc: Image | None, label: Image | None) -> Case:
    """``item`` read: images ``dwi`` (and ``adc`` when not None) and the label."""
    return item.replace(images={"dwi": dwi, **({} if adc is None else {"adc": adc})}, label=label)


def log_record(case_id: str, record: Mapping[str, Any]) -> None:
    """One NOTE line per choice that changed an input: volume picked, ADC computed or converted."""
    log = get_logger()
    if "DwiVolumes" in record:
        log.info(f"NOTE {case_id}: DWI volume(s) {record['DwiVolumes']} used (b={record.get('DwiBValue')}; {record.get('DwiTrace', '--dwi-volume')})")
    if "AdcSource" in record:
        log.info(f"NOTE {case_id}: ADC {record['AdcSource']}")
    if "AdcConvertedTo" in record:
        log.info(f"NOTE {case_id}: ADC in {record['AdcUnit']} (from its brain median), converted to the training unit {record['AdcConvertedTo']}")

