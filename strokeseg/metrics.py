"""Whole-volume segmentation metrics per case, their aggregation over folds, and paired tests.

Every metric takes a prediction P and a reference G as boolean arrays of one shape (X, Y, Z).
Lesions are connected components under 6-connectivity (faces, ATLAS'22) or 26-connectivity
(faces, edges and corners, ISLES'22); :data:`PRESETS` names the two challenge conventions.

Each metric's name, unit, decimals, direction and empty rule live in :data:`METRICS`, from
which the CSV columns, summaries, tables and comparisons derive.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage, stats

__all__ = [
    "Preset",
    "PRESETS",
    "Metric",
    "METRICS",
    "METRIC_NAMES",
    "label_components",
    "dice",
    "volume_difference",
    "lesion_f1",
    "lesion_count_difference",
    "case_metrics",
    "summarize",
    "paired_wilcoxon",
]


@dataclass(frozen=True)
class Preset:
    """A challenge's lesion conventions.

    connectivity: 6 (faces) or 26 (faces, edges, corners) for connected components.
    volume_unit: "ml" or "voxels", the unit the challenge reports volume differences in
    (:func:`case_metrics` returns both; this says which one to put in tables).
    """

    connectivity: int
    volume_unit: str

    @property
    def volume_metric(self) -> str:
        """The key in :data:`METRICS` of the volume difference in this preset's unit."""
        return f"abs_volume_diff_{self.volume_unit}"

    @property
    def table_metrics(self) -> tuple[str, ...]:
        """Keys of :data:`METRICS` shown in tables: the unitless ones and those in this preset's volume unit."""
        return tuple(key for key, metric in METRICS.items() if metric.unit in ("", self.volume_unit))


PRESETS: dict[str, Preset] = {
    "isles22": Preset(connectivity=26, volume_unit="ml"),
    "atlas22": Preset(connectivity=6, volume_unit="voxels"),
}


@dataclass(frozen=True)
class Metric:
    """One per-case metric, the single source of CSV columns, summaries, tables and comparisons.

    key: column in per_case.csv and key in summaries; label: table header; unit: "" when
    unitless, else appended to the header ("Vol Diff (ml)"); decimals: digits in tables;
    higher_is_better: the direction of a better score; empty: the value when P and/or G are empty.
    """

    key: str
    label: str
    unit: str
    decimals: int
    higher_is_better: bool
    empty: str

    @property
    def header(self) -> str:
        return f"{self.label} ({self.unit})" if self.unit else self.label


METRICS: dict[str, Metric] = {
    m.key: m
    for m in (
        Metric("dice", "DSC", "", 4, True, "1 when both empty, 0 when only one is"),
        Metric("abs_volume_diff_voxels", "Vol Diff", "voxels", 0, False, "0 when both empty, else the other's volume"),
        Metric("abs_volume_diff_ml", "Vol Diff", "ml", 2, False, "0 when both empty, else the other's volume"),
        Metric("lesion_f1", "Lesion F1", "", 4, True, "1 when both empty, 0 when only one is"),
        Metric("abs_lesion_count_diff", "Lesion Count Diff", "", 2, False, "0 when both empty, else the other's count"),
    )
}
METRIC_NAMES: tuple[str, ...] = tuple(METRICS)

_STRUCTURES = {6: ndimage.generate_binary_structure(3, 1), 26: ndimage.generate_binary_structure(3, 3)}


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> None:
    for name, arr in (("pred", pred), ("ref", ref)):
        if not isinstance(arr, np.ndarray) or arr.dtype != np.bool_ or arr.ndim != 3:
            desc = f"{arr.dtype} array of shape {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
            raise ValueError(f"{name} must be a boolean (X, Y, Z) array, got {desc}")
    if pred.shape != ref.shape:
        raise ValueError(f"pred shape {pred.shape} differs from ref shape {ref.shape}")


def label_components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """Connected components of ``mask``: (labels int32 (X, Y, Z), 0 = background; count)."""
    if connectivity not in _STRUCTURES:
        raise ValueError(f"connectivity must be 6 or 26, got {connectivity!r}")
    labels, count = ndimage.label(mask, structure=_STRUCTURES[connectivity])
    return labels, int(count)


def _dice_from_counts(n_overlap: int, n_pred: int, n_ref: int) -> float:
    if n_pred + n_ref == 0:
        return 1.0
    return 2.0 * n_overlap / (n_pred + n_ref)


def _f1_from_labels(
    pred_labels: np.ndarray, n_pred: int, ref_labels: np.ndarray, n_ref: int, overlap: np.ndarray
) -> float:
    """Lesion-wise F1 from component labels and the voxel mask P ∩ G."""
    if n_pred == 0 and n_ref == 0:
        return 1.0
    # A reference lesion is hit (TP) and a predicted component is matched (not FP) exactly when
    # one of its voxels lies in P ∩ G, so both counts come from the overlap voxels alone.
    tp = int(np.count_nonzero(np.bincount(ref_labels[overlap], minlength=n_ref + 1)[1:]))
    matched_pred = int(np.count_nonzero(np.bincount(pred_labels[overlap], minlength=n_pred + 1)[1:]))
    fn = n_ref - tp
    fp = n_pred - matched_pred
    return tp / (tp + (fp + fn) / 2.0)


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice = 2|P∩G| / (|P|+|G|) of boolean (X, Y, Z) arrays.

    Both empty: 1.0. Only one empty: 0.0.
    """
    _check_pair(pred, ref)
    return _dice_from_counts(
        int(np.count_nonzero(pred & ref)), int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    )


def volume_difference(pred: np.ndarray, ref: np.ndarray, voxel_volume_ml: float) -> tuple[int, float]:
    """Absolute volume difference | |P| - |G| | as (voxels, ml).

    voxel_volume_ml: volume of one voxel in ml (product of zooms in mm / 1000).
    Both empty: (0, 0.0); only one empty: the other's volume.
    """
    _check_pair(pred, ref)
    if not voxel_volume_ml > 0 or not math.isfinite(voxel_volume_ml):
        raise ValueError(f"voxel_volume_ml must be a positive finite number, got {voxel_volume_ml!r}")
    voxels = abs(int(np.count_nonzero(pred)) - int(np.count_nonzero(ref)))
    return voxels, voxels * float(voxel_volume_ml)


def lesion_f1(pred: np.ndarray, ref: np.ndarray, connectivity: int) -> float:
    """Lesion-wise F1 = TP / (TP + (FP + FN) / 2) over connected components.

    A reference component is TP if any of its voxels is predicted, else FN; a predicted
    component touching no reference voxel is FP. connectivity: 6 or 26.
    Both empty: 1.0. Only one empty: 0.0 (all FP or all FN).
    """
    _check_pair(pred, ref)
    pred_labels, n_pred = label_components(pred, connectivity)
    ref_labels, n_ref = label_components(ref, connectivity)
    return _f1_from_labels(pred_labels, n_pred, ref_labels, n_ref, pred & ref)


def lesion_count_difference(pred: np.ndarray, ref: np.ndarray, connectivity: int) -> int:
    """Absolute lesion count difference |#components(P) - #components(G)|; connectivity 6 or 26.

    Both empty: 0. Only one empty: the other's component count.
    """
    _check_pair(pred, ref)
    return abs(label_components(pred, connectivity)[1] - label_components(ref, connectivity)[1])


def case_metrics(pred: np.ndarray, ref: np.ndarray, voxel_volume_ml: float, preset: str) -> dict:
    """All metrics of one case under a named preset ("isles22" or "atlas22").

    pred, ref: boolean (X, Y, Z); voxel_volume_ml: ml per voxel. Components of P and G are
    labelled once and shared by lesion F1 and the count difference. Empty rules as in the
    single-metric functions. Returns a JSON-able dict with the keys of :data:`METRIC_NAMES`
    plus "preset" and "connectivity".
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    connectivity = PRESETS[preset].connectivity
    voxels, ml = volume_difference(pred, ref, voxel_volume_ml)  # also validates the pair
    overlap = pred & ref
    pred_labels, n_pred = label_components(pred, connectivity)
    ref_labels, n_ref = label_components(ref, connectivity)
    return {
        "dice": _dice_from_counts(
            int(np.count_nonzero(overlap)), int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
        ),
        "abs_volume_diff_voxels": voxels,
        "abs_volume_diff_ml": ml,
        "lesion_f1": _f1_from_labels(pred_labels, n_pred, ref_labels, n_ref, overlap),
        "abs_lesion_count_diff": abs(n_pred - n_ref),
        "preset": preset,
        "connectivity": connectivity,
    }


def _metric_values(cases: Sequence[Mapping], metric: str, fold: str) -> np.ndarray:
    values = []
    for i, case in enumerate(cases):
        value = case.get(metric)
        if value is None or not math.isfinite(float(value)):
            who = case.get("case_id", f"#{i}")
            raise ValueError(f"fold {fold!r}, case {who}: metric {metric!r} is missing or not finite ({value!r})")
        values.append(float(value))
    return np.asarray(values, dtype=np.float64)


def _std(values: np.ndarray) -> float:
    """Sample standard deviation (ddof=1); NaN for fewer than two values."""
    return float(np.std(values, ddof=1)) if values.size > 1 else float("nan")


def _single_setting(cases: Sequence[Mapping], key: str) -> object:
    found = {case.get(key) for case in cases}
    if len(found) > 1:
        raise ValueError(f"cases mix {key} values {sorted(map(str, found))}; summarize one setting at a time")
    return found.pop()


def summarize(
    per_fold: Mapping[str, Sequence[Mapping]],
    metrics: Sequence[str] = METRIC_NAMES,
    n_bootstrap: int = 10000,
    seed: int = 0,
) -> dict:
    """Aggregate per-case metrics over folds and over cases.

    per_fold: fold name -> list of per-case dicts (as from :func:`case_metrics`, optionally
    with "case_id"); pass ``{"all": cases}`` when there are no folds. Each metric gets:

    - fold_means: the mean of each fold (in ``per_fold`` order); fold_mean: their mean;
      fold_std: their sample std (ddof=1), the paper's "mean ± std across the fold means"
      (NaN with one fold).
    - case_mean, case_std: mean and sample std (ddof=1) over all cases pooled (NaN std with
      one case); ci95: percentile bootstrap 95 % interval of the case mean from
      ``n_bootstrap`` resamples of cases, seeded by ``seed`` (same resamples for every metric).

    The result also records n_cases, n_folds, folds and the cases' "preset" and
    "connectivity" (None when the dicts lack them; mixing values is an error).
    """
    if not per_fold or any(len(cases) == 0 for cases in per_fold.values()):
        sizes = {fold: len(cases) for fold, cases in per_fold.items()}
        raise ValueError(f"every fold needs at least one case, got fold sizes {sizes}")
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    pooled = [case for cases in per_fold.values() for case in cases]
    rng = np.random.default_rng(seed)
    resamples = rng.integers(0, len(pooled), size=(n_bootstrap, len(pooled)))
    out: dict = {
        "preset": _single_setting(pooled, "preset"),
        "connectivity": _single_setting(pooled, "connectivity"),
        "n_cases": len(pooled),
        "n_folds": len(per_fold),
        "folds": list(per_fold),
        "n_bootstrap": n_bootstrap,
        "seed": seed,
        "metrics": {},
    }
    for metric in metrics:
        fold_means = np.array([_metric_values(cases, metric, fold).mean() for fold, cases in per_fold.items()])
        values = np.concatenate([_metric_values(cases, metric, fold) for fold, cases in per_fold.items()])
        boot_means = values[resamples].mean(axis=1)
        low, high = np.percentile(boot_means, [2.5, 97.5])
        out["metrics"][metric] = {
            "fold_means": fold_means.tolist(),
            "fold_mean": float(fold_means.mean()),
            "fold_std": _std(fold_means),
            "case_mean": float(values.mean()),
            "case_std": _std(values),
            "ci95": [float(low), float(high)],
        }
    return out


def paired_wilcoxon(a: Mapping[str, float], b: Mapping[str, float], min_cases: int = 5) -> dict:
    """Two-sided Wilcoxon signed-rank test of a[case] - b[case] over the cases in both.

    a, b: case id -> metric value for two methods. Returns n (cases in both), n_only_a and
    n_only_b (cases dropped for lack of a pair), statistic and p_value of
    ``scipy.stats.wilcoxon`` (defaults: zero differences are left out of the ranks; the
    statistic is min(W+, W-)), and median_difference (median of a - b over the n cases).
    Raises ValueError when fewer than ``min_cases`` cases are shared or all differences are
    zero (the test is undefined).
    """
    common = sorted(set(a) & set(b))
    if len(common) < min_cases:
        raise ValueError(
            f"paired Wilcoxon needs at least {min_cases} cases present in both, got {len(common)} "
            f"(a has {len(a)}, b has {len(b)})"
        )
    diff = np.array([float(a[c]) - float(b[c]) for c in common])
    if not np.isfinite(diff).all():
        bad = [case for case, d in zip(common, diff) if not np.isfinite(d)]
        raise ValueError(f"non-finite paired values for cases {bad}")
    if not np.any(diff):
        raise ValueError(f"all {len(common)} paired differences are zero; the Wilcoxon test is undefined")
    result = stats.wilcoxon(diff)
    return {
        "n": len(common),
        "n_only_a": len(a) - len(common),
        "n_only_b": len(b) - len(common),
        "statistic": float(result.statistic),
        "p_value": float(result.pvalue),
        "median_difference": float(np.median(diff)),
    }
