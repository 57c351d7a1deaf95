"""Evaluation: fold checkpoints → whole-volume predictions → per-case metrics → run summaries.

ISLES 2022 (``preprocess_isles_WITH_BBOX.py`` output): the network sees the 96³ crop; its
foreground probability is resampled (trilinear) back through the stored bounding box onto the
native grid, thresholded, and scored against the native ``original_mask`` (isles22 preset:
26-connectivity, ml from ``spacing``). ATLAS / UOA (``preprocess_stroke_foundation.py`` output):
sliding-window inference over the whole volume, scored against ``lesion_mask`` on the same grid
(atlas22 preset: 6-connectivity, voxels; ml from the metadata spacing too). Never only inside
lesion patches (SPEC section 4).

Models are rebuilt from checkpoints alone (:func:`models.model_from_checkpoint`); their input
channels, window and identity are checked against the dataset before any case runs.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import numpy as np

from ..datasets.contract import THRESHOLD
from ..core.geometry import uncrop_to_native
from ..core.io import CaseError, changed_inputs, read_json, save_nifti
from ..core.runner import CaseResult, RunReport, get_logger, run_cases
from ..core.case import Case
from ..datasets.registry import dataset_spec
from ..datasets.splits import load_split
from ..inference.fold_models import FoldModel, predict_probability
from ..inference.inferer import Inferer
from ..core.metrics import METRICS, PRESETS, case_metrics
from .report import axial_slice_index, paper_init, paper_strategy
from .statistics import case_values, detection, holm, paired_difference, summarize, volume_agreement

__all__ = [
    "csv_columns",
    "LESION_COLUMNS",
    "CaseOutputs",
    "FigureSlices",
    "split_cases",
    "load_case",
    "display_volume",
    "to_scoring_grid",
    "score_probability",
    "evaluate_case",
    "evaluate_run",
    "lesion_rows",
    "describe_run",
    "summarize_run",
    "compare_runs",
    "preset_record",
    "evaluation_problems",
    "absolute_paths",
    "reusable_evaluation",
    "unfinished_notes",
]

_ROW_KEYS = ("run", "seed", "fold", "case_id")  # identify a row; the rest comes from :func:`score_probability`
_CASE_KEYS = ("ref_voxels", "pred_voxels", "ref_volume_ml", "pred_volume_ml", "n_ref_lesions", "n_pred_lesions", "fp_lesions")


def csv_columns() -> tuple[str, ...]:
    """Columns of per_case.csv: the row keys, every metric of :data:`strokeseg.core.metrics.METRICS`
    in registry order, the case's counts and the preset."""
    return (*_ROW_KEYS, *METRICS, *_CASE_KEYS, "preset", "connectivity", "match_iou")


# lesions.csv: one row per reference lesion and scoring model (see strokeseg.core.metrics.case_metrics)
LESION_COLUMNS = (*_ROW_KEYS, "lesion_id", "ref_volume_ml", "detected", "overlap_fraction")




@dataclass(frozen=True)
class FigureSlices:
    """One axial slice for a figure: image float32 (X, Y); reference, prediction bool (X, Y)."""

    image: np.ndarray
    reference: np.ndarray
    prediction: np.ndarray
    z: int


@dataclass
class CaseOutputs:
    """Where per-case side outputs go. nifti_dir: ``<dir>/<fold>/<case>.nii.gz`` (None: not
    written); figures: filled with (fold, case_id) -> :class:`FigureSlices` when not None."""

    nifti_dir: Path | None = None
    figures: dict[tuple[str, str], FigureSlices] | None = None


# --------------------------------------------------------------------------- data


def split_cases(splits_file: Path, dataset: str, fold_models: Sequence[FoldModel], split: str) -> dict[str, list[int]]:
    """case id -> the folds whose model scores it: every fold for "test" (the fixed held-out set),
    the fold itself for "val". Sorted by case id.

    Where a checkpoint records its validation cases, they must agree with the splits file: the
    same list for "val", no overlap with "test" (else the file is not the one it was trained
    with). Raises :class:`CaseError` for that, a missing or invalid file, a missing fold or an
    empty set.
    """
    if not splits_file.is_file():
        raise CaseError(f"{splits_file}: splits file not found; pass --splits-file (the preprocessing stage writes {dataset_spec(dataset).splits_name} into its output folder)")
    cases: dict[str, list[int]] = {}
    for fm in fold_models:
        ids = getattr(load_split(splits_file, fm.fold, dataset), split)
        if not ids:
            raise CaseError(f"{splits_file}: fold_{fm.fold}/{dataset} has an empty {split!r} list")
        if fm.val_cases is not None:
            clash = sorted(set(ids) & set(fm.val_cases)) if split == "test" else sorted(set(ids) ^ set(fm.val_cases))
            if clash:
                what = "validation cases of" if split == "test" else "not the validation cases of"
                raise CaseError(f"{splits_file}: {split} case(s) {clash[:5]} are {what} {fm.path}; is this the splits file it was trained with?")
        trained = sorted(set(ids) & set(fm.contract.train_cases or ()))
        if trained:
            raise CaseError(f"{splits_file}: {split} case(s) {trained[:5]} are training cases of {fm.path}; is this the splits file it was trained with?")
        for case_id in ids:
            cases.setdefault(case_id, []).append(fm.fold)
    return dict(sorted(cases.items()))


def load_case(case_dir: Path, case_id: str, dataset: str, channels: Sequence[str]) -> Case:
    """The dataset spec's evaluation loader (``load_eval_case``) for one case."""
    loader = dataset_spec(dataset).load_eval_case
    if loader is None:
        raise CaseError(f"{dataset}: the dataset has no evaluation loader")
    return loader(case_dir, case_id, channels)


def display_volume(case: Case) -> np.ndarray:
    """First input channel on the scoring grid, float32 (ISLES: the crop resampled back)."""
    return to_scoring_grid(case.first.data, case)


def to_scoring_grid(volume: np.ndarray, case: Case) -> np.ndarray:
    """Map a float32 (X, Y, Z) volume from the inference grid onto the scoring grid (the label's).

    With ``bbox`` in the case's meta (ISLES): trilinear resampling to the crop size, pasted at
    the bbox into zeros of the native shape; without (ATLAS/UOA): unchanged (the grids are one).
    """
    reference = case.label.data
    if "bbox" not in case.meta:
        if volume.shape != reference.shape:
            raise ValueError(f"{case.case_id}: prediction shape {volume.shape} differs from reference {reference.shape}")
        return volume
    return uncrop_to_native(volume, case.meta["bbox"], case.meta["cropped_shape"], reference.shape, is_label=False)


def score_probability(probability: np.ndarray, case: Case, preset: str, threshold: float = THRESHOLD) -> tuple[np.ndarray, dict]:
    """Threshold a foreground probability map and score it against the case's reference.

    probability: float (X, Y, Z) on the inference grid (ISLES: the 96³ crop). It is mapped to
    the scoring grid first (:func:`to_scoring_grid`, trilinear on probabilities), then voxels
    >= ``threshold`` (the checkpoint contract's, :data:`strokeseg.datasets.contract.THRESHOLD`) are lesion. Returns (prediction bool on the scoring grid, metrics dict
    from :func:`strokeseg.core.metrics.case_metrics` plus "ref_voxels" and "pred_voxels").
    """
    prediction = to_scoring_grid(np.asarray(probability, dtype=np.float32), case) >= threshold
    metrics = case_metrics(prediction, case.label.data, case.label.voxel_volume_ml, preset)
    metrics["ref_voxels"] = int(np.count_nonzero(case.label.data))
    metrics["pred_voxels"] = int(np.count_nonzero(prediction))
    return prediction, metrics


# --------------------------------------------------------------------------- checkpoints




# --------------------------------------------------------------------------- per case




def _record(case: Case, fold: str, probability: np.ndarray, preset: str, threshold: float, outputs: CaseOutputs, image: np.ndarray | None) -> dict:
    prediction, metrics = score_probability(probability, case, preset, threshold)
    if outputs.nifti_dir is not None:
        save_nifti(outputs.nifti_dir / fold / f"{case.case_id}.nii.gz", prediction.astype(np.uint8), case.label.affine)
    if outputs.figures is not None and image is not None:
        reference = case.label.data
        z = axial_slice_index(reference, prediction)
        outputs.figures[(fold, case.case_id)] = FigureSlices(image[:, :, z], reference[:, :, z], prediction[:, :, z], z)
    row = {"fold": fold, "case_id": case.case_id, **{k: metrics[k] for k in csv_columns()[len(_ROW_KEYS):]}}
    return {**row, "lesions": metrics["lesions"]}


def evaluate_case(
    case_id: str,
    case_dir: Path,
    dataset: str,
    fold_models: Sequence[FoldModel],
    ensemble: bool,
    inferer: Inferer,
    outputs: CaseOutputs,
    preset: str | None = None,
) -> CaseResult:
    """Predict one case with every fold model given by ``inferer`` (and their mean probability when
    ``ensemble``), score each prediction under ``preset`` (None: the dataset's), write the side outputs.

    Returns a done :class:`CaseResult` whose info["rows"] holds one metrics dict per prediction
    (fold "fold_<k>" or "ensemble"; "lesions": its per-lesion dicts). Bad input raises
    :class:`CaseError` (the runner records it).
    """
    channels = max((fm.channels for fm in fold_models), key=len)
    case = load_case(case_dir, case_id, dataset, channels)
    preset = preset or dataset_spec(dataset).preset
    image = display_volume(case) if outputs.figures is not None else None
    rows, total = [], None
    for fold_model in fold_models:
        probability = predict_probability(case.arrays(), fold_model, inferer)
        rows.append(_record(case, f"fold_{fold_model.fold}", probability, preset, fold_model.contract.threshold, outputs, image))
        total = probability if total is None else total + probability
    if ensemble:
        rows.append(_record(case, "ensemble", total / len(fold_models), preset, fold_models[0].contract.threshold, outputs, image))
    return CaseResult(case_id, "done", info={"rows": rows})


def evaluate_run(
    fold_models: Sequence[FoldModel],
    cases: Mapping[str, Sequence[int]],
    case_dir: Path,
    dataset: str,
    ensemble: bool,
    inferer: Inferer,
    outputs: CaseOutputs,
    preset: str | None = None,
) -> RunReport:
    """:func:`evaluate_case` for every case id -> folds of ``cases`` (from :func:`split_cases`),
    in one process; the run's models sit on ``inferer.device`` only for its duration."""
    by_fold = {fm.fold: fm for fm in fold_models}
    items = {case_id: (case_id, [by_fold[fold] for fold in folds]) for case_id, folds in cases.items()}

    def process(item: tuple[str, list[FoldModel]]) -> CaseResult:
        return evaluate_case(item[0], case_dir, dataset, item[1], ensemble, inferer, outputs, preset)

    for fm in fold_models:
        fm.model.to(inferer.device)
    try:
        return run_cases(items, process, workers=1, desc="cases")
    finally:
        for fm in fold_models:
            fm.model.to("cpu")


# --------------------------------------------------------------------------- summaries


def describe_run(label: str, seeds: Sequence[Sequence[FoldModel]], dataset: str, n_cases: int) -> dict:
    """What an arm is: label, paper strategy and init (from the first fold's run config and model
    config; see :func:`strokeseg.evaluation.report.paper_strategy`), folds, listed case count, n_seeds
    (training runs given this label) and checkpoints ("fold_<k>"; "seed_<s>/fold_<k>" with
    several seeds)."""
    models = [(s, fm) for s, fold_models in enumerate(seeds) for fm in fold_models]
    first = models[0][1]
    differing = sorted({key for _, fm in models for key in fm.model_config if fm.model_config.get(key) != first.model_config.get(key)})
    prefix = (lambda s: f"seed_{s}/") if len(seeds) > 1 else (lambda s: "")
    return {
        "label": label,
        "strategy": paper_strategy(first.run_config, first.model_config, label),
        "init": paper_init(first.init, label, dataset),
        "folds": sorted({fm.fold for _, fm in models}),
        "n_test_cases": n_cases,
        "n_seeds": len(seeds),
        # e.g. ["norm"]: folds trained with BatchNorm and GroupNorm (the paper's transfer folds 0-1)
        "model_config_differs_in": differing,
        "unfinished": {f"{prefix(s)}fold_{fm.fold}": fm.unfinished for s, fm in models if fm.unfinished},
        "checkpoints": {f"{prefix(s)}fold_{fm.fold}": fm.record() for s, fm in models},
    }


def lesion_rows(rows: Sequence[Mapping]) -> list[dict]:
    """One dict per reference lesion of every scored row (columns :data:`LESION_COLUMNS`)."""
    return [{**{key: row.get(key) for key in _ROW_KEYS}, **lesion} for row in rows for lesion in row.get("lesions", ())]


def summarize_run(rows: Sequence[Mapping], n_bootstrap: int, seed: int) -> dict:
    """Aggregate one arm's per-case rows (every seed; from :func:`evaluate_case`).

    Returns "fold_summary" (:func:`strokeseg.evaluation.statistics.summarize` over the fold models' rows),
    "ensemble_summary" (the same over the ensemble rows, or None); over distinct cases, from the
    ensemble rows when present, else the mean over fold models and seeds ("per_case_source"):
    "per_case" (metric -> case id -> value, for paired tests), "volumes_ml" ({"pred", "ref"}:
    case id -> lesion volume), "volume_agreement" (:func:`strokeseg.evaluation.statistics.volume_agreement`
    of the two) and "detection"
    (:func:`strokeseg.evaluation.statistics.detection`: each lesion once, with the share of the
    scoring models detecting it; bootstrap CI over cases).
    Every metric of :data:`strokeseg.core.metrics.METRICS` is summarised, except a secondary one
    that the rows lack (rows scored before it was registered). Raises ValueError without fold
    rows, or when a row lacks a primary metric.
    """
    fold_rows = [row for row in rows if row["fold"] != "ensemble"]
    if not fold_rows:
        raise ValueError("no case was scored")
    metrics = [m for m in METRICS if METRICS[m].primary or all(m in row for row in rows)]
    ensemble_rows = [row for row in rows if row["fold"] == "ensemble"]
    source = ensemble_rows or fold_rows
    volumes = {"pred": case_values(source, "pred_volume_ml"), "ref": case_values(source, "ref_volume_ml")}
    return {
        "fold_summary": summarize(fold_rows, metrics, n_bootstrap, seed),
        "ensemble_summary": summarize(ensemble_rows, metrics, n_bootstrap, seed) if ensemble_rows else None,
        "per_case": {metric: case_values(source, metric) for metric in metrics},
        "per_case_source": "ensemble" if ensemble_rows else "mean over fold models",
        "volumes_ml": volumes,
        "volume_agreement": volume_agreement(volumes["pred"], volumes["ref"]),
        "detection": detection(lesion_rows(source), case_values(source, "fp_lesions"), n_bootstrap, seed),
    }


def compare_runs(pairs: Sequence[tuple[str, str]], runs: Mapping[str, Mapping], metrics: Sequence[str], n_bootstrap: int, seed: int) -> list[dict]:
    """Paired comparisons of run summaries (from :func:`summarize_run`), one per (a, b) pair:
    for every metric of ``metrics`` (the preset's report metrics: one volume unit, not both)
    :func:`strokeseg.evaluation.statistics.paired_difference` of a - b over the cases both scored,
    plus "favours" (a or b, the run the mean difference favours by the metric's direction; None
    for no difference) and "p_holm": Holm-adjusted over the p-values of its family in this call.
    The primary metrics (:attr:`strokeseg.core.metrics.Metric.primary`) are one family, under
    "metrics"; the secondary ones another, under "secondary_metrics" (left out when none), so a
    secondary metric leaves the primary p-values unchanged. A pair that cannot be tested gets
    {"a", "b", "error"}. A secondary metric that a run's summary lacks is left out."""
    scored = [runs[label]["per_case"] for pair in pairs for label in pair if "per_case" in runs[label]]
    summarized = [m for m in metrics if METRICS[m].primary or all(m in per_case for per_case in scored)]
    families = {"metrics": [m for m in summarized if METRICS[m].primary], "secondary_metrics": [m for m in summarized if not METRICS[m].primary]}
    families = {name: keys for name, keys in families.items() if keys}
    out = []
    for a, b in pairs:
        comp: dict = {"a": a, "b": b, "per_case": runs[a].get("per_case_source")}
        missing = [label for label in (a, b) if "per_case" not in runs[label]]
        try:
            if missing:
                raise ValueError(f"run(s) {missing} have no scored case")
            for name, keys in families.items():
                comp[name] = {m: _paired(m, a, b, runs, n_bootstrap, seed) for m in keys}
        except ValueError as err:
            comp = {"a": a, "b": b, "per_case": comp["per_case"], "error": str(err)}
        out.append(comp)
    for name in families:
        tests = [test for comp in out for test in comp.get(name, {}).values()]
        for test, adjusted in zip(tests, holm([test["p_value"] for test in tests])):
            test["p_holm"] = adjusted
    return out


def _paired(metric: str, a: str, b: str, runs: Mapping[str, Mapping], n_bootstrap: int, seed: int) -> dict:
    """:func:`strokeseg.evaluation.statistics.paired_difference` of runs a - b on ``metric``, with "favours"."""
    test = paired_difference(runs[a]["per_case"][metric], runs[b]["per_case"][metric], n_bootstrap, seed)
    difference = test["mean_difference"]
    better = None if not difference or math.isnan(difference) else (difference > 0) == METRICS[metric].higher_is_better
    return {**test, "favours": None if better is None else (a if better else b)}


def preset_record(preset: str) -> dict:
    """{"name", "connectivity", "volume_unit", "match_iou"} of a metrics preset (a key of PRESETS)."""
    found = PRESETS[preset]
    return {"name": preset, "connectivity": found.connectivity, "volume_unit": found.volume_unit, "match_iou": found.match_iou}


def unfinished_notes(summaries: Mapping[str, Mapping]) -> str:
    """Markdown lines for results.md naming every scored fold whose training stopped early
    ("" when none): from the "unfinished" entries of :func:`describe_run`."""
    lines = [f"- run `{label}` {fold}: {state}" for label, run in summaries.items() for fold, state in run.get("unfinished", {}).items()]
    if not lines:
        return ""
    return "\n**Unfinished training**: these folds were scored before their last epoch.\n\n" + "\n".join(lines) + "\n"


def evaluation_problems(summary: Mapping) -> list[str]:
    """What makes a finished evaluation's summary.json a failure to redo: failed cases, runs
    that could not be summarised, folds scored before training finished. (A comparison that
    could not be computed is a warning: the same data gives the same answer.)"""
    runs = summary.get("runs", {})
    problems = [f"{summary['n_failed']} failed case(s)"] if summary.get("n_failed") else []
    problems += [f"run {label}: {run['error']}" for label, run in runs.items() if "error" in run]
    problems += [f"run {label} {fold}: {state}" for label, run in runs.items() for fold, state in run.get("unfinished", {}).items()]
    return problems


def _differing_arguments(recorded: Mapping[str, Any], current: Mapping[str, Any], result_free: Collection[str]) -> list[str]:
    """"--flag (was X, now Y)" for every argument outside ``result_free`` whose JSON value differs."""
    def canonical(values: Mapping[str, Any]) -> dict:
        return json.loads(json.dumps({k: v for k, v in values.items() if k not in result_free}, default=str))

    def short(value: Any) -> str:  # both ends kept: paths differ in their tails as often as their heads
        text = json.dumps(value)
        return text if len(text) <= 400 else f"{text[:190]} ... {text[-190:]}"

    old, new = canonical(recorded), canonical(current)
    keys = sorted(key for key in set(old) | set(new) if old.get(key, "(absent)") != new.get(key, "(absent)"))
    return [f"--{key.replace('_', '-')} (was {short(old.get(key, '(absent)'))}, now {short(new.get(key, '(absent)'))})" for key in keys]


def absolute_paths(value: Any) -> Any:
    """``value`` (arguments: dicts, lists, scalars) with every :class:`~pathlib.Path` made
    absolute with links resolved, as a string: one folder spelled two ways compares equal."""
    if isinstance(value, Path):
        return str(value.resolve())
    if isinstance(value, Mapping):
        return {key: absolute_paths(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [absolute_paths(item) for item in value]
    return value


def reusable_evaluation(
    output_dir: Path, arguments: Mapping[str, Any], result_free: Collection[str], inputs: Mapping[str, Any]
) -> bool:
    """True when ``output_dir`` holds a finished, successful evaluation with these ``arguments``
    (argument name -> value; paths are compared as strings) of these ``inputs``
    (:func:`file_fingerprints` of the checkpoints, splits file and data), to be reported
    instead of redone.

    A finished evaluation (summary.json and results.md) must have been run with ``arguments``,
    outside ``result_free`` (settings that do not change the results), as its summary.json
    records them (older ones: its run_args.json); otherwise :class:`CaseError` names the folder
    and every differing argument. One with :func:`evaluation_problems`, or whose recorded inputs
    differ from ``inputs`` (or are not recorded), is logged and gives False (evaluate again), as
    does a folder without a finished evaluation.
    """
    summary_path, args_path = output_dir / "summary.json", output_dir / "run_args.json"
    if not (summary_path.is_file() and (output_dir / "results.md").is_file()):
        return False
    summary = read_json(summary_path)
    recorded = summary.get("arguments")
    if recorded is None and args_path.is_file():
        recorded = read_json(args_path).get("args")
    if not isinstance(recorded, dict):
        raise CaseError(f"{output_dir}: holds an evaluation that records no arguments; pass --overwrite to replace it")
    differing = _differing_arguments(recorded, arguments, result_free)
    if differing:
        raise CaseError(f"{output_dir}: holds an evaluation with other arguments: {'; '.join(differing)}; pass --overwrite to replace it, or another --output-dir")
    problems = evaluation_problems(summary)
    if problems:
        get_logger().info(f"{output_dir}: the evaluation there did not succeed ({'; '.join(problems[:3])}): evaluating again")
        return False
    changed = changed_inputs(summary.get("inputs") or {}, inputs)
    if changed:
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        get_logger().info(f"{output_dir}: checkpoints or data changed since the evaluation there ({', '.join(changed[:3])}{more}): evaluating again")
    return not changed
