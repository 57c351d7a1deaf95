"""The tables ``predict.py`` writes beside the masks: lesion_volumes.csv (one row per case),
lesions.csv (one row per lesion) and scores.csv (one row per case with a reference mask, with
the case's role for the models: a model's own training or validation case is marked and left out
of the mean)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..core.runner import RunReport
from ..core.metrics import METRICS
from ..core.io import write_csv
from . import qc
from .prediction import ModelSet

__all__ = ["VOLUME_COLUMNS", "LESION_COLUMNS", "score_columns", "ROLES", "case_role", "write_tables"]

VOLUME_COLUMNS = ("case_id", "status", "reason", "lesion_volume_ml", "lesion_count", "largest_lesion_ml", "qc_flags", "model", "folds", "unfinished")
LESION_COLUMNS = ("case_id", "lesion_id", "voxels", "volume_ml", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm", "mean_probability", "fold_detection")
ROLES = ("train", "val", "unseen", "unknown")  # a scored case's role for the models (:func:`case_role`)


def score_columns() -> tuple[str, ...]:
    """Columns of scores.csv: case id, role, every metric of :data:`strokeseg.core.metrics.METRICS`
    in registry order, the voxel counts and the preset."""
    return ("case_id", "role", *METRICS, "ref_voxels", "pred_voxels", "preset", "connectivity")


def case_role(case_id: str, model_set: ModelSet) -> str:
    """What ``case_id`` was to the models (their data contracts' case lists): "train" when any
    model trained on it, else "val" when any selected its checkpoint on it, else "unseen" (a
    fair test case), or "unknown" when a model records no case lists."""
    contracts = [fm.contract for fm in model_set.fold_models]
    if any(case_id in (c.train_cases or ()) for c in contracts):
        return "train"
    if any(case_id in (c.val_cases or ()) for c in contracts):
        return "val"
    return "unknown" if any(c.train_cases is None or c.val_cases is None for c in contracts) else "unseen"


def write_tables(output_dir: Path, report: RunReport, model_set: ModelSet, keep_earlier: bool = False) -> dict:
    """Write lesion_volumes.csv, lesions.csv and (when a case was scored) scores.csv from the
    rows of the done and skipped cases, sorted by case id (lesion_volumes.csv also gets a row per
    failed case: status "failed" and its reason, :func:`strokeseg.inference.qc.merge_volume_rows`); each score row has its
    :func:`case_role`. With ``keep_earlier`` (the folder's earlier outputs come from the same
    models and settings) the rows of cases predicted by earlier calls, one patient at a time,
    are kept. Returns "n_scored" (rows of scores.csv), "roles" (role -> count) and "mean_dice"
    over the "unseen" rows only (None when there are none): a model's own training or validation
    case says nothing about new patients."""
    results = [r for r in report.results if r.status in ("done", "skipped") and r.info]
    current = {r.case_id for r in results}  # a failed case keeps its earlier rows: its mask on disk is unchanged

    def rows(name: str, new: list[dict]) -> list[dict]:
        earlier = _csv_rows(output_dir / name) if keep_earlier else []
        return sorted([row for row in earlier if row.get("case_id") not in current] + new, key=lambda row: row["case_id"])

    earlier_volumes = _csv_rows(output_dir / "lesion_volumes.csv") if keep_earlier else []
    volumes = qc.merge_volume_rows(earlier_volumes, [r.info["volume"] for r in results], qc.failed_rows(report))
    write_csv(output_dir / "lesion_volumes.csv", volumes, VOLUME_COLUMNS)
    write_csv(output_dir / "lesions.csv", rows("lesions.csv", [row for r in results for row in r.info["lesions"]]), LESION_COLUMNS)
    scores = [{**row, "role": case_role(row["case_id"], model_set)} for row in rows("scores.csv", [r.info["scores"] for r in results if r.info["scores"] is not None])]
    if scores:
        write_csv(output_dir / "scores.csv", scores, score_columns())
    unseen = [float(s["dice"]) for s in scores if s["role"] == "unseen"]
    roles = {role: n for role in ROLES if (n := sum(s["role"] == role for s in scores))}
    return {"n_scored": len(scores), "roles": roles, "mean_dice": float(np.mean(unseen)) if unseen else None}


def _csv_rows(path: Path) -> list[dict]:
    """The rows of the CSV table ``path`` (none when it does not exist)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
