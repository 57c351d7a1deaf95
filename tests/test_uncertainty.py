"""strokeseg.inference.uncertainty and predict.py --save-uncertainty: the std of the fold
probabilities, each lesion's mean probability and the fraction of folds detecting it (issue 24, item 6)."""
from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

import predict
from strokeseg.inference.uncertainty import ensemble_mean, fold_review


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _voxels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def test_fold_review_hand_computed() -> None:
    # two lesions (6-connected): A at x 1-2, B at x 6; three folds
    mask = np.zeros((9, 3, 3), dtype=bool)
    mask[1:3, 1, 1] = True
    mask[6, 1, 1] = True
    folds = [np.zeros(mask.shape, dtype=np.float32) for _ in range(3)]
    folds[0][1, 1, 1], folds[0][2, 1, 1], folds[0][6, 1, 1] = 0.9, 0.7, 0.6  # fold 0 detects A and B
    folds[1][2, 1, 1] = 0.5  # fold 1 touches A at one voxel (>= threshold): detects A
    folds[2][6, 1, 1] = 0.49  # below threshold: fold 2 detects nothing
    mean = ensemble_mean(folds)
    lesions, stddev = fold_review(folds, lambda p: p, mask, mean, 0.5, 6, with_stddev=True)
    assert lesions[0]["mean_probability"] == pytest.approx(((0.9 + 0.7 + 0.5) / 3) / 2, abs=1e-6)
    assert lesions[0]["fold_detection"] == pytest.approx(2 / 3)
    assert lesions[1]["mean_probability"] == pytest.approx((0.6 + 0.49) / 3, abs=1e-6)
    assert lesions[1]["fold_detection"] == pytest.approx(1 / 3)
    np.testing.assert_allclose(stddev, np.std(np.stack(folds), axis=0), atol=1e-6)
    assert stddev.dtype == np.float32 and stddev.shape == mask.shape
    assert fold_review(folds, lambda p: p, np.zeros_like(mask), mean, 0.5, 6, with_stddev=False) == ([], None)


def test_predict_save_uncertainty_against_single_fold_runs(synthetic_isles_b: Path, tmp_path: Path) -> None:
    from test_predict import ISLES_SHAPE, _run_dir  # tiny untrained fold models

    run = _run_dir(tmp_path / "run", "ISLES2022", ["dwi", "adc"], ISLES_SHAPE, {"target_shape": [ISLES_SHAPE] * 3, "margin": 4})
    stem = synthetic_isles_b / "rawdata" / "sub-strokecase0001" / "ses-0001" / "sub-strokecase0001_ses-0001"
    files = ["--dwi", f"{stem}_dwi.nii.gz", "--adc", f"{stem}_adc.nii.gz", "--run", str(run), "--precision", "fp32"]
    assert predict.main([*files, "--output-dir", str(tmp_path / "both"), "--save-uncertainty"]) == 0
    singles = []
    for fold in (0, 1):
        out = tmp_path / f"fold{fold}"
        assert predict.main([*files, "--folds", str(fold), "--output-dir", str(out), "--save-probabilities"]) == 0
        singles.append(_voxels(out / "sub-strokecase0001_ses-0001_desc-lesion_probseg.nii.gz").astype(np.float64))
    both = tmp_path / "both"
    stddev = _voxels(both / "sub-strokecase0001_ses-0001_desc-lesion_stddev.nii.gz")
    assert stddev.dtype == np.float32 and stddev.max() > 0
    np.testing.assert_allclose(stddev, np.abs(singles[0] - singles[1]) / 2, atol=1e-6)  # std of two values
    mask = _voxels(both / "sub-strokecase0001_ses-0001_desc-lesion_mask.nii.gz").astype(bool)
    labels, count = ndimage.label(mask, np.ones((3, 3, 3)))  # ISLES preset: 26-connected, labelled in the same order
    rows = _csv(both / "lesions.csv")
    assert count > 0 and len(rows) == count
    for row in rows:
        lesion = labels == int(row["lesion_id"])
        detecting = sum(bool((single[lesion] >= 0.5).any()) for single in singles)
        assert float(row["fold_detection"]) == pytest.approx(detecting / 2)
        assert 0.5 <= float(row["mean_probability"]) <= 1.0
        assert float(row["mean_probability"]) == pytest.approx(np.mean((singles[0][lesion] + singles[1][lesion]) / 2), abs=1e-5)
