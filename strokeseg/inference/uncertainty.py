"""Uncertainty from the fold ensemble: the per-voxel standard deviation of the fold
probabilities, and per lesion its mean probability and the fraction of folds that detect it.

The ensemble mask is the mean probability thresholded (computed on the network grid, then
mapped to the native grid, as ``evaluate.py --ensemble`` does). A fold *detects* a lesion of
that mask when the fold's own mask (its probability mapped to the native grid, thresholded at
the same threshold) shares at least one voxel with it.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from ..core.geometry import foreground_bbox
from .fold_models import FoldModel, predict_probability
from .inferer import Inferer
from ..core.metrics import label_components

__all__ = ["STDDEV_SUFFIX", "fold_probabilities", "ensemble_mean", "lesion_labels", "fold_review"]

STDDEV_SUFFIX = "_desc-lesion_stddev.nii.gz"  # BIDS derivative: std of the fold probabilities


def fold_probabilities(inputs: Mapping[str, np.ndarray], fold_models: Sequence[FoldModel], inferer: Inferer) -> list[np.ndarray]:
    """Each fold model's foreground probability by ``inferer``, float32 (X, Y, Z) on the network grid of ``inputs``."""
    return [predict_probability(inputs, fold_model, inferer) for fold_model in fold_models]


def ensemble_mean(folds: Sequence[np.ndarray]) -> np.ndarray:
    """Mean of the fold probabilities, float32, summed in fold order then divided (bit for bit
    what ``evaluate.py --ensemble`` computes)."""
    total = None
    for probability in folds:
        total = probability if total is None else total + probability
    return np.asarray(total / len(folds), dtype=np.float32)


def lesion_labels(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int, tuple[slice, ...]]:
    """Connected lesions of ``mask`` (bool (X, Y, Z)) labelled inside the mask's box: (labels
    int32 over the box, count, box slices). Lesion ids 1..count in labelling order, the ids of
    :func:`strokeseg.inference.prediction.lesion_table`. An empty mask gives count 0 and an
    empty box."""
    if not mask.any():
        return np.zeros((0, 0, 0), dtype=np.int32), 0, (slice(0, 0),) * 3
    box = tuple(slice(int(a), int(b)) for a, b in foreground_bbox(mask, margin=0))
    labels, count = label_components(mask[box], connectivity)
    return labels, count, box


def fold_review(
    folds: Sequence[np.ndarray], to_native: Callable[[np.ndarray], np.ndarray], mask: np.ndarray, mean: np.ndarray,
    threshold: float, connectivity: int, with_stddev: bool,
) -> tuple[list[dict], np.ndarray | None]:
    """Per lesion of ``mask`` (bool, native (X, Y, Z)), in lesion-id order: ``mean_probability``
    (mean of ``mean``, the native ensemble probability, over its voxels) and ``fold_detection``
    (fraction of folds that detect it, module docstring); and, with ``with_stddev``, the
    population standard deviation (ddof=0) of the native fold probabilities, float32 (X, Y, Z),
    else None. folds: network-grid probabilities; to_native maps one to the native grid."""
    labels, count, box = lesion_labels(mask, connectivity)
    if count == 0 and not with_stddev:
        return [], None
    where = np.nonzero(labels)
    ids = labels[where]
    detected = np.zeros(count, dtype=np.float64)
    total = np.zeros(mask.shape, dtype=np.float64) if with_stddev else None
    squares = np.zeros(mask.shape, dtype=np.float64) if with_stddev else None
    for probability in folds:
        native = to_native(probability)
        hits = (native[box][where] >= threshold).astype(np.float64)
        detected += np.bincount(ids, weights=hits, minlength=count + 1)[1:] > 0
        if total is not None:
            total += native
            squares += np.square(native, dtype=np.float64)
    voxels = np.bincount(ids, minlength=count + 1)[1:]
    sums = np.bincount(ids, weights=mean[box][where].astype(np.float64), minlength=count + 1)[1:]
    lesions = [{"mean_probability": float(sums[i] / voxels[i]), "fold_detection": float(detected[i] / len(folds))} for i in range(count)]
    if total is None:
        return lesions, None
    n = len(folds)
    variance = np.maximum(squares / n - np.square(total / n), 0.0)
    return lesions, np.sqrt(variance).astype(np.float32)
