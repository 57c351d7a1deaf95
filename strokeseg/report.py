"""Evaluation outputs: per-case CSV, Markdown tables in the paper's layout, PNG figures.

Tables take run summaries as built by :func:`strokeseg.evaluation.describe_run` plus
:func:`strokeseg.evaluation.summarize_run` (a dict with "label", "strategy", "init", "folds",
"n_test_cases" and "fold_summary"/"ensemble_summary" from :func:`strokeseg.metrics.summarize`). Every table cell is "mean ± std" where the std is the
sample std (ddof=1) across the per-fold means, the paper's convention; "n/a" when undefined
(one fold). Figures are drawn with the Agg canvas (no pyplot, no display needed).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .io import atomic_path
from .metrics import METRICS, PRESETS

__all__ = [
    "PNG_MODES",
    "format_mean_std",
    "markdown_table",
    "paper_strategy",
    "paper_init",
    "isles_table",
    "atlas_table",
    "details_table",
    "results_markdown",
    "write_csv",
    "select_for_figures",
    "axial_slice_index",
    "save_case_figure",
    "write_figures",
]

# The paper's ATLAS/UOA table: its metric columns and where its headers differ from METRICS.
_ATLAS_METRICS = ("dice", "lesion_f1", "abs_lesion_count_diff", "abs_volume_diff_voxels")
_PAPER_HEADERS = {"dice": "DSC ± std"}
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
        return "BraTS" if dataset == "ISLES2022" else "Transfer"
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
    header = ["Dataset", "Strategy"] + (["Folds"] if with_folds else [])
    header += [_PAPER_HEADERS.get(m, METRICS[m].header) for m in _ATLAS_METRICS]
    strategies = _distinct([(run["init"], tuple(sorted(run["folds"]))) for run in runs], runs)
    rows = []
    for name, run in zip(strategies, runs):
        summary = run["fold_summary"]
        row = [dataset_name, name] + ([_folds_text(run["folds"])] if with_folds else [])
        row += [_cell(summary, m) for m in _ATLAS_METRICS]
        rows.append(row)
    return markdown_table(header, rows)


def _case_cell(summary: Mapping | None, metric: str = "dice") -> tuple[str, str]:
    if summary is None:
        return "–", "–"
    values = summary["metrics"][metric]
    decimals = METRICS[metric].decimals
    low, high = values["ci95"]
    return format_mean_std(values["case_mean"], values["case_std"], decimals), f"[{low:.{decimals}f}, {high:.{decimals}f}]"


def details_table(runs: Sequence[Mapping], metrics: Sequence[str]) -> str:
    """Per run: folds, cases, each of ``metrics`` (keys of METRICS) across fold means, DSC over
    cases with its bootstrap 95 % CI, and the fold ensemble's DSC over cases when it was computed."""
    header = ["Run", "Folds", "Cases", *(METRICS[m].header for m in metrics)]
    header += ["DSC over (fold, case)", "95 % CI", "Ensemble DSC over cases", "Ensemble 95 % CI"]
    rows = []
    for run in runs:
        summary = run["fold_summary"]
        row = [run["label"], _folds_text(run["folds"]), str(run["n_test_cases"])]
        row += [_cell(summary, m) for m in metrics]
        row += [*_case_cell(summary), *_case_cell(run.get("ensemble_summary"))]
        rows.append(row)
    return markdown_table(header, rows)


def results_markdown(dataset: str, runs: Sequence[Mapping], preset: Mapping, comparisons: Sequence[Mapping], split: str) -> str:
    """The whole ``results.md``: the paper-layout table, the details table, comparisons, notes.

    preset: {"name", "connectivity", "volume_unit"}; comparisons: dicts with "a", "b" and either
    the :func:`strokeseg.metrics.paired_wilcoxon` result or an "error".
    """
    name = {"ISLES2022": "ISLES 2022", "UOA_Private": "UOA"}.get(dataset, dataset)
    table = isles_table(runs) if dataset == "ISLES2022" else atlas_table(name, runs)
    parts = [
        f"# {name}: {split} set",
        table,
        "Values: mean ± sample std (ddof=1) across the per-fold means (each fold's model scored on "
        f"the {split} cases), the paper's convention. Whole-volume scoring; lesions are "
        f"{preset['connectivity']}-connected components (preset {preset['name']}).",
        "## Details",
        details_table(runs, PRESETS[preset["name"]].table_metrics),
        "\"over (fold, case)\": mean ± std over every fold model's per-case score; ensemble: the fold "
        "models' probabilities averaged per case, mean ± std over cases; CI: percentile bootstrap of "
        "the case mean.",
    ]
    if comparisons:
        lines = ["## Paired comparisons (Wilcoxon signed-rank on per-case Dice)"]
        for comp in comparisons:
            if "error" in comp:
                lines.append(f"- {comp['a']} vs {comp['b']}: not computed ({comp['error']})")
            else:
                lines.append(
                    f"- {comp['a']} vs {comp['b']}: n = {comp['n']}, median difference "
                    f"{comp['median_difference']:+.4f}, p = {comp['p_value']:.4g} ({comp['per_case']})"
                )
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def write_csv(path: str | Path, rows: Sequence[Mapping], columns: Sequence[str]) -> None:
    """Write ``rows`` (dicts) to ``path`` with a header of ``columns``, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)


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
    ``z`` (see :class:`strokeseg.evaluation.FigureSlices`). Returns the paths written.
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
