"""Dataset fingerprint: what the native training images looked like (as nnU-Net's
``dataset_fingerprint.json``), so prediction can flag a case far from them.

Each preprocessing stage computes :func:`case_fingerprint` per case from the native inputs and
writes ``dataset_fingerprint.json`` into its output folder (:func:`write_dataset_fingerprint`);
the trainer copies its ``"summary"`` into the checkpoint's data contract
(:func:`strokeseg.datasets.contract.build_data_contract`, key ``"fingerprint"``)::

    {"n_cases": 250,
     "spacing_mm":       {"min": [x, y, z], "median": [...], "max": [...]},   # array axis order
     "shape":            {"min": [...], "median": [...], "max": [...]},       # voxels
     "field_of_view_mm": {"min": [...], "median": [...], "max": [...]},       # shape x spacing
     "intensity": {"dwi": {"p0_5": ..., "p50": ..., "p99_5": ...}, ...},     # median over cases of
                                                                              # each case's brain percentiles
     "lesion_ml": {"min": ..., "p05": ..., "p25": ..., "p50": ..., "p75": ..., "p95": ..., "max": ...}}

The file also keeps the per-case entries (``"cases"``), so a rerun that skips finished cases
still summarises every case with output.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from ..core.io import CaseError, read_json, write_json

__all__ = ["FINGERPRINT_NAME", "case_fingerprint", "summarise_fingerprints", "write_dataset_fingerprint", "read_dataset_fingerprint"]

FINGERPRINT_NAME = "dataset_fingerprint.json"
_INTENSITY_PERCENTILES = {"p0_5": 0.5, "p50": 50.0, "p99_5": 99.5}
_VOLUME_QUANTILES = {"min": 0.0, "p05": 5.0, "p25": 25.0, "p50": 50.0, "p75": 75.0, "p95": 95.0, "max": 100.0}


def case_fingerprint(images: Mapping[str, np.ndarray], brain: np.ndarray, zooms: Iterable[float], lesion_ml: float | None) -> dict[str, Any]:
    """One case's entry: spacing (mm, array axis order), shape (voxels), the brain's intensity
    percentiles per image (0.5, 50, 99.5 over the voxels where ``brain``, bool (X, Y, Z), holds;
    None when it is empty) and the native lesion volume in ml (None without a mask).
    images: name -> (X, Y, Z) float array on ``brain``'s grid."""
    intensity = {}
    for name, data in images.items():
        values = np.asarray(data)[brain]
        intensity[name] = None if values.size == 0 else dict(zip(_INTENSITY_PERCENTILES, np.percentile(values, list(_INTENSITY_PERCENTILES.values())).tolist()))
    return {"spacing_mm": [float(z) for z in zooms], "shape": [int(s) for s in brain.shape], "intensity": intensity,
            "lesion_ml": None if lesion_ml is None else float(lesion_ml)}


def _range(rows: np.ndarray) -> dict[str, list[float]]:
    return {"min": rows.min(axis=0).tolist(), "median": np.median(rows, axis=0).tolist(), "max": rows.max(axis=0).tolist()}


def summarise_fingerprints(cases: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The dataset summary (module docstring) of per-case entries from :func:`case_fingerprint`;
    lesion_ml None when no case has a mask. Raises ValueError for no cases."""
    if not cases:
        raise ValueError("no cases to summarise")
    entries = list(cases.values())
    spacing = np.array([e["spacing_mm"] for e in entries], dtype=np.float64)
    shape = np.array([e["shape"] for e in entries], dtype=np.float64)
    intensity = {}
    for name in entries[0]["intensity"]:
        found = [e["intensity"].get(name) for e in entries if e["intensity"].get(name)]
        intensity[name] = {key: float(np.median([f[key] for f in found])) for key in _INTENSITY_PERCENTILES} if found else None
    volumes = [e["lesion_ml"] for e in entries if e["lesion_ml"] is not None]
    lesion = dict(zip(_VOLUME_QUANTILES, np.percentile(volumes, list(_VOLUME_QUANTILES.values())).tolist())) if volumes else None
    return {"n_cases": len(entries), "spacing_mm": _range(spacing), "shape": _range(shape), "field_of_view_mm": _range(shape * spacing),
            "intensity": intensity, "lesion_ml": lesion}


def write_dataset_fingerprint(output_dir: Path, new: Mapping[str, Mapping[str, Any]], with_output: Iterable[str]) -> None:
    """Write ``output_dir/dataset_fingerprint.json`` ({"summary", "cases"}) over the cases
    ``with_output``: the entries in ``new`` (case id -> :func:`case_fingerprint`, the cases
    preprocessed now), else the file's earlier entry (cases skipped as finished). Nothing is
    written when no case with output has an entry."""
    path = Path(output_dir) / FINGERPRINT_NAME
    earlier: dict[str, Any] = {}
    if path.is_file():
        try:
            recorded = read_json(path)
            earlier = recorded.get("cases", {}) if isinstance(recorded, dict) else {}
        except CaseError:
            earlier = {}  # unreadable: rebuilt from the cases preprocessed now
    cases = {case_id: new.get(case_id, earlier.get(case_id)) for case_id in sorted(with_output)}
    cases = {case_id: entry for case_id, entry in cases.items() if entry is not None}
    if cases:
        write_json(path, {"summary": summarise_fingerprints(cases), "cases": cases})


def read_dataset_fingerprint(case_dir: str | Path) -> dict[str, Any] | None:
    """The ``"summary"`` of ``case_dir/dataset_fingerprint.json``; None when the folder has none
    (preprocessed by an older version). Raises :class:`CaseError` naming an unreadable file."""
    path = Path(case_dir) / FINGERPRINT_NAME
    if not path.is_file():
        return None
    recorded = read_json(path)
    if not isinstance(recorded, dict) or not isinstance(recorded.get("summary"), dict):
        raise CaseError(f"{path}: no 'summary' object; rerun the preprocessing stage with --overwrite")
    return recorded["summary"]
