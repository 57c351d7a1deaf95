"""strokeseg.evaluation.statistics: every statistic against hand-computed values, SciPy, a direct NumPy
resampling with the same seed, and the published ICC example of Shrout & Fleiss (1979)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sp

from strokeseg.evaluation import statistics as st

# Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges; their ICC(3,1) = 0.71
# (mean squares BMS 11.24, EMS 1.02: (11.24 - 1.02) / (11.24 + 3 * 1.02) = 0.7147).
SHROUT_FLEISS = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]], dtype=float)


def _rows(values_by_model: dict[tuple[int, str], dict[str, float]], metric: str = "dice") -> list[dict]:
    return [{"seed": s, "fold": f, "case_id": c, metric: v} for (s, f), cases in values_by_model.items() for c, v in cases.items()]


def test_icc_3_1_reproduces_shrout_and_fleiss() -> None:
    icc = st.icc_3_1(SHROUT_FLEISS)
    assert round(icc, 2) == 0.71
    assert icc == pytest.approx((11.24 - 1.02) / (11.24 + 3 * 1.02), abs=1e-3)
    # consistency form: a constant offset between raters does not lower it
    ref = np.array([1.0, 2.0, 4.0, 8.0])
    assert st.icc_3_1(np.stack([ref + 3.0, ref], axis=1)) == pytest.approx(1.0)
    assert math.isnan(st.icc_3_1(np.ones((4, 2))))


def test_bland_altman_and_volume_agreement_by_hand_and_against_scipy() -> None:
    out = st.bland_altman(np.array([2.0, 4.0, 6.0]), np.array([1.0, 2.0, 3.0]))
    # differences 1, 2, 3: bias 2, sample std 1, limits 2 ± 1.96
    assert out == {"n": 3, "bias": 2.0, "sd": 1.0, "loa": [pytest.approx(0.04), pytest.approx(3.96)]}
    pred = {"a": 1.0, "b": 3.5, "c": 2.0, "d": 9.0, "e": 4.0, "only_pred": 7.0}
    ref = {"a": 1.5, "b": 3.0, "c": 2.5, "d": 7.0, "e": 8.0}
    got = st.volume_agreement(pred, ref)
    x, y = np.array([1.0, 3.5, 2.0, 9.0, 4.0]), np.array([1.5, 3.0, 2.5, 7.0, 8.0])
    # differences -0.5, 0.5, -0.5, 2, -4: bias -0.5
    assert got["n"] == 5 and got["bias_ml"] == pytest.approx(-0.5)
    assert got["sd_ml"] == pytest.approx(np.std(x - y, ddof=1)) and got["loa_ml"][1] == pytest.approx(-0.5 + 1.96 * got["sd_ml"])
    assert got["pearson_r"] == pytest.approx(sp.pearsonr(x, y).statistic, abs=1e-12)
    # ranks 1 3 2 5 4 and 1 3 2 4 5: rho = 1 - 6 * (0 + 0 + 0 + 1 + 1) / (5 * 24) = 0.9
    assert got["spearman_r"] == pytest.approx(0.9) == sp.spearmanr(x, y).statistic
    assert got["icc_3_1"] == pytest.approx(st.icc_3_1(np.stack([x, y], axis=1)))
    assert math.isnan(st.volume_agreement({"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 2.0})["pearson_r"])  # < 5 cases


def test_distribution_and_sample_std_by_hand() -> None:
    assert st.distribution(np.array([5.0, 1.0, 3.0, 2.0, 4.0])) == {"median": 3.0, "iqr": [2.0, 4.0], "p5_p95": [pytest.approx(1.2), pytest.approx(4.8)]}
    assert st.sample_std(np.array([1.0, 3.0])) == pytest.approx(math.sqrt(2))
    assert math.isnan(st.sample_std(np.array([1.0])))


def test_ci_and_n_cases_count_distinct_cases_not_fold_rows() -> None:
    # Case A scores 0 and case B 1 under each of 5 fold models. Over 2 distinct cases a resample
    # mean is 0, 0.5 or 1 (probabilities 1/4, 1/2, 1/4), so the 95 % interval is [0, 1]; pooling
    # the 10 (fold, case) rows as cases would give about [0.2, 0.8].
    rows = _rows({(0, f"fold_{k}"): {"A": 0.0, "B": 1.0} for k in range(5)})
    summary = st.summarize(rows, ["dice"], n_bootstrap=2000, seed=0)
    dice = summary["metrics"]["dice"]
    assert (summary["n_cases"], summary["n_rows"]) == (2, 10)
    assert dice["ci95"] == [0.0, 1.0]
    assert dice["case_mean"] == 0.5 and dice["case_std"] == pytest.approx(math.sqrt(0.5))
    pooled = np.tile([0.0, 1.0], 5)[np.random.default_rng(0).integers(0, 10, size=(2000, 10))].mean(axis=1)
    assert np.percentile(pooled, 2.5) >= 0.1  # what the old pooled bootstrap reported


def test_ci_equals_a_direct_numpy_resampling_with_the_same_seed() -> None:
    rng = np.random.default_rng(5)
    per_model = {(0, f"fold_{k}"): {f"c{i}": float(v) for i, v in enumerate(rng.random(7))} for k in range(3)}
    dice = st.summarize(_rows(per_model), ["dice"], n_bootstrap=500, seed=11)["metrics"]["dice"]
    case_means = np.mean([list(cases.values()) for cases in per_model.values()], axis=0)  # c0..c6 sort as listed
    indices = np.random.default_rng(11).integers(0, 7, size=(500, 7))
    expected = np.percentile(case_means[indices].mean(axis=1), [2.5, 97.5])
    np.testing.assert_allclose(dice["ci95"], expected, rtol=0, atol=1e-15)
    assert dice["median"] == pytest.approx(np.median(case_means))


def test_spread_across_folds_and_seeds_by_hand() -> None:
    # seed 0 fold means 0.2, 0.4; seed 1 fold means 0.6, 1.0 (one case each)
    rows = _rows({(0, "fold_0"): {"c": 0.2}, (0, "fold_1"): {"c": 0.4}, (1, "fold_0"): {"c": 0.6}, (1, "fold_1"): {"c": 1.0}})
    dice = st.summarize(rows, ["dice"], n_bootstrap=10)["metrics"]["dice"]
    assert dice["fold_means"] == [0.2, 0.4, 0.6, 1.0] and dice["fold_mean"] == pytest.approx(0.55)
    # within-seed variances 0.02 and 0.08: pooled std sqrt(0.05); seed means 0.3 and 0.8: std sqrt(0.125)
    assert dice["fold_std"] == pytest.approx(math.sqrt(0.05))
    assert dice["seed_means"] == pytest.approx([0.3, 0.8]) and dice["seed_std"] == pytest.approx(math.sqrt(0.125))
    one_seed = st.summarize(rows[:2], ["dice"], n_bootstrap=10)["metrics"]["dice"]
    assert one_seed["fold_std"] == pytest.approx(math.sqrt(0.02)) and math.isnan(one_seed["seed_std"])


def test_summarize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="mix preset"):
        st.summarize([{"fold": "fold_0", "case_id": "a", "dice": 0.1, "preset": "isles22"},
                      {"fold": "fold_1", "case_id": "a", "dice": 0.2, "preset": "atlas22"}], ["dice"])
    with pytest.raises(ValueError, match="case c7: 'lesion_f1'"):
        st.summarize([{"fold": "fold_0", "case_id": "c7", "dice": 0.5}], ["dice", "lesion_f1"])
    with pytest.raises(ValueError, match="no scored case"):
        st.summarize([], ["dice"])


def test_paired_difference_hand_case_scipy_and_bootstrap() -> None:
    # six positive differences 0.5, 1.6, 2.7, 3.8, 4.9, 6.0: W- = 0, exact two-sided p = 2 / 2**6
    a = {f"c{i}": float(i) + 1.0 for i in range(6)} | {"only_a": 0.0}
    b = {f"c{i}": 0.5 - 0.1 * i for i in range(6)}
    out = st.paired_difference(a, b, n_bootstrap=300, seed=2)
    diff = np.array([0.5, 1.6, 2.7, 3.8, 4.9, 6.0])
    assert (out["n"], out["n_only_a"], out["n_only_b"], out["statistic"]) == (6, 1, 0, 0.0)
    assert out["p_value"] == pytest.approx(2 / 64) == sp.wilcoxon(diff).pvalue
    assert out["mean_difference"] == pytest.approx(3.25) and out["median_difference"] == pytest.approx(3.25)
    boot = diff[np.random.default_rng(2).integers(0, 6, size=(300, 6))].mean(axis=1)
    np.testing.assert_allclose(out["ci95"], np.percentile(boot, [2.5, 97.5]), atol=1e-12)
    same = st.paired_difference(b, b)
    assert same["p_value"] is None and "all paired differences are zero" in same["note"] and same["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="got 4"):
        st.paired_difference({f"c{i}": i for i in range(4)}, {f"c{i}": i + 1 for i in range(10)})


def test_holm_by_hand() -> None:
    # sorted 0.01, 0.03, 0.04 of m = 3: 3 * 0.01, max(0.03, 2 * 0.03), max(0.06, 1 * 0.04)
    assert st.holm([0.01, 0.04, 0.03, None]) == [pytest.approx(0.03), pytest.approx(0.06), pytest.approx(0.06), None]
    assert st.holm([0.5, 0.9]) == [1.0, 1.0]
    assert st.holm([]) == []


def test_detection_bins_by_hand() -> None:
    volumes = (0.5, 0.99, 1.0, 9.9, 10.0, 25.0)
    hits = (True, False, True, True, False, False)
    lesions = [{"case_id": case, "lesion_id": i + 1, "ref_volume_ml": v, "detected": d} for i, (case, v, d) in enumerate(zip("aabbcc", volumes, hits))]
    out = st.detection(lesions, {"a": 2.0, "b": 0.0, "c": 1.0}, n_bootstrap=200)
    assert [(b["bin"], b["n"], b["detected"]) for b in out["bins"]] == [("<1 ml", 2, 1), ("1-10 ml", 2, 2), (">=10 ml", 2, 0)]
    assert [b["sensitivity"] for b in out["bins"]] == [0.5, 1.0, 0.0]
    assert out["fp_lesions_per_case"] == 1.0 and (out["n_lesions"], out["n_cases"]) == (6, 3)
    assert out["bins"][1]["ci95"] == [1.0, 1.0] and out["bins"][2]["ci95"] == [0.0, 0.0]
    assert math.isnan(st.detection([], {})["bins"][0]["sensitivity"])


def test_detection_counts_each_lesion_once_over_fold_models_with_a_case_bootstrap_ci() -> None:
    # 5 fold models, 4 cases with one 2 ml lesion each: case i's lesion is found by i + 1 models
    # (c3 by all 5). Pooling the 20 (model, lesion) rows would report (14/20); each lesion once
    # with its share of models: (0.2 + 0.4 + 0.6 + 1.0) / 4 = 0.55 over n = 4 lesions.
    lesions = [{"case_id": f"c{i}", "lesion_id": 1, "ref_volume_ml": 2.0, "detected": k <= i or i == 3} for i in range(4) for k in range(5)]
    out = st.detection(lesions, {f"c{i}": 0.0 for i in range(4)}, n_bootstrap=400, seed=3)
    middle = out["bins"][1]
    assert (middle["n"], out["n_lesions"]) == (4, 4)
    assert middle["detected"] == pytest.approx(2.2) and middle["sensitivity"] == pytest.approx(0.55)
    shares = np.array([0.2, 0.4, 0.6, 1.0])
    boot = shares[np.random.default_rng(3).integers(0, 4, size=(400, 4))].mean(axis=1)
    np.testing.assert_allclose(middle["ci95"], np.percentile(boot, [2.5, 97.5]), atol=1e-12)
    assert "share of the scoring models" in out["rule"]


def test_agreement_statistics_need_five_cases() -> None:
    pred = {c: v for c, v in zip("abcd", (1.0, 2.5, 2.0, 6.0))}
    ref = {c: v for c, v in zip("abcd", (1.5, 2.0, 3.0, 5.0))}
    four = st.volume_agreement(pred, ref)
    assert four["n"] == 4 and four["bias_ml"] == pytest.approx(0.0) and "n < 5" in four["note"]
    assert all(math.isnan(four[key]) for key in ("icc_3_1", "pearson_r", "spearman_r")) and all(math.isnan(v) for v in four["loa_ml"])
    five = st.volume_agreement(pred | {"e": 9.0}, ref | {"e": 8.0})
    assert "note" not in five and five["pearson_r"] == pytest.approx(sp.pearsonr([1, 2.5, 2, 6, 9], [1.5, 2, 3, 5, 8]).statistic)


def test_wilcoxon_counts_float_noise_differences_as_ties() -> None:
    # 0.1 + 0.2 and 0.3 differ by 5.6e-17: a tie, not a difference; the other five are real.
    a = {"c0": 0.1 + 0.2, **{f"c{i}": 0.5 + 0.01 * i for i in range(1, 6)}}
    b = {"c0": 0.3, **{f"c{i}": 0.4 for i in range(1, 6)}}
    assert a["c0"] - b["c0"] != 0.0
    out = st.paired_difference(a, b, n_bootstrap=50)
    real = np.array([a[f"c{i}"] - b[f"c{i}"] for i in range(1, 6)])
    assert out["p_value"] == pytest.approx(sp.wilcoxon(real).pvalue) and out["n"] == 6
    noise = st.paired_difference({f"c{i}": 0.1 + 0.2 for i in range(5)}, {f"c{i}": 0.3 for i in range(5)}, n_bootstrap=50)
    assert noise["p_value"] is None and "all paired differences are zero" in noise["note"]
