"""Quality flags of a predicted case, the rows of failed cases, and the folder's summary over calls.

Flags (``qc_flags`` in ``lesion_volumes.csv``, ``"; "``-separated, each ``name (detail)``):

- ``lesion_volume_outside_training``: the predicted volume (ml) is outside [min, max] of the
  training cases' native lesion volumes (the contract's dataset fingerprint);
- ``mask_outside_brain``: more than 5 % of the mask's voxels lie outside the brain (the source
  image above the contract's ``brain_threshold``, 0 for ISLES, holes filled:
  :func:`strokeseg.datasets.foundation.brain_mask_from_image`);
- ``spacing_far_from_training`` / ``field_of_view_far_from_training``: an axis's voxel spacing
  or extent (shape x spacing, mm; array axis order) is below the training minimum / 1.5 or above
  the training maximum x 1.5;
- ``pixdim_disagrees_with_affine``: the header's pixdim and the voxel sizes of the affine (its
  column norms) differ by more than 1e-3 mm.

The fingerprint flags need a contract that carries a fingerprint; checkpoints trained on data
preprocessed before fingerprints existed have none (:func:`fingerprint_note`).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..datasets.contract import DataContract
from ..core.case import Image
from ..core.io import CaseError, read_json
from ..core.runner import CaseResult, RunReport
from ..datasets.foundation import brain_mask_from_image

__all__ = ["FAR_FACTOR", "OUTSIDE_BRAIN_FRACTION", "case_flags", "fingerprint_note", "annotate_rows", "failed_rows", "merge_volume_rows", "accumulate_report"]

FAR_FACTOR = 1.5  # spacing / field of view beyond [training min / 1.5, training max x 1.5] is far
OUTSIDE_BRAIN_FRACTION = 0.05  # share of mask voxels outside the brain that is flagged
_PIXDIM_TOLERANCE_MM = 1e-3


def _far(name: str, values: np.ndarray, ranges: Mapping[str, Sequence[float]] | None, unit: str) -> list[str]:
    if not ranges:
        return []
    low, high = np.asarray(ranges["min"], dtype=np.float64) / FAR_FACTOR, np.asarray(ranges["max"], dtype=np.float64) * FAR_FACTOR
    if values.shape != low.shape or not ((values < low) | (values > high)).any():
        return []
    shown = lambda v: " x ".join(f"{x:.3g}" for x in v)  # noqa: E731
    return [f"{name} ({shown(values)} {unit}, training {shown(ranges['min'])} to {shown(ranges['max'])})"]


def _volume_flag(volume_ml: float, quantiles: Mapping[str, float] | None) -> list[str]:
    if not quantiles or quantiles["min"] <= volume_ml <= quantiles["max"]:
        return []
    return [f"lesion_volume_outside_training ({volume_ml:.4g} ml, training {quantiles['min']:.4g} to {quantiles['max']:.4g} ml)"]


def case_flags(mask: np.ndarray, source: Image, pixdim: Sequence[float], contract: DataContract) -> list[str]:
    """The quality flags (module docstring) of a prediction: ``mask`` bool (X, Y, Z) on the grid
    of ``source`` (the image whose grid the outputs take), ``pixdim`` the header's voxel sizes
    (mm, first three). Fingerprint flags only when ``contract.fingerprint`` is not None."""
    flags = []
    fingerprint = contract.fingerprint or {}
    voxels = int(np.count_nonzero(mask))
    flags += _volume_flag(voxels * source.voxel_volume_ml, fingerprint.get("lesion_ml"))
    if voxels:
        brain = brain_mask_from_image(source.data, float(contract.preprocessing.get("brain_threshold") or 0.0)).astype(bool)
        outside = np.count_nonzero(mask & ~brain) / voxels
        if outside > OUTSIDE_BRAIN_FRACTION:
            flags.append(f"mask_outside_brain ({100 * outside:.0f} % of mask voxels)")
    spacing = np.asarray(source.zooms, dtype=np.float64)
    flags += _far("spacing_far_from_training", spacing, fingerprint.get("spacing_mm"), "mm")
    flags += _far("field_of_view_far_from_training", spacing * np.asarray(source.data.shape), fingerprint.get("field_of_view_mm"), "mm")
    from_affine = np.linalg.norm(np.asarray(source.affine)[:3, :3], axis=0)
    if not np.allclose(from_affine, np.asarray(pixdim[:3], dtype=np.float64), rtol=0, atol=_PIXDIM_TOLERANCE_MM):
        shown = lambda v: " x ".join(f"{x:.4g}" for x in v)  # noqa: E731
        flags.append(f"pixdim_disagrees_with_affine (pixdim {shown(pixdim[:3])} mm, affine {shown(from_affine)} mm)")
    return flags


def fingerprint_note(contract: DataContract, where: str) -> str | None:
    """A one-line note when the model's contract has no dataset fingerprint (else None)."""
    if contract.fingerprint is not None:
        return None
    return (f"NOTE {where}: the data contract has no dataset fingerprint (training data preprocessed by an older version), "
            "so the lesion-volume, spacing and field-of-view quality flags are not computed")


def annotate_rows(info: dict, review: Mapping[str, Any]) -> None:
    """Put a case's review (``"QcFlags"``: list of flags; ``"LesionUncertainty"``: per lesion
    {mean_probability, fold_detection}, in lesion-id order; as stored in the mask's sidecar)
    into its table rows ``info`` ("volume", "lesions"), in place; missing parts leave the
    columns empty (masks made by an older version)."""
    info["volume"].update(status="done", reason="", qc_flags="; ".join(review.get("QcFlags") or []))
    per_lesion = review.get("LesionUncertainty")
    if isinstance(per_lesion, list) and len(per_lesion) == len(info["lesions"]):
        for row, values in zip(info["lesions"], per_lesion):
            row.update(values)


def failed_rows(report: RunReport) -> list[dict]:
    """A ``lesion_volumes.csv`` row per failed case: case_id, status "failed", reason."""
    return [{"case_id": r.case_id, "status": "failed", "reason": r.reason} for r in report.by_status("failed")]


def merge_volume_rows(earlier: Sequence[Mapping], done: Sequence[Mapping], failed: Sequence[Mapping]) -> list[dict]:
    """The rows of ``lesion_volumes.csv``, sorted by case id: ``done`` (cases with a mask now),
    ``failed`` (failed now) unless the case has an earlier row with a mask (its mask on disk is
    unchanged and still valid), and the ``earlier`` rows of every other case."""
    now = {row["case_id"] for row in done}
    with_mask = {row["case_id"] for row in earlier if row.get("status", "done") != "failed"}
    failures = [row for row in failed if row["case_id"] not in with_mask]
    replaced = now | {row["case_id"] for row in failures}
    rows = [dict(row) for row in earlier if row["case_id"] not in replaced] + [dict(row) for row in (*done, *failures)]
    return sorted(rows, key=lambda row: row["case_id"])


def accumulate_report(summary_path: Path, report: RunReport, keep_earlier: bool) -> RunReport:
    """This call's results plus, with ``keep_earlier`` (the folder's earlier outputs come from
    the same models and settings), the cases recorded only in the earlier summary at
    ``summary_path`` (their last status and reason), so failures of earlier calls stay listed."""
    if not keep_earlier or not summary_path.is_file():
        return report
    try:
        recorded = read_json(summary_path).get("cases", [])
    except (CaseError, AttributeError):
        return report  # unreadable: replaced by this call's summary
    now = {r.case_id for r in report.results}
    fields = set(asdict(CaseResult("", "")))
    earlier = [CaseResult(**{k: v for k, v in case.items() if k in fields}) for case in recorded if isinstance(case, dict) and case.get("case_id") not in now]
    return RunReport(earlier + list(report.results))
