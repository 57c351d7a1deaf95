"""Tests of strokeseg.core.metrics: hand-built volumes, empty rules, lesion detection, the isles24
preset against the panoptica package, and the published ISLES'22 values of one real case."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from strokeseg.core.io import load_nifti
from strokeseg.core.metrics import (
    PRESETS,
    case_metrics,
    dice,
    lesion_count_difference,
    lesion_f1,
    match_lesions,
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
    lesions = out.pop("lesions")
    n_ref, n_pred = lesion_count_difference(ref, ref & False, connectivity), lesion_count_difference(pred, pred & False, connectivity)
    assert out == {
        "dice": dice(pred, ref),
        "abs_volume_diff_voxels": voxels,
        "abs_volume_diff_ml": ml,
        "lesion_f1": lesion_f1(pred, ref, connectivity, PRESETS[preset].match_iou),
        "abs_lesion_count_diff": lesion_count_difference(pred, ref, connectivity),
        "precision": np.count_nonzero(pred & ref) / np.count_nonzero(pred),
        "preset": preset,
        "connectivity": connectivity,
        "match_iou": PRESETS[preset].match_iou,
        "ref_volume_ml": pytest.approx(ref.sum() * 0.002),
        "pred_volume_ml": pytest.approx(pred.sum() * 0.002),
        "n_ref_lesions": n_ref,
        "n_pred_lesions": n_pred,
        "fp_lesions": out["fp_lesions"],
    }
    assert len(lesions) == n_ref and sum(lesion["ref_volume_ml"] for lesion in lesions) == pytest.approx(ref.sum() * 0.002)
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


def test_lesion_rows_and_false_positives_by_hand():
    ref = _empty()
    ref[1:3, 1:3, 1:3] = True  # lesion 1: 8 voxels, 2 predicted
    ref[6:9, 6:9, 6:9] = True  # lesion 2: 27 voxels, none predicted
    pred = _empty()
    pred[1:3, 1, 1] = True
    pred[10, 10, 10] = True  # a false positive
    out = case_metrics(pred, ref, 0.5, "isles22")
    assert out["lesions"] == [
        {"lesion_id": 1, "ref_volume_ml": 4.0, "detected": True, "overlap_fraction": 0.25},
        {"lesion_id": 2, "ref_volume_ml": 13.5, "detected": False, "overlap_fraction": 0.0},
    ]
    assert (out["fp_lesions"], out["n_ref_lesions"], out["n_pred_lesions"]) == (1, 2, 2)
    assert (out["ref_volume_ml"], out["pred_volume_ml"]) == (17.5, 1.5)
    # isles24_2024: lesion 1 has IoU 2 / 8 < 0.5 with its predicted component, so it is missed
    # and that component is a false positive too; isles24 (IoU >= 0.2 since 2025-12-16): matched
    strict = case_metrics(pred, ref, 0.5, "isles24_2024")
    assert [lesion["detected"] for lesion in strict["lesions"]] == [False, False]
    assert strict["fp_lesions"] == 2 and strict["lesion_f1"] == 0.0 and strict["match_iou"] == 0.5
    current = case_metrics(pred, ref, 0.5, "isles24")
    assert [lesion["detected"] for lesion in current["lesions"]] == [True, False]
    assert current["fp_lesions"] == 1 and current["lesion_f1"] == pytest.approx(0.5) and current["match_iou"] == 0.2


def test_iou_matching_is_one_to_one():
    ref = _empty()
    ref[2, 2, 2] = ref[2, 2, 4] = True  # two one-voxel lesions
    pred = _empty()
    pred[2, 2, 2:5] = True  # one bar covering both: IoU 1/3 each
    assert lesion_f1(pred, ref, 26, 0.5) == 0.0
    pred2 = _empty()
    pred2[2, 2, 2] = True
    pred2[2, 2, 4:6] = True  # IoU 1 with lesion 1, 1/2 with lesion 2: both matched
    assert lesion_f1(pred2, ref, 26, 0.5) == 1.0
    labels, n = ndimage.label(pred2)
    ref_labels, n_ref = ndimage.label(ref)
    match = match_lesions(labels, n, ref_labels, n_ref, pred2 & ref, 0.5)
    assert match.ref_detected.tolist() == [True, True] and match.pred_matched.tolist() == [True, True]


def _panoptica_counts(pred, ref, threshold=0.5):
    from panoptica import ConnectedComponentsInstanceApproximator, InputType, NaiveThresholdMatching, Panoptica_Evaluator
    from panoptica.utils.constants import CCABackend

    evaluator = Panoptica_Evaluator(
        expected_input=InputType.SEMANTIC,
        instance_approximator=ConnectedComponentsInstanceApproximator(cca_backend=CCABackend.cc3d),  # 26-connectivity
        instance_matcher=NaiveThresholdMatching(matching_threshold=threshold),
        verbose=False,
    )
    result = evaluator.evaluate(pred.astype(np.uint8), ref.astype(np.uint8), verbose=False)["ungrouped"]
    return result.tp, result.fp, result.fn, result.rq


def _edge_cases():
    empty, lesion = _empty(), _empty()
    lesion[2:5, 2:5, 2:5] = True
    touching = _empty()  # two lesions touching at an edge: one 26-connected component
    touching[1:4, 1:4, 1:4] = True
    touching[4:7, 4:7, 1:4] = True
    half = _empty()
    half[1:4, 1:4, 1:4] = True
    return {"empty ref": (lesion, empty), "empty pred": (empty, lesion), "touching ref": (half, touching), "touching pred": (touching, half)}


@pytest.mark.parametrize("name", ["random 0", "random 1", "random 2", "empty ref", "empty pred", "touching ref", "touching pred"])
def test_isles24_lesion_f1_equals_panoptica(name):
    if name.startswith("random"):
        rng = np.random.default_rng(int(name[-1]))
        ref = ndimage.binary_dilation(rng.random((20, 18, 16)) > 0.985, iterations=2)
        pred = ndimage.binary_dilation(ref & (rng.random(ref.shape) > 0.3), iterations=1) | (rng.random(ref.shape) > 0.995)
    else:
        pred, ref = _edge_cases()[name]
    tp, fp, fn, rq = _panoptica_counts(pred, ref, 0.5)
    out = case_metrics(pred, ref, 1.0, "isles24_2024")
    assert (sum(lesion["detected"] for lesion in out["lesions"]), out["fp_lesions"], out["n_ref_lesions"] - tp) == (tp, fp, fn)
    assert out["lesion_f1"] == pytest.approx(rq, abs=1e-12)
    if name.startswith("random"):
        assert tp > 0 and fp + fn > 0  # a case that discriminates


def test_isles24_both_empty_is_one_where_panoptica_is_undefined():
    tp, fp, fn, rq = _panoptica_counts(_empty(), _empty())
    assert (tp, fp, fn) == (0, 0, 0) and math.isnan(rq)
    assert case_metrics(_empty(), _empty(), 1.0, "isles24")["lesion_f1"] == 1.0  # our empty rule (and the organisers')


def _organisers_isles24(ground_truth: np.ndarray, prediction: np.ndarray, threshold: float) -> tuple[float, int, float]:
    """(lesion F1, lesion count difference, Dice) by the ISLES'24 organisers' rules
    (ezequieldlrosa/isles24 utils/eval_utils.py, compute_dice_f1_instance_difference): panoptica
    with its default connected components and NaiveThresholdMatching at ``threshold``; F1 its
    recognition quality, Dice its global binary Dice, both 1.0 when neither mask has a lesion."""
    from panoptica import ConnectedComponentsInstanceApproximator, InputType, NaiveThresholdMatching, Panoptica_Evaluator

    evaluator = Panoptica_Evaluator(expected_input=InputType.SEMANTIC, instance_approximator=ConnectedComponentsInstanceApproximator(),
                                    instance_matcher=NaiveThresholdMatching(matching_threshold=threshold))
    result = evaluator.evaluate(prediction.astype(int), ground_truth.astype(int), verbose=False)["ungrouped"]
    result = result[0] if isinstance(result, tuple) else result  # older panoptica: (result, debug data)
    n_ref, n_pred = result.n_ref_instances, result.n_pred_instances  # num_*_instances in their older panoptica
    count = abs(n_ref - n_pred)
    if n_ref == 0 and n_pred == 0:
        return 1.0, count, 1.0
    return result.rq, count, result.global_bin_dsc


def _multi_lesion_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A reference with several blob lesions and a prediction that grows, shrinks, shifts, drops
    and adds lesions, so IoUs spread over (0, 1) and both the 0.2 and 0.5 rules are exercised."""
    shape = (18, 16, 14)
    ref = ndimage.binary_dilation(rng.random(shape) > 0.992, iterations=int(rng.integers(1, 3)))
    moved = np.roll(ref, tuple(rng.integers(-2, 3, 3)), axis=(0, 1, 2)) if rng.random() < 0.5 else ref
    pred = ndimage.binary_dilation(moved & (rng.random(shape) > rng.uniform(0.2, 0.8)), iterations=int(rng.integers(0, 2)) or 1)
    return pred | (rng.random(shape) > 0.997), ref


@pytest.mark.parametrize("preset", ["isles24", "isles24_2024"])
def test_isles24_presets_equal_the_organisers_evaluation_on_random_multi_lesion_pairs(preset):
    threshold = PRESETS[preset].match_iou
    assert threshold == {"isles24": 0.2, "isles24_2024": 0.5}[preset]
    rng = np.random.default_rng(24)
    differs_from_other_rule = 0
    for _ in range(40):
        pred, ref = _multi_lesion_pair(rng)
        f1, count, dsc = _organisers_isles24(ref, pred, threshold)
        out = case_metrics(pred, ref, 1.0, preset)
        assert (out["lesion_f1"], out["abs_lesion_count_diff"], out["dice"]) == (pytest.approx(f1, abs=1e-12), count, pytest.approx(dsc, abs=1e-12))
        other = "isles24_2024" if preset == "isles24" else "isles24"
        differs_from_other_rule += case_metrics(pred, ref, 1.0, other)["lesion_f1"] != pytest.approx(f1, abs=1e-12)
    assert differs_from_other_rule >= 5  # the pairs tell the two rules apart
