"""Statistics over scored cases: spread over folds and seeds, distributions and bootstrap CIs over
distinct cases, paired comparisons with Holm adjustment, volume agreement and lesion detection.

Rows are per-case dicts as :func:`strokeseg.evaluation.engine.evaluate_case` returns them: "seed"
(int, one training run of an arm), "fold" ("fold_<k>" or "ensemble"), "case_id" and the metric
keys of :data:`strokeseg.core.metrics.METRICS`. A case scored by several fold models (and seeds) is
ONE case: its value is the mean over those models, so CIs and ``n_cases`` count distinct cases.
Standard deviations are sample ones (ddof = 1; NaN for fewer than two values); percentiles use
NumPy's linear interpolation; bootstrap intervals are percentile intervals of the resampled mean.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

__all__ = [
    "VOLUME_BINS",
    "MIN_CASES",
    "ZERO_TOLERANCE",
    "sample_std",
    "case_values",
    "bootstrap_indices",
    "bootstrap_ci",
    "distribution",
    "spread",
    "summarize",
    "paired_difference",
    "holm",
    "bland_altman",
    "icc_3_1",
    "volume_agreement",
    "DETECTION_RULE",
    "detection",
]

# Reference-lesion volume bins for detection sensitivity: (name, low ml inclusive, high ml exclusive).
VOLUME_BINS: tuple[tuple[str, float, float], ...] = (("<1 ml", 0.0, 1.0), ("1-10 ml", 1.0, 10.0), (">=10 ml", 10.0, math.inf))
# Fewest cases for a paired comparison, ICC, correlations and limits of agreement.
MIN_CASES = 5
# A paired difference within this fraction of the values' largest magnitude is a tie (zero):
# float noise (5e-17 from summing in another order) is not a difference.
ZERO_TOLERANCE = 1e-12


def sample_std(values: np.ndarray) -> float:
    """Sample standard deviation (ddof=1); NaN for fewer than two values."""
    return float(np.std(values, ddof=1)) if np.size(values) > 1 else float("nan")


def _value(row: Mapping, key: str) -> float:
    value = row.get(key)
    if value is None or not math.isfinite(float(value)):
        where = f"{row.get('fold', '?')}, case {row.get('case_id', '?')}"
        raise ValueError(f"{where}: {key!r} is missing or not finite ({value!r})")
    return float(value)


def case_values(rows: Sequence[Mapping], key: str) -> dict[str, float]:
    """Case id -> mean of ``key`` over that case's rows (fold models, seeds), sorted by case id."""
    collected: dict[str, list[float]] = {}
    for row in rows:
        collected.setdefault(str(row["case_id"]), []).append(_value(row, key))
    return {case: float(np.mean(values)) for case, values in sorted(collected.items())}


def bootstrap_indices(n: int, n_bootstrap: int, seed: int) -> np.ndarray:
    """int64 (n_bootstrap, n): each row a resample of n items with replacement,
    ``np.random.default_rng(seed).integers(0, n, size=(n_bootstrap, n))``."""
    if n < 1 or n_bootstrap < 1:
        raise ValueError(f"bootstrap needs n >= 1 and n_bootstrap >= 1, got {n} and {n_bootstrap}")
    return np.random.default_rng(seed).integers(0, n, size=(n_bootstrap, n))


def bootstrap_ci(values: np.ndarray, indices: np.ndarray) -> list[float]:
    """Percentile bootstrap 95 % interval [2.5th, 97.5th percentile] of the mean of ``values``
    (float (n,)) over the resamples ``indices`` (from :func:`bootstrap_indices`)."""
    low, high = np.percentile(np.asarray(values, dtype=np.float64)[indices].mean(axis=1), [2.5, 97.5])
    return [float(low), float(high)]


def distribution(values: np.ndarray) -> dict:
    """{"median", "iqr": [25th, 75th percentile], "p5_p95": [5th, 95th percentile]} of float (n,)."""
    p5, q25, median, q75, p95 = np.percentile(np.asarray(values, dtype=np.float64), [5, 25, 50, 75, 95])
    return {"median": float(median), "iqr": [float(q25), float(q75)], "p5_p95": [float(p5), float(p95)]}


def spread(model_means: Mapping[tuple[int, str], float]) -> dict:
    """Spread of model means, (seed, fold) -> mean over that model's cases.

    fold_means: in key order; fold_mean: their mean; fold_std: across fold means within a seed
    (one seed: the paper's sample std across the fold means; several: pooled,
    sqrt(mean over seeds of each seed's variance)); seed_means: per seed the mean of its fold
    means; seed_std: sample std across seed means (NaN with one seed).
    """
    by_seed: dict[int, list[float]] = {}
    for (seed, _), mean in model_means.items():
        by_seed.setdefault(seed, []).append(float(mean))
    variances = [np.var(means, ddof=1) for means in by_seed.values() if len(means) > 1]
    seed_means = [float(np.mean(means)) for means in by_seed.values()]
    return {
        "fold_means": [float(m) for m in model_means.values()],
        "fold_mean": float(np.mean(list(model_means.values()))),
        "fold_std": float(np.sqrt(np.mean(variances))) if variances else float("nan"),
        "seed_means": seed_means,
        "seed_std": sample_std(np.array(seed_means)),
    }


def _single_setting(rows: Sequence[Mapping], key: str) -> object:
    found = {row.get(key) for row in rows}
    if len(found) > 1:
        raise ValueError(f"rows mix {key} values {sorted(map(str, found))}; summarize one setting at a time")
    return found.pop()


def summarize(rows: Sequence[Mapping], metrics: Sequence[str], n_bootstrap: int = 10000, seed: int = 0) -> dict:
    """Aggregate per-case rows of one arm (every seed and fold model, or the ensembles).

    Per metric: :func:`spread` over (seed, fold) model means; over DISTINCT cases (value: the
    mean over the models scoring the case) case_mean, case_std, ci95 (:func:`bootstrap_ci`,
    ``n_bootstrap`` resamples of cases seeded by ``seed``, the same resamples for every metric)
    and :func:`distribution`. Also n_cases (distinct), n_rows, folds, seeds, preset, connectivity.
    """
    if not rows:
        raise ValueError("no scored case to summarize")
    cases = sorted({str(row["case_id"]) for row in rows})
    indices = bootstrap_indices(len(cases), n_bootstrap, seed)
    models: dict[tuple[int, str], list[Mapping]] = {}
    for row in rows:
        models.setdefault((int(row.get("seed", 0)), str(row["fold"])), []).append(row)
    models = dict(sorted(models.items(), key=lambda item: (item[0][0], _fold_order(item[0][1]))))
    out: dict = {
        "preset": _single_setting(rows, "preset"),
        "connectivity": _single_setting(rows, "connectivity"),
        "n_cases": len(cases),
        "n_rows": len(rows),
        "folds": sorted({fold for _, fold in models}, key=_fold_order),
        "seeds": sorted({s for s, _ in models}),
        "n_bootstrap": n_bootstrap,
        "seed": seed,
        "metrics": {},
    }
    for metric in metrics:
        values = np.array(list(case_values(rows, metric).values()))
        model_means = {key: float(np.mean([_value(r, metric) for r in group])) for key, group in models.items()}
        out["metrics"][metric] = {
            **spread(model_means),
            "case_mean": float(values.mean()),
            "case_std": sample_std(values),
            "ci95": bootstrap_ci(values, indices),
            **distribution(values),
        }
    return out


def _fold_order(fold: str) -> tuple[int, str]:
    """Sort key: "fold_2" before "fold_10"; other names after, alphabetically."""
    tail = fold.rsplit("_", 1)[-1]
    return (int(tail), fold) if fold.startswith("fold_") and tail.isdigit() else (1 << 30, fold)


def paired_difference(a: Mapping[str, float], b: Mapping[str, float], n_bootstrap: int = 10000, seed: int = 0, min_cases: int = MIN_CASES) -> dict:
    """Paired a[case] - b[case] over the cases in both.

    A difference within :data:`ZERO_TOLERANCE` times the largest |value| of the pairs is a tie,
    set to exactly 0. Returns n, n_only_a, n_only_b; mean_difference with ci95 (bootstrap of
    the mean difference over cases, ``bootstrap_indices(n, n_bootstrap, seed)``);
    median_difference; statistic and p_value of the two-sided ``scipy.stats.wilcoxon`` (zero
    differences dropped; statistic min(W+, W-)), both None with a "note" when every difference
    is zero. Raises ValueError for fewer than ``min_cases`` shared cases or non-finite values.
    """
    common = sorted(set(a) & set(b))
    if len(common) < min_cases:
        raise ValueError(f"a paired comparison needs at least {min_cases} cases present in both, got {len(common)} (a has {len(a)}, b has {len(b)})")
    pairs = np.array([[float(a[c]), float(b[c])] for c in common])
    if not np.isfinite(pairs).all():
        raise ValueError(f"non-finite paired values for cases {[c for c, row in zip(common, pairs) if not np.isfinite(row).all()]}")
    diff = pairs[:, 0] - pairs[:, 1]
    diff[np.abs(diff) <= ZERO_TOLERANCE * np.abs(pairs).max()] = 0.0
    out = {
        "n": len(common),
        "n_only_a": len(a) - len(common),
        "n_only_b": len(b) - len(common),
        "mean_difference": float(diff.mean()),
        "ci95": bootstrap_ci(diff, bootstrap_indices(len(common), n_bootstrap, seed)),
        "median_difference": float(np.median(diff)),
    }
    if not np.any(diff):
        return {**out, "statistic": None, "p_value": None, "note": "all paired differences are zero; the Wilcoxon test is undefined"}
    result = stats.wilcoxon(diff)
    return {**out, "statistic": float(result.statistic), "p_value": float(result.pvalue)}


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm step-down adjusted p-values (same order; None stays None and is not counted):
    the i-th smallest of m p-values becomes max over j <= i of min(1, (m - j + 1) p_(j))."""
    ranked = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(ranked):
        running = max(running, min(1.0, (len(ranked) - rank) * p))
        adjusted[i] = running
    return adjusted


def bland_altman(pred: np.ndarray, ref: np.ndarray) -> dict:
    """Bland-Altman agreement of float (n,) measurements: bias = mean(pred - ref), sd = sample
    std of the differences, loa = 95 % limits of agreement bias ± 1.96 sd."""
    diff = np.asarray(pred, dtype=np.float64) - np.asarray(ref, dtype=np.float64)
    bias, sd = float(diff.mean()), sample_std(diff)
    return {"n": int(diff.size), "bias": bias, "sd": sd, "loa": [bias - 1.96 * sd, bias + 1.96 * sd]}


def icc_3_1(ratings: np.ndarray) -> float:
    """ICC(3,1) of Shrout & Fleiss (1979): two-way mixed, consistency, single rater.

    ratings: float (n targets, k raters). (BMS - EMS) / (BMS + (k - 1) EMS) with BMS the
    between-targets mean square and EMS the residual mean square of the two-way ANOVA. NaN when
    undefined (fewer than 2 targets or raters, or no variance at all).
    """
    x = np.asarray(ratings, dtype=np.float64)
    n, k = x.shape
    if n < 2 or k < 2:
        return float("nan")
    grand = x.mean()
    ss_rows = k * float(((x.mean(axis=1) - grand) ** 2).sum())
    ss_cols = n * float(((x.mean(axis=0) - grand) ** 2).sum())
    ss_error = float(((x - grand) ** 2).sum()) - ss_rows - ss_cols
    bms, ems = ss_rows / (n - 1), ss_error / ((n - 1) * (k - 1))
    denominator = bms + (k - 1) * ems
    return (bms - ems) / denominator if denominator > 0 else float("nan")


def volume_agreement(pred_ml: Mapping[str, float], ref_ml: Mapping[str, float], min_cases: int = MIN_CASES) -> dict:
    """Predicted vs reference lesion volume (ml) per case (cases in both): n; Bland-Altman
    bias_ml, sd_ml (NaN below two cases); and, from ``min_cases`` cases on, loa_ml, icc_3_1
    (prediction and reference as two raters), pearson_r and spearman_r (``scipy.stats``; NaN
    for a constant series). Below ``min_cases`` those four are NaN and "note" says why."""
    cases = sorted(set(pred_ml) & set(ref_ml))
    pred = np.array([pred_ml[c] for c in cases], dtype=np.float64)
    ref = np.array([ref_ml[c] for c in cases], dtype=np.float64)
    nan = float("nan")
    agreement = bland_altman(pred, ref) if cases else {"n": 0, "bias": nan, "sd": nan, "loa": [nan, nan]}
    out = {"n": agreement["n"], "bias_ml": agreement["bias"], "sd_ml": agreement["sd"], "loa_ml": [nan, nan], "icc_3_1": nan, "pearson_r": nan, "spearman_r": nan}
    if len(cases) < min_cases:
        return {**out, "note": f"n < {min_cases}: limits of agreement, ICC and correlations not computed"}
    varies = np.ptp(pred) > 0 and np.ptp(ref) > 0
    return {
        **out,
        "loa_ml": agreement["loa"],
        "icc_3_1": icc_3_1(np.stack([pred, ref], axis=1)),
        "pearson_r": float(stats.pearsonr(pred, ref).statistic) if varies else nan,
        "spearman_r": float(stats.spearmanr(pred, ref).statistic) if varies else nan,
    }


DETECTION_RULE = (
    "per reference lesion, the share of the scoring models (fold models and seeds; the ensemble: one) that detect it; "
    "sensitivity: the mean of those shares over the bin's lesions (a single model's expected sensitivity); "
    "95 % CI: percentile bootstrap over cases"
)


def detection(lesions: Sequence[Mapping], fp_per_case: Mapping[str, float], n_bootstrap: int = 10000, seed: int = 0) -> dict:
    """Lesion-level detection. lesions: per-lesion rows ("case_id", "lesion_id",
    "ref_volume_ml", "detected"), one per reference lesion and scoring model; fp_per_case: case
    id -> false-positive lesions (mean over its models).

    Each lesion counts once, with the share of its rows that detect it (:data:`DETECTION_RULE`).
    Returns {"bins": [{"bin", "n" (distinct lesions), "detected" (sum of shares), "sensitivity"
    (NaN when n = 0), "ci95" (bootstrap over the cases, :func:`bootstrap_indices` with
    ``n_bootstrap``, ``seed``; resamples without a lesion in the bin left out)}] over
    :data:`VOLUME_BINS`, "n_lesions" (distinct), "fp_lesions_per_case" (mean over cases),
    "n_cases", "rule"}.
    """
    shares: dict[tuple[str, int], list[float]] = {}
    volumes: dict[tuple[str, int], float] = {}
    for row in lesions:
        key = (str(row["case_id"]), int(row["lesion_id"]))
        shares.setdefault(key, []).append(float(bool(row["detected"])))
        volumes[key] = float(row["ref_volume_ml"])
    cases = sorted(set(fp_per_case) | {case for case, _ in shares})
    position = {case: i for i, case in enumerate(cases)}
    indices = bootstrap_indices(len(cases), n_bootstrap, seed) if cases else None
    bins = []
    for name, low, high in VOLUME_BINS:
        found, hits = np.zeros(len(cases)), np.zeros(len(cases))
        for key, values in shares.items():
            if low <= volumes[key] < high:
                found[position[key[0]]] += 1
                hits[position[key[0]]] += np.mean(values)
        n, detected = int(found.sum()), float(hits.sum())
        bins.append({"bin": name, "n": n, "detected": detected, "sensitivity": detected / n if n else float("nan"), "ci95": _ratio_ci(hits, found, indices)})
    fps = list(fp_per_case.values())
    return {"bins": bins, "n_lesions": len(shares), "fp_lesions_per_case": float(np.mean(fps)) if fps else float("nan"), "n_cases": len(fps), "rule": DETECTION_RULE}


def _ratio_ci(numerator: np.ndarray, denominator: np.ndarray, indices: np.ndarray | None) -> list[float]:
    """Percentile 95 % interval of sum(numerator) / sum(denominator) (float (n cases,)) over the
    case resamples ``indices``; resamples with a zero denominator are left out; NaNs when none is left."""
    if indices is None or not denominator.any():
        return [float("nan"), float("nan")]
    num, den = numerator[indices].sum(axis=1), denominator[indices].sum(axis=1)
    ratios = num[den > 0] / den[den > 0]
    low, high = np.percentile(ratios, [2.5, 97.5])
    return [float(low), float(high)]
