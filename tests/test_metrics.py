"""Tests of strokeseg.metrics: hand-built volumes, empty rules, aggregation, paired tests and the
published ISLES'22 values of one real case."""
from __future__ import annotations

import math

import numpy as np
import pytest

from strokeseg.io import load_nifti
from strokeseg.metrics import (
    PRESETS,
    case_metrics,
    dice,
    lesion_count_difference,
    lesion_f1,
    paired_wilcoxon,
    summarize,
    volume_difference,
)

def _empty(shape=(12, 12, 12)) -> np.ndarray:
    return np.zeros(shape, dtype=bool)


def _two_cubes_touching_at_a_corner() -> tuple[np.ndarray, np.ndarray]:
    """(cube A alone, A ∪ B): 2x2x2 cubes A and B that share only a corner point."""
    a = _empty()
    a[1:3, 1:3, 1:3] = True
    both = a.copy()
    both[3:5, 3:5, 3:5] = True
    return a, both


def test_corner_touching_cubes_are_two_lesions_with_6_and_one_with_26():
    pred, ref = _two_cubes_touching_at_a_corner()
    assert dice(pred, ref) == pytest.approx(2 * 8 / (8 + 16))
    # 6-connectivity: ref has lesions A and B; A is hit (TP), B is missed (FN)
    assert lesion_count_difference(pred, ref, 6) == 1
    assert lesion_f1(pred, ref, 6) == pytest.approx(1 / (1 + 0.5))
    # 26-connectivity: A ∪ B is one lesion, hit by the prediction
    assert lesion_count_difference(pred, ref, 26) == 0
    assert lesion_f1(pred, ref, 26) == 1.0


def test_far_false_positive_lesion():
    ref = _empty()
    ref[1:3, 1:3, 1:3] = True
    pred = ref.copy()
    pred[9, 9, 6:9] = True  # a 3-voxel line touching no reference voxel
    assert dice(pred, ref) == pytest.approx(16 / 19)
    for connectivity in (6, 26):
        assert lesion_f1(pred, ref, connectivity) == pytest.approx(1 / (1 + 0.5))  # TP 1, FP 1
        assert lesion_count_difference(pred, ref, connectivity) == 1
    assert volume_difference(pred, ref, 1.0) == (3, 3.0)


def test_one_predicted_component_hitting_two_lesions_and_a_one_voxel_hit():
    ref = _empty()
    ref[1:3, 1:3, 1:3] = True
    ref[1:3, 6:8, 1:3] = True
    ref[8:11, 8:11, 8:11] = True
    pred = _empty()
    pred[1, 1:8, 1] = True  # a bar joining the first two lesions
    pred[10, 10, 10] = True  # one voxel of the third lesion
    # TP 3, FP 0, FN 0 although the prediction has 2 components and the reference 3
    assert lesion_f1(pred, ref, 6) == 1.0
    assert lesion_count_difference(pred, ref, 6) == 1
    assert dice(pred, ref) == pytest.approx(2 * (4 + 1) / ((7 + 1) + (8 + 8 + 27)))


def test_empty_prediction_and_empty_reference():
    empty, lesion = _empty(), _empty()
    lesion[4:6, 4:6, 4:6] = True
    lesion[9, 9, 9] = True
    assert dice(empty, empty) == 1.0
    assert volume_difference(empty, empty, 0.008) == (0, 0.0)
    for connectivity in (6, 26):
        assert lesion_f1(empty, empty, connectivity) == 1.0
        assert lesion_count_difference(empty, empty, connectivity) == 0
        # only one empty: F1 0 either way, count difference = the other's components
        assert lesion_f1(empty, lesion, connectivity) == 0.0
        assert lesion_f1(lesion, empty, connectivity) == 0.0
        assert lesion_count_difference(empty, lesion, connectivity) == 2
    assert dice(empty, lesion) == 0.0 and dice(lesion, empty) == 0.0
    assert volume_difference(empty, lesion, 1.0) == (9, 9.0)


def test_volume_in_ml_with_non_unit_zooms():
    pred, ref = _two_cubes_touching_at_a_corner()
    zooms_mm = (0.5, 2.0, 3.0)  # 3 mm³ per voxel = 0.003 ml
    voxels, ml = volume_difference(pred, ref, float(np.prod(zooms_mm)) / 1000)
    assert voxels == 8
    assert ml == pytest.approx(0.024)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_case_metrics_agree_with_single_metrics(preset):
    rng = np.random.default_rng(0)
    pred, ref = rng.random((2, 14, 15, 13)) > 0.8
    connectivity = PRESETS[preset].connectivity
    out = case_metrics(pred, ref, 0.002, preset)
    voxels, ml = volume_difference(pred, ref, 0.002)
    assert out == {
        "dice": dice(pred, ref),
        "abs_volume_diff_voxels": voxels,
        "abs_volume_diff_ml": ml,
        "lesion_f1": lesion_f1(pred, ref, connectivity),
        "abs_lesion_count_diff": lesion_count_difference(pred, ref, connectivity),
        "preset": preset,
        "connectivity": connectivity,
    }
    assert case_metrics(_empty(), _empty(), 1.0, preset)["lesion_f1"] == 1.0


def test_bad_inputs_raise():
    mask = _empty()
    with pytest.raises(ValueError, match="boolean"):
        dice(mask.astype(np.uint8), mask)
    with pytest.raises(ValueError, match="differs"):
        dice(mask, _empty((12, 12, 11)))
    with pytest.raises(ValueError, match="connectivity"):
        lesion_f1(mask, mask, 18)
    with pytest.raises(ValueError, match="preset"):
        case_metrics(mask, mask, 1.0, "brats")
    with pytest.raises(ValueError, match="voxel_volume_ml"):
        volume_difference(mask, mask, 0.0)


def test_isles22_sample_reproduces_published_values(isles_sample_dir):
    dwi_path = isles_sample_dir / "rawdata/sub-strokecase0009/ses-0001/sub-strokecase0009_ses-0001_dwi.nii.gz"
    mask_path = isles_sample_dir / "derivatives/sub-strokecase0009/ses-0001/sub-strokecase0009_ses-0001_msk.nii.gz"
    dwi, mask = load_nifti(dwi_path), load_nifti(mask_path)
    assert set(np.unique(mask.data)) <= {0.0, 1.0}
    # Organisers' rule: voxels above the 99th percentile (linear interpolation) of non-zero DWI.
    pred = dwi.data > np.percentile(dwi.data[dwi.data != 0], 99)
    out = case_metrics(pred, mask.data > 0, float(np.prod(dwi.zooms)) / 1000, "isles22")
    assert out["dice"] == pytest.approx(0.1738013698630137, abs=1e-12)
    assert round(out["abs_volume_diff_ml"], 2) == 10.32
    assert out["abs_lesion_count_diff"] == 87
    assert out["lesion_f1"] == pytest.approx(0.24793388429752067, abs=1e-12)


def _cases(values, **extra):
    return [{"dice": v, **extra} for v in values]


def test_summarize_fold_and_case_statistics_by_hand():
    per_fold = {"f0": _cases([0.2, 0.4]), "f1": _cases([0.6]), "f2": _cases([0.5, 0.7, 0.9])}
    summary = summarize(per_fold, metrics=("dice",), n_bootstrap=2000, seed=1)
    d = summary["metrics"]["dice"]
    np.testing.assert_allclose(d["fold_means"], [0.3, 0.6, 0.7])
    assert d["fold_mean"] == pytest.approx(1.6 / 3)
    # fold means deviate by -7/30, 2/30, 5/30 from 16/30: sample variance (49+4+25)/900/2
    assert d["fold_std"] == pytest.approx(math.sqrt(78 / 1800))
    assert d["case_mean"] == pytest.approx(0.55)
    assert d["case_std"] == pytest.approx(math.sqrt(0.295 / 5))
    low, high = d["ci95"]
    assert 0.2 <= low < 0.55 < high <= 0.9
    assert (summary["n_cases"], summary["n_folds"], summary["folds"]) == (6, 3, ["f0", "f1", "f2"])
    assert summary["preset"] is None and summary["connectivity"] is None


def test_summarize_bootstrap_is_seeded_and_has_the_expected_width():
    values = np.random.default_rng(0).standard_normal(400)
    per_fold = {"all": _cases(values, preset="atlas22", connectivity=6)}
    first = summarize(per_fold, metrics=("dice",), seed=3)
    again = summarize(per_fold, metrics=("dice",), seed=3)
    other = summarize(per_fold, metrics=("dice",), seed=4)
    ci = first["metrics"]["dice"]["ci95"]
    assert ci == again["metrics"]["dice"]["ci95"] and ci != other["metrics"]["dice"]["ci95"]
    assert ci[0] < values.mean() < ci[1]
    # the percentile interval of a mean is about ±1.96 standard errors
    assert ci[1] - ci[0] == pytest.approx(2 * 1.96 * values.std(ddof=1) / math.sqrt(400), rel=0.1)
    assert math.isnan(first["metrics"]["dice"]["fold_std"])  # one fold: undefined
    assert (first["preset"], first["connectivity"]) == ("atlas22", 6)


def test_summarize_rejects_bad_input():
    with pytest.raises(ValueError, match="mix preset"):
        summarize({"a": _cases([0.1], preset="isles22"), "b": _cases([0.2], preset="atlas22")}, metrics=("dice",))
    with pytest.raises(ValueError, match="case c7.*lesion_f1"):
        summarize({"a": [{"case_id": "c7", "dice": 0.5}]}, metrics=("dice", "lesion_f1"))
    with pytest.raises(ValueError, match="at least one case"):
        summarize({"a": _cases([0.1]), "b": []}, metrics=("dice",))


def test_paired_wilcoxon_hand_case_and_clear_shift():
    # six positive differences: W- = 0, exact two-sided p = 2 / 2**6
    a = {f"c{i}": float(i) + 1.0 for i in range(6)}
    b = {f"c{i}": 0.5 - 0.1 * i for i in range(6)}
    out = paired_wilcoxon(a, b)
    assert (out["n"], out["statistic"]) == (6, 0.0)
    assert out["p_value"] == pytest.approx(2 / 64)
    rng = np.random.default_rng(0)
    base = rng.random(30)
    shifted = {f"s{i}": v + 0.1 + 0.01 * rng.standard_normal() for i, v in enumerate(base)}
    plain = {f"s{i}": v for i, v in enumerate(base)} | {"only_b": 0.3}
    out = paired_wilcoxon(shifted, plain)
    assert out["p_value"] < 1e-5 and out["median_difference"] == pytest.approx(0.1, abs=0.01)
    assert (out["n"], out["n_only_a"], out["n_only_b"]) == (30, 0, 1)


def test_paired_wilcoxon_rejects_too_few_or_degenerate_pairs():
    with pytest.raises(ValueError, match="got 0"):
        paired_wilcoxon({"a": 1.0}, {"b": 1.0})
    with pytest.raises(ValueError, match="got 4"):
        paired_wilcoxon({f"c{i}": i for i in range(4)}, {f"c{i}": i + 1 for i in range(10)})
    with pytest.raises(ValueError, match="zero"):
        paired_wilcoxon({f"c{i}": i for i in range(6)}, {f"c{i}": i for i in range(6)})
