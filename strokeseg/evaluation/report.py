"""Evaluation outputs: per-case CSV, Markdown tables in the paper's layout, PNG figures.

Tables take run summaries as built by :func:`strokeseg.evaluation.engine.describe_run` plus
:func:`strokeseg.evaluation.engine.summarize_run` ("label", "strategy", "init", "folds", "n_test_cases",
"fold_summary"/"ensemble_summary" from :func:`strokeseg.evaluation.statistics.summarize`, "volume_agreement",
"detection"). Paper-layout cells are "mean ± std" with the sample std (ddof=1) across the per-fold
means, the paper's convention; "n/a" when undefined (one fold). Columns, headers, decimals and
directions come from :data:`strokeseg.core.metrics.METRICS`: the paper's ATLAS/UOA table shows
the entries with a ``paper_column``, the extended tables every metric in the preset's unit.
Figures are drawn with the Agg canvas (no pyplot).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..core.io import atomic_path
from ..datasets.registry import dataset_spec
from ..core.metrics import METRICS, PRESETS
from .statistics import DETECTION_RULE, MIN_CASES

__all__ = [
    "PNG_MODES",
    "format_mean_std",
    "markdown_table",
    "paper_strategy",
    "paper_init",
    "isles_table",
    "atlas_table",
    "details_table",
    "failed_cases",
    "distribution_table",
    "agreement_table",
    "detection_table",
    "comparison_table",
    "save_bland_altman",
    "scoring_record",
    "results_markdown",
    "select_for_figures",
    "axial_slice_index",
    "save_case_figure",
    "write_figures",
]

PNG_MODES = ("none", "all", "best-median-worst")

# Run-config values → the wording of the paper's ISLES table.
_ISLES_STRATEGIES = {
    "separate": "Separate encoders (DWI only)",
    "shared": "Shared encoder (DWI+ADC avg)",
    "dwi_only": "DWI-only baseline",
}
_TRANSFER_INITS = ("brats", "transfer", "pretrained")


def format_mean_std(mean: float, std: float, decimals: int) -> str:
    """``"0.6372 ± 0.0081"``; the std reads "n/a" when it is NaN (fewer than two values)."""
    std_text = "n/a" if std is None or math.isnan(std) else f"{std:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {std_text}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table; every row must have as many cells as ``header``."""
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {list(row)} has {len(row)} cells, header has {len(header)}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def paper_strategy(run_config: Mapping, model_config: Mapping, label: str) -> str:
    """ISLES strategy in the paper's words, from the run config's "strategy" (else the model's
    ResNet "variant"); the run label when neither names a known strategy."""
    for key in (run_config.get("strategy"), model_config.get("variant")):
        if key in _ISLES_STRATEGIES:
            return _ISLES_STRATEGIES[key]
    return label


def paper_init(init: str | None, label: str, dataset: str) -> str:
    """A checkpoint's initialisation label in the paper's words: "BraTS" (ISLES) or "Transfer"
    (ATLAS/UOA) for a pretrained start, "Scratch" for random initialisation; the run label when
    not recorded (None)."""
    if not isinstance(init, str):
        return label
    if init.lower() in _TRANSFER_INITS:
        return dataset_spec(dataset).pretrained_label
    return "Scratch" if init.lower() == "scratch" else init


def _cell(summary: Mapping, metric: str) -> str:
    values = summary["metrics"][metric]
    return format_mean_std(values["fold_mean"], values["fold_std"], METRICS[metric].decimals)


def _distinct(names: Sequence[tuple], runs: Sequence[Mapping]) -> list[str]:
    """First element of each name tuple, with " (label)" added where two runs share a tuple."""
    return [name[0] if names.count(name) == 1 else f"{name[0]} ({run['label']})" for name, run in zip(names, runs)]


def isles_table(runs: Sequence[Mapping]) -> str:
    """The paper's ISLES table: Strategy | Init | Mean DSC (mean ± std across fold means).
    Runs with the same strategy and init get their label added to the strategy."""
    strategies = _distinct([(run["strategy"], run["init"]) for run in runs], runs)
    rows = [[name, run["init"], _cell(run["fold_summary"], "dice")] for name, run in zip(strategies, runs)]
    return markdown_table(["Strategy", "Init", "Mean DSC"], rows)


def _folds_text(folds: Sequence[int]) -> str:
    folds = sorted(folds)
    if folds == list(range(5)):
        return "all 5"
    if len(folds) > 1 and folds == list(range(folds[0], folds[-1] + 1)):
        return f"f{folds[0]}–{folds[-1]}"
    return "f" + ",".join(str(f) for f in folds)


def atlas_table(dataset_name: str, runs: Sequence[Mapping]) -> str:
    """The paper's ATLAS/UOA table: Dataset | Strategy | DSC ± std | Lesion F1 | Lesion Count Diff |
    Vol Diff (voxels), all mean ± std across fold means. Strategy is the run's init in the paper's
    words (Transfer / Scratch; the label when unknown). A Folds column is added when the runs use
    different fold sets (as in the paper's UCTransNet3D table)."""
    with_folds = len({tuple(sorted(run["folds"])) for run in runs}) > 1
    columns = sorted((key for key, m in METRICS.items() if m.paper_column is not None), key=lambda key: METRICS[key].paper_column)
    header = ["Dataset", "Strategy"] + (["Folds"] if with_folds else [])
    header += [METRICS[m].paper_header or METRICS[m].header for m in columns]
    strategies = _distinct([(run["init"], tuple(sorted(run["folds"]))) for run in runs], runs)
    rows = []
    for name, run in zip(strategies, runs):
        summary = run["fold_summary"]
        row = [dataset_name, name] + ([_folds_text(run["folds"])] if with_folds else [])
        row += [_cell(summary, m) for m in columns]
        rows.append(row)
    return markdown_table(header, rows)


def _num(value: float | None, decimals: int) -> str:
    """``value`` with ``decimals`` digits; "n/a" for None or NaN."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.{decimals}f}"


def _pair(values: Sequence[float], decimals: int) -> str:
    return f"[{_num(values[0], decimals)}, {_num(values[1], decimals)}]"


def _case_cell(summary: Mapping | None, metric: str = "dice") -> tuple[str, str]:
    if summary is None:
        return "–", "–"
    values = summary["metrics"][metric]
    decimals = METRICS[metric].decimals
    return format_mean_std(values["case_mean"], values["case_std"], decimals), _pair(values["ci95"], decimals)


def _cases_text(run: Mapping) -> str:
    """Scored / listed cases: distinct cases with a score / cases the splits file lists."""
    return f"{run['fold_summary']['n_cases']}/{run['n_test_cases']}"


def details_table(runs: Sequence[Mapping], metrics: Sequence[str]) -> str:
    """Per run: folds, scored/listed cases, each of ``metrics`` (keys of METRICS) across fold
    means, DSC over distinct cases with its bootstrap 95 % CI, and the fold ensemble's DSC
    over cases when it was computed."""
    header = ["Run", "Folds", "Cases", *(METRICS[m].header for m in metrics)]
    header += ["DSC over cases", "95 % CI", "Ensemble DSC over cases", "Ensemble 95 % CI"]
    rows = []
    for run in runs:
        summary = run["fold_summary"]
        row = [run["label"], _folds_text(run["folds"]), _cases_text(run)]
        row += [_cell(summary, m) for m in metrics]
        row += [*_case_cell(summary), *_case_cell(run.get("ensemble_summary"))]
        rows.append(row)
    return markdown_table(header, rows)


def failed_cases(runs: Sequence[Mapping]) -> str:
    """Markdown list of every run's failed cases with their reasons ("" when none failed)."""
    lines = [f"- {item['case_id']}: {item['reason']}" for run in runs for item in run.get("failed", ())]
    return "Failed cases (not scored):\n" + "\n".join(lines) if lines else ""


def distribution_table(runs: Sequence[Mapping], metrics: Sequence[str]) -> str:
    """Per run and metric: mean ± std across fold means (across seed means too when a run has
    several seeds), then over distinct cases mean ± std, bootstrap 95 % CI, median, IQR and
    [5th, 95th] percentiles."""
    seeds = any(run.get("n_seeds", 1) > 1 for run in runs)
    header = ["Run", "Metric", "Folds: mean ± std"] + (["Seeds: mean ± std"] if seeds else [])
    header += ["Cases: mean ± std", "95 % CI", "Median", "IQR", "[5th, 95th]"]
    rows = []
    for run in runs:
        for metric in metrics:
            v, d = run["fold_summary"]["metrics"][metric], METRICS[metric].decimals
            seed_cell = [format_mean_std(float(np.mean(v["seed_means"])), v["seed_std"], d)] if seeds else []
            rows.append([run["label"], METRICS[metric].header, format_mean_std(v["fold_mean"], v["fold_std"], d), *seed_cell,
                         *_case_cell(run["fold_summary"], metric), _num(v["median"], d), _pair(v["iqr"], d), _pair(v["p5_p95"], d)])
    return markdown_table(header, rows)


def agreement_table(runs: Sequence[Mapping]) -> str:
    """Per run: predicted vs reference lesion volume (ml) over distinct cases: Bland-Altman bias
    and 95 % limits of agreement, ICC(3,1), Pearson and Spearman r; the last four read
    "n/a (n < 5)" below :data:`strokeseg.evaluation.statistics.MIN_CASES` cases."""
    header = ["Run", "Cases", "Bias (ml)", "95 % LoA (ml)", "ICC(3,1)", "Pearson r", "Spearman r"]
    rows = []
    for run in runs:
        a = run["volume_agreement"]
        if a["n"] < MIN_CASES:
            rows.append([run["label"], str(a["n"]), _num(a["bias_ml"], 2), *[f"n/a (n < {MIN_CASES})"] * 4])
            continue
        rows.append([run["label"], str(a["n"]), _num(a["bias_ml"], 2), _pair(a["loa_ml"], 2), _num(a["icc_3_1"], 3), _num(a["pearson_r"], 3), _num(a["spearman_r"], 3)])
    return markdown_table(header, rows)


def detection_table(runs: Sequence[Mapping]) -> str:
    """Per run: detection sensitivity per reference-lesion volume bin ("sensitivity [95 % CI]
    (detected/n lesions)", detected a sum of per-lesion shares over the scoring models) and
    false-positive lesions per case."""
    names = [b["bin"] for b in runs[0]["detection"]["bins"]] if runs else []
    rows = []
    for run in runs:
        found = run["detection"]
        cells = [f"{_num(b['sensitivity'], 3)} {_pair(b['ci95'], 3)} ({b['detected']:.4g}/{b['n']})" for b in found["bins"]]
        rows.append([run["label"], *cells, _num(found["fp_lesions_per_case"], 2)])
    return markdown_table(["Run", *(f"Sensitivity {n}" for n in names), "FP lesions / case"], rows)


def comparison_table(comparisons: Sequence[Mapping]) -> str:
    """One row per comparison and metric (primary ones, then secondary ones marked so): n, mean
    difference A − B [bootstrap 95 % CI], median difference, Wilcoxon p, Holm-adjusted p (within
    the metric's family); comparisons that failed are listed below."""
    rows, notes = [], []
    for comp in comparisons:
        if "error" in comp:
            notes.append(f"- WARNING {comp['a']} vs {comp['b']}: not computed ({comp['error']})")
            continue
        tests = [(m, t, "") for m, t in comp["metrics"].items()] + [(m, t, "; secondary") for m, t in comp.get("secondary_metrics", {}).items()]
        for metric, test, role in tests:
            d = METRICS[metric].decimals + 1
            better = "higher" if METRICS[metric].higher_is_better else "lower"
            rows.append([f"{comp['a']} − {comp['b']}", f"{METRICS[metric].header} ({better} is better{role})", str(test["n"]),
                         f"{test['mean_difference']:+.{d}f} {_pair(test['ci95'], d)}", f"{test['median_difference']:+.{d}f}",
                         _p(test["p_value"]), _p(test["p_holm"])])
    header = ["A − B", "Metric", "Cases", "Mean difference [95 % CI]", "Median difference", "Wilcoxon p", "Holm p"]
    return "\n\n".join(part for part in (markdown_table(header, rows) if rows else "", "\n".join(notes)) if part)


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


# DatasetSpec.table_layout -> the paper table: (display name, runs) -> Markdown.
_TABLE_LAYOUTS = {"strategy": lambda name, runs: isles_table(runs), "dataset": atlas_table}


def scoring_record(whole_brain: bool, brain_crop: bool) -> dict:
    """Where the network ran and what was scored, for summary.json and results.md:
    {"inference_region": "whole volume" | "brain box" | "preprocessing crop", "note": a sentence}.
    whole_brain: the dataset spec's (whole-volume inputs, ATLAS/UOA); brain_crop: evaluate.py's --brain-crop."""
    if not whole_brain:
        return {"inference_region": "preprocessing crop", "note": "The network ran on the preprocessing crop; its probabilities are "
                "resampled onto the native grid, where the whole volume is scored (outside the crop: background)."}
    if brain_crop:
        return {"inference_region": "brain box", "note": "Brain-box inference (--brain-crop): the network ran only over the box of the "
                "brain's non-zero voxels, the rest predicted background, so false positives outside the box cannot occur; the whole volume is scored."}
    return {"inference_region": "whole volume", "note": "Whole-volume scoring: the network ran over the whole volume and every voxel is scored."}


def results_markdown(dataset: str, runs: Sequence[Mapping], preset: Mapping, comparisons: Sequence[Mapping], split: str, scoring: Mapping) -> str:
    """The whole ``results.md``: the paper-layout table with failed cases under it, details,
    distributions, volume agreement, lesion detection, comparisons; each with its definition.

    preset: :func:`strokeseg.evaluation.engine.preset_record`; comparisons: from
    :func:`strokeseg.evaluation.engine.compare_runs`; scoring: :func:`scoring_record`.
    """
    spec = dataset_spec(dataset)
    name = spec.display_name
    table = _TABLE_LAYOUTS[spec.table_layout](name, runs)
    metrics = [m for m in PRESETS[preset["name"]].report_metrics if all(m in run["fold_summary"]["metrics"] for run in runs)]
    match = f"matched one-to-one at IoU >= {preset['match_iou']}" if preset.get("match_iou") else "hit by one predicted voxel"
    parts = [
        f"# {name}: {split} set",
        table,
        failed_cases(runs),
        "Values: mean ± sample std (ddof=1) across the per-fold means (each fold's model scored on "
        f"the {split} cases), the paper's convention. {scoring['note']} Lesions are "
        f"{preset['connectivity']}-connected components (preset {preset['name']}; a reference lesion counts as detected when {match}).",
        "## Details",
        details_table(runs, metrics),
        "Cases: scored/listed distinct cases. \"over cases\": a case's value is the mean over the fold "
        "models (and seeds) that scored it; mean ± std over distinct cases; ensemble: the fold models' "
        "probabilities averaged per case; CI: percentile bootstrap of the mean over distinct cases.",
        "## Distributions over cases",
        distribution_table(runs, metrics),
        "Folds: the paper's mean ± std across fold means (with several seeds: pooled within-seed std); "
        "Seeds: mean ± std across the seeds' means; IQR: [25th, 75th] percentile.",
        "## Volume agreement (predicted vs reference lesion volume, ml)",
        agreement_table(runs),
        "Per distinct case (the ensemble's volume, else the mean over fold models). Bias: mean of "
        "predicted − reference; LoA: bias ± 1.96 sample std of the differences; ICC(3,1): two-way "
        f"mixed, consistency, single rater (Shrout & Fleiss 1979); LoA, ICC and correlations need at least {MIN_CASES} cases. "
        "Bland-Altman plots: figures/bland_altman/<run>.png.",
        "## Lesion detection",
        detection_table(runs),
        f"Reference lesions binned by volume, each lesion once; the scoring models are the ensemble when present, "
        f"else the fold models (and seeds): {DETECTION_RULE}. (detected/n): the sum of the shares / the lesions. "
        "FP lesions: predicted components not matched to a reference lesion, mean per case. Per lesion and model: lesions.csv.",
    ]
    if comparisons:
        secondary = any(comp.get("secondary_metrics") for comp in comparisons)
        family = ("every comparison and primary metric above; the secondary metrics form a family of their own, "
                  "so they leave the primary p-values unchanged") if secondary else "every comparison and metric above"
        parts += ["## Paired comparisons", comparison_table(comparisons),
                  "Per case: the ensemble's value, else the mean over fold models and seeds; difference "
                  "A − B over the cases both scored, bootstrap 95 % CI of its mean; two-sided Wilcoxon "
                  f"signed-rank p (zero differences dropped); Holm: adjusted over {family}."]
    return "\n\n".join(part for part in parts if part) + "\n"




def select_for_figures(rows: Sequence[Mapping], mode: str) -> list[Mapping]:
    """Rows to draw: "all", "none", or "best-median-worst" by Dice (ties broken by case id;
    the median is the lower middle one). Each row appears once."""
    if mode not in PNG_MODES:
        raise ValueError(f"png mode must be one of {PNG_MODES}, got {mode!r}")
    if mode == "none" or not rows:
        return []
    ranked = sorted(rows, key=lambda r: (r["dice"], str(r["case_id"]), str(r["fold"])))
    if mode == "all":
        return ranked
    picked = [ranked[-1], ranked[(len(ranked) - 1) // 2], ranked[0]]
    return [row for i, row in enumerate(picked) if all(row is not other for other in picked[:i])]


def axial_slice_index(reference: np.ndarray, prediction: np.ndarray) -> int:
    """Axial slice (index along Z of an (X, Y, Z) volume) through the most reference lesion;
    through the most predicted voxels when the reference is empty; the middle when both are."""
    for mask in (reference, prediction):
        per_slice = np.count_nonzero(mask, axis=(0, 1))
        if per_slice.any():
            return int(per_slice.argmax())
    return reference.shape[2] // 2


def save_case_figure(path: str | Path, image: np.ndarray, reference: np.ndarray | None, prediction: np.ndarray, title: str) -> None:
    """PNG of one axial slice: image; image with the reference (red; left out when None); image
    with the prediction (blue). image float (X, Y); reference, prediction bool (X, Y). Written
    atomically."""
    panels = [(None, None, "image"), (reference, "Reds", "reference"), (prediction, "Blues", "prediction")]
    panels = [panel for panel in panels if panel[2] != "reference" or reference is not None]
    fig = Figure(figsize=(3.0 * len(panels), 3.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels))
    low, high = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
    for ax, (overlay, colour, name) in zip(axes, panels):
        ax.imshow(image.T, cmap="gray", origin="lower", vmin=low, vmax=high if high > low else low + 1)
        if overlay is not None:
            ax.imshow(np.ma.masked_where(~overlay.T, overlay.T.astype(np.float32)), cmap=colour, origin="lower", vmin=0, vmax=1, alpha=0.6)
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def write_figures(out_dir: Path, rows: Sequence[Mapping], slices: Mapping[tuple[str, str], object], mode: str, label: str) -> list[Path]:
    """Draw ``<out_dir>/<case>_<fold>.png`` for the rows picked by :func:`select_for_figures`
    among the ensemble rows (when present) or the fold rows of one run.

    slices: (fold, case_id) -> an object with ``image``, ``reference``, ``prediction`` (2-D) and
    ``z`` (see :class:`strokeseg.evaluation.engine.FigureSlices`). Returns the paths written.
    """
    ensemble = [row for row in rows if row["fold"] == "ensemble"]
    written = []
    for row in select_for_figures(ensemble or list(rows), mode):
        found = slices[(row["fold"], row["case_id"])]
        path = out_dir / f"{row['case_id']}_{row['fold']}.png"
        title = f"{label} {row['fold']} {row['case_id']}: Dice {row['dice']:.3f} (axial slice z = {found.z})"
        save_case_figure(path, found.image, found.reference, found.prediction, title)
        written.append(path)
    return written


def save_bland_altman(path: str | Path, run: Mapping, label: str) -> None:
    """Bland-Altman PNG of a run summary (from :func:`strokeseg.evaluation.engine.summarize_run`):
    per case the mean of predicted and reference volume (ml) against their difference, with
    the bias and 95 % limits of agreement as lines. Written atomically."""
    cases = sorted(set(run["volumes_ml"]["pred"]) & set(run["volumes_ml"]["ref"]))
    pred = np.array([run["volumes_ml"]["pred"][c] for c in cases])
    ref = np.array([run["volumes_ml"]["ref"][c] for c in cases])
    agreement = run["volume_agreement"]
    fig = Figure(figsize=(5.0, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.scatter((pred + ref) / 2, pred - ref, s=12, color="tab:blue")
    for value, style in ((agreement["bias_ml"], "-"), *((loa, "--") for loa in agreement["loa_ml"])):
        if not math.isnan(value):
            ax.axhline(value, color="gray", linestyle=style, linewidth=1)
    ax.set_xlabel("mean of predicted and reference volume (ml)")
    ax.set_ylabel("predicted − reference (ml)")
    ax.set_title(f"{label}: bias {_num(agreement['bias_ml'], 2)} ml, LoA {_pair(agreement['loa_ml'], 2)}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
