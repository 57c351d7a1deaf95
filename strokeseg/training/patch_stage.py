"""The patch extraction stage (``extract_patches_96x96x96.py``), declared as a
:class:`strokeseg.core.stage.Stage`, and the one home of its folder names and patch default.

For each ``<input_dir>/<dataset>/<case>.npz`` of the foundation stage it writes
``<output_dir>/<dataset>_patches_<P>/<case>.npz`` (:func:`strokeseg.training.patches.extract_case_patches`),
``patient_ids.json`` and ``<dataset>_<P>_summary.json``; training (``train_stroke.py``) and the
ablation plan find the folder by :func:`patch_dir_name`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import models

from ..core.io import CaseError, write_json
from ..core.runner import RunReport
from ..core.stage import Stage
from ..datasets.splits import load_split
from .patches import CENTERS_ONLY_KEYS, PATCH_KEYS, PatchItem, extract_case_patches

__all__ = ["DEFAULT_PATCH_SIZE", "patch_dir_name", "patch_summary_name", "PatchSettings", "CaseSelection", "select_patch_cases", "patch_stage"]

# The extraction default: the patch of the paper's ResNet-18 (its architecture's default_patch, 96).
DEFAULT_PATCH_SIZE: int = models.arch_spec("resnet18").default_patch


def patch_dir_name(dataset: str, patch_size: int) -> str:
    """The patch folder of ``dataset`` at cubic patch edge ``patch_size`` (voxels): ``<dataset>_patches_<P>``,
    beside the dataset's volume folder."""
    return f"{dataset}_patches_{patch_size}"


def patch_summary_name(dataset: str, patch_size: int) -> str:
    """The summary JSON inside :func:`patch_dir_name`: ``<dataset>_<P>_summary.json``."""
    return f"{dataset}_{patch_size}_summary.json"


@dataclass(frozen=True)
class PatchSettings:
    """What shapes a patch folder: cubic ``patch_size`` (voxels), at most ``max_patches`` per case,
    least lesion fraction ``min_lesion_overlap`` in [0, 1] per patch, the draw's ``seed``,
    ``compress`` (a compressed .npz) and ``centers_only`` (only the keys training reads)."""

    patch_size: int
    max_patches: int
    min_lesion_overlap: float
    seed: int
    compress: bool
    centers_only: bool


@dataclass(frozen=True)
class CaseSelection:
    """Which cases to extract: ``split`` "all" (every ``<case>.npz`` of the dataset folder) or
    "train"/"val"/"test" of ``fold`` in ``splits_file``. Only chooses cases: no setting of the folder."""

    split: str = "all"
    splits_file: Path | None = None
    fold: int | None = None


def select_patch_cases(in_dir: Path, dataset: str, selection: CaseSelection) -> dict[str, PatchItem]:
    """Case id -> item: every ``<case>.npz`` of ``in_dir``, or the chosen split's cases (an item
    without its .npz fails when processed). Raises :class:`CaseError` for a missing folder or no cases."""
    if not in_dir.is_dir():
        raise CaseError(f"{in_dir}: dataset folder not found")
    found = {p.stem: p for p in sorted(in_dir.glob("*.npz")) if not p.name.startswith(".")}
    if selection.split == "all":
        wanted = sorted(found)
    else:
        wanted = sorted(getattr(load_split(selection.splits_file, selection.fold, dataset), selection.split))
    if not wanted:
        raise CaseError(f"{in_dir}: no cases to process (split {selection.split})")
    return {c: PatchItem(c, found.get(c), in_dir / f"{c}_metadata.json") for c in wanted}


def _kinds(report: RunReport) -> dict[str, list[str]]:
    """The summary's lists of lesion-free cases and of cases with the single fallback patch."""
    def of(kind: str) -> list[str]:
        return sorted(r.case_id for r in report.results if r.info.get("patch_kind") == kind)

    return {"lesion_free": of("tissue"), "fallback": of("fallback")}


def _record_patient_ids(out_dir: Path, report: RunReport) -> None:
    write_json(out_dir / "patient_ids.json", sorted(report.with_output()))


def patch_stage(input_dir: Path, output_dir: Path, dataset: str, settings: PatchSettings, selection: CaseSelection) -> Stage:
    """Patch extraction of ``<input_dir>/<dataset>/`` into ``<output_dir>/<dataset>_patches_<P>/``."""
    in_dir, size = Path(input_dir) / dataset, settings.patch_size
    out_dir = Path(output_dir) / patch_dir_name(dataset, size)
    recorded: dict[str, Any] = {
        "input_dir": str(in_dir.resolve()), "patch_size": size, "max_patches": settings.max_patches,
        "min_lesion_overlap": settings.min_lesion_overlap, "seed": settings.seed, "compressed": settings.compress,
        "centers_only": settings.centers_only,
    }
    summary = {
        "dataset": dataset, "keys": list(CENTERS_ONLY_KEYS if settings.centers_only else PATCH_KEYS), "centers_only": settings.centers_only,
        "patch_size": size, "max_patches": settings.max_patches, "min_lesion_overlap": settings.min_lesion_overlap, "seed": settings.seed,
        "split": selection.split, "fold": selection.fold, "splits_file": selection.splits_file, "compressed": settings.compress,
        "border": "windows kept inside the volume; shorter axes padded with 0",
    }
    describe = f"({selection.split}), {size}^3 patches, at most {settings.max_patches} each -> {out_dir}"
    return Stage(
        name="extract_patches_96x96x96",
        label=dataset,
        out_dir=out_dir,
        settings=recorded,
        discover=lambda: select_patch_cases(in_dir, dataset, selection),
        process=functools.partial(
            extract_case_patches, output_dir=out_dir, patch_size=size, max_patches=settings.max_patches,
            min_overlap=settings.min_lesion_overlap, seed=settings.seed, compress=settings.compress, centers_only=settings.centers_only,
        ),
        summary_name=patch_summary_name(dataset, size),
        summary_fields=summary,
        report_fields=_kinds,
        describe=lambda cases: f"{dataset}: {len(cases)} cases {describe}",
        records=functools.partial(_record_patient_ids, out_dir),
    )
