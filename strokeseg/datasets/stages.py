"""The preprocessing stages, declared once each as a :class:`strokeseg.core.stage.Stage`.

``preprocess_v2_isles.py`` / ``preprocess_isles_WITH_BBOX.py`` run :func:`isles_stage`,
``preprocess_brats2024_t2flair.py`` :func:`brats_stage` and ``preprocess_stroke_foundation.py``
:func:`foundation_stage` (one per dataset of its config), each through
:func:`strokeseg.core.stage.run_stages`. A declaration names the settings that shape its folder,
how its cases are found, the per-case function, the summary and how its splits are written;
how a case is read and prepared stays in the dataset's module.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..core.io import load_npz, read_json
from ..core.runner import RunReport
from ..core.stage import SplitsWriter, Stage
from . import brats, foundation, isles
from .fingerprint import write_dataset_fingerprint
from .splits import SPLIT_SETTINGS, write_stage_splits

__all__ = ["isles_stage", "brats_stage", "foundation_stage", "foundation_settings", "PREPROCESSING_SUMMARY"]

PREPROCESSING_SUMMARY = "preprocessing_summary.json"  # the summary of the ISLES and BraTS stages


def _splits_writer(
    path: Path, dataset: str, test_fraction: float, seed: int, volume: Callable[[str, Mapping[str, Any]], float],
    group: Callable[[str], str] | None = None, required: bool = True,
) -> SplitsWriter:
    """A stage's splits step: :func:`write_stage_splits` into ``path``. ``volume(case_id, info)``
    orders the cases (``info``: the case's :class:`CaseResult` info of this run, {} for a
    skipped case or a rebuild); ``group(case_id)``: its patient, when splits group cases."""

    def write(case_ids: Sequence[str], report: RunReport | None, overwrite: bool) -> int:
        infos = {r.case_id: r.info for r in report.results} if report is not None else {}
        groups = {c: group(c) for c in case_ids} if group is not None else None
        return write_stage_splits(
            path, case_ids, lambda c: volume(c, infos.get(c, {})), dataset, test_fraction, seed, overwrite, groups, required
        )

    return write


def _record_fingerprints(out_dir: Path, report: RunReport) -> None:
    """``dataset_fingerprint.json`` from the cases done by this run, over every case with output."""
    write_dataset_fingerprint(out_dir, {r.case_id: r.info["fingerprint"] for r in report.by_status("done")}, report.with_output())


def isles_stage(isles_dir: Path, output_dir: Path, settings: isles.IslesSettings) -> Stage:
    """ISLES 2022 preprocessing into ``output_dir`` (:func:`strokeseg.datasets.isles.preprocess_isles_case`):
    ``<case>.npz``, ``preprocessing_summary.json``, ``dataset_fingerprint.json`` and
    ``isles2022_splits_5fold.json`` over the cases with output, stratified by the native lesion
    volume (:func:`strokeseg.datasets.isles.lesion_volumes_ml`), so both ISLES stages write the
    same file for the same cases and seed; evaluation data may be too few cases for splits of
    its own (a NOTE then; ``evaluate.py`` takes ``--splits-file``). Raises :class:`CaseError`
    for a missing ``isles_dir``."""
    spec = isles.ISLES2022
    volume = lambda case_id, _info: isles.lesion_volumes_ml(output_dir, [case_id])[case_id]  # noqa: E731
    return Stage(
        name="preprocess_isles_WITH_BBOX" if settings.with_bbox else "preprocess_v2_isles",
        label="ISLES",
        out_dir=output_dir,
        settings=settings.recorded(isles_dir),
        discover=lambda: {case.case_id: case for case in isles.discover_isles_cases(isles_dir)},
        process=functools.partial(
            isles.preprocess_isles_case, output_dir=output_dir, target_shape=tuple(settings.target_shape), margin=settings.margin,
            with_bbox=settings.with_bbox,
        ),
        summary_name=PREPROCESSING_SUMMARY,
        summary_fields={"dataset": spec.name, "keys": list(isles.BBOX_KEYS if settings.with_bbox else isles.TRAIN_KEYS)},
        describe=lambda cases: f"{len(cases)} ISLES cases under {isles_dir}; target shape {settings.target_shape}; bbox metadata: {settings.with_bbox}",
        records=functools.partial(_record_fingerprints, output_dir),
        splits=_splits_writer(output_dir / spec.splits_name, spec.name, settings.test_fraction, settings.seed, volume, required=not settings.with_bbox),
        split_settings=SPLIT_SETTINGS,
    )


def brats_stage(brats_dir: Path, output_dir: Path, target_shape: tuple[int, int, int], test_fraction: float, seed: int) -> Stage:
    """BraTS 2024 T2-FLAIR preprocessing into ``output_dir`` (:func:`strokeseg.datasets.brats.preprocess_brats_case`):
    ``<case>.npz``, ``preprocessing_summary.json`` and ``brats2024_t2flair_splits_5fold.json``,
    stratified by tumour voxels on the common output grid and grouped by patient."""
    spec = brats.BRATS2024

    def volume(case_id: str, info: Mapping[str, Any]) -> float:
        if "lesion_voxels" in info:
            return info["lesion_voxels"]
        return load_npz(output_dir / f"{case_id}.npz", keys=("mask",))["mask"].sum()

    def describe(cases: Mapping[str, brats.BratsCase]) -> str:
        n_patients = len({case.patient_id for case in cases.values()})
        return f"{len(cases)} BraTS visits of {n_patients} patients under {brats_dir}; target shape {tuple(target_shape)}"

    return Stage(
        name="preprocess_brats2024_t2flair",
        label="BraTS",
        out_dir=output_dir,
        settings={"brats_dir": str(Path(brats_dir).resolve()), "target_shape": list(target_shape), "test_fraction": test_fraction, "seed": seed},
        discover=lambda: {case.case_id: case for case in brats.discover_brats_cases(brats_dir)},
        process=functools.partial(brats.preprocess_brats_case, output_dir=output_dir, target_shape=tuple(target_shape)),
        summary_name=PREPROCESSING_SUMMARY,
        summary_fields={"dataset": spec.name, "keys": list(brats.BRATS_KEYS)},
        describe=describe,
        splits=_splits_writer(output_dir / spec.splits_name, spec.name, test_fraction, seed, volume, group=brats.patient_id),
        split_settings=SPLIT_SETTINGS,
    )


def foundation_settings(dataset: foundation.DatasetConfig, config: foundation.FoundationConfig, test_fraction: float, seed: int) -> dict[str, Any]:
    """The settings that shape ``<output_base_dir>/<name>/`` (``use_gpu`` only picks the device)."""
    preprocessing = {k: v for k, v in config.as_dict()["preprocessing"].items() if k != "use_gpu"}
    return {
        "dataset": dataset.name, "data_dir": str(dataset.data_dir.resolve()), "image_pattern": dataset.image_pattern,
        "mask_pattern": dataset.mask_pattern, "id_markers": list(dataset.id_markers), "preprocessing": preprocessing,
        "test_fraction": test_fraction, "seed": seed,
    }


def foundation_stage(dataset: foundation.DatasetConfig, config: foundation.FoundationConfig, test_fraction: float, seed: int) -> Stage:
    """Full-volume T1w preprocessing of one config.json dataset into ``<output_base_dir>/<name>/``
    (:func:`strokeseg.datasets.foundation.preprocess_foundation_case`): ``<case>.npz`` and
    ``<case>_metadata.json`` (written last: it marks a finished case), ``<name>_summary.json``,
    ``dataset_fingerprint.json`` and ``<name>_splits_5fold.json`` stratified by lesion ml."""
    out_dir = config.output_base_dir / dataset.name
    volume = lambda case_id, _info: read_json(out_dir / f"{case_id}_metadata.json")["lesion_ml"]  # noqa: E731
    splits = out_dir / foundation.foundation_splits_name(dataset.name)
    return Stage(
        name="preprocess_stroke_foundation",
        label=dataset.name,
        out_dir=out_dir,
        settings=foundation_settings(dataset, config, test_fraction, seed),
        discover=lambda: foundation.discover_foundation_cases(dataset),
        process=functools.partial(foundation.preprocess_foundation_case, output_dir=out_dir, settings=config.preprocessing),
        summary_name=f"{dataset.name}_summary.json",
        summary_fields={"dataset": dataset.name, "keys": list(foundation.FOUNDATION_KEYS), "preprocessing": config.as_dict()["preprocessing"]},
        describe=lambda cases: f"{dataset.name}: {len(cases)} cases under {dataset.data_dir} -> {out_dir}",
        records=functools.partial(_record_fingerprints, out_dir),
        splits=_splits_writer(splits, dataset.name, test_fraction, seed, volume),
        split_settings=SPLIT_SETTINGS,
        output_suffix="_metadata.json",
    )
