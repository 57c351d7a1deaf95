"""Whole-volume segmentation metrics per case and lesion-level matching.

Every metric takes a prediction P and a reference G as boolean arrays of one shape (X, Y, Z).
Lesions are connected components under 6-connectivity (faces, ATLAS'22) or 26-connectivity
(faces, edges and corners, ISLES'22 and '24); :data:`PRESETS` names the challenge conventions.

A metric is one :class:`Metric` entry of :data:`METRICS`: its function, direction, empty-case
rule, format and role (primary or secondary, column of the paper's table); :func:`case_metrics`,
the CSV columns, summaries, tables and comparisons all iterate that registry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage

__all__ = [
    "Preset",
    "PRESETS",
    "MetricInputs",
    "Metric",
    "METRICS",
    "label_components",
    "dice",
    "volume_difference",
    "lesion_f1",
    "lesion_count_difference",
    "LesionMatch",
    "match_lesions",
    "case_metrics",
]


@dataclass(frozen=True)
class Preset:
    """A challenge's lesion conventions.

    connectivity: 6 (faces) or 26 (faces, edges, corners) for connected components.
    volume_unit: "ml" or "voxels", the unit the challenge reports volume differences in
    (:func:`case_metrics` returns both; this says which one to put in tables).
    match_iou: None: a reference lesion is detected when one of its voxels is predicted
    (ISLES'22, ATLAS'22); a number: only when matched one-to-one to a predicted component at
    IoU >= match_iou (ISLES'24, panoptica's ``NaiveThresholdMatching(matching_threshold=...)``
    after ``ConnectedComponentsInstanceApproximator()``; lesion F1 is its recognition quality,
    1 when both masks are empty, as the organisers' ``utils/eval_utils.py``).
    """

    connectivity: int
    volume_unit: str
    match_iou: float | None = None

    @property
    def volume_metric(self) -> str:
        """The key in :data:`METRICS` of the volume difference in this preset's unit."""
        return f"abs_volume_diff_{self.volume_unit}"

    @property
    def table_metrics(self) -> tuple[str, ...]:
        """Keys of the primary :data:`METRICS` in this preset's volume unit (and the unitless
        ones): the paper's metrics, one Holm family in comparisons."""
        return tuple(key for key in self.report_metrics if METRICS[key].primary)

    @property
    def report_metrics(self) -> tuple[str, ...]:
        """Keys of every :data:`METRICS` entry, primary and secondary, in this preset's volume
        unit (and the unitless ones), in registry order: the extended tables and comparisons."""
        return tuple(key for key, metric in METRICS.items() if metric.unit in ("", self.volume_unit))


PRESETS: dict[str, Preset] = {
    "isles22": Preset(connectivity=26, volume_unit="ml"),
    "atlas22": Preset(connectivity=6, volume_unit="voxels"),
    # The ISLES'24 organisers' current rule (ezequieldlrosa/isles24 utils/eval_utils.py since
    # 2025-12-16: NaiveThresholdMatching(matching_threshold=0.2)) and their 2024 one (panoptica's default 0.5).
    "isles24": Preset(connectivity=26, volume_unit="ml", match_iou=0.2),
    "isles24_2024": Preset(connectivity=26, volume_unit="ml", match_iou=0.5),
}


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


@dataclass(frozen=True)
class LesionMatch:
    """Which lesions of a case match. ref_detected: bool (n_ref,), reference lesion i + 1
    detected; pred_matched: bool (n_pred,), predicted component j + 1 counted as a hit (not a
    false positive); ref_sizes: int64 (n_ref,) voxels per reference lesion; ref_overlap: int64
    (n_ref,) voxels of each reference lesion that are predicted."""

    ref_detected: np.ndarray
    pred_matched: np.ndarray
    ref_sizes: np.ndarray
    ref_overlap: np.ndarray

    @property
    def f1(self) -> float:
        """TP / (TP + (FP + FN) / 2): TP detected reference lesions, FN the others, FP unmatched
        predicted components; 1.0 when both masks have no lesion."""
        n_ref, n_pred = self.ref_detected.size, self.pred_matched.size
        if n_ref == 0 and n_pred == 0:
            return 1.0
        tp = int(self.ref_detected.sum())
        return tp / (tp + (n_pred - int(self.pred_matched.sum()) + n_ref - tp) / 2.0)


def _one_to_one(ref_ids: np.ndarray, pred_ids: np.ndarray, iou: np.ndarray, threshold: float, n_ref: int, n_pred: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy one-to-one matching of overlapping (ref, pred) pairs (1-based ids) by IoU,
    highest first, pairs with IoU >= threshold only. Ties go to the lower pred id, then the
    lower ref id: panoptica's order (a stable sort of its pairs listed by pred, then ref id), so
    with components numbered alike (C-ordered arrays: SciPy's and cc3d's labels agree) the
    matches are panoptica's."""
    ref_done, pred_done = np.zeros(n_ref + 1, bool), np.zeros(n_pred + 1, bool)
    for k in np.lexsort((ref_ids, pred_ids, -iou)):
        if iou[k] >= threshold and not ref_done[ref_ids[k]] and not pred_done[pred_ids[k]]:
            ref_done[ref_ids[k]] = pred_done[pred_ids[k]] = True
    return ref_done[1:], pred_done[1:]


def match_lesions(
    pred_labels: np.ndarray, n_pred: int, ref_labels: np.ndarray, n_ref: int, overlap: np.ndarray, match_iou: float | None
) -> LesionMatch:
    """Match component labels (int (X, Y, Z), 0 background) of P and G; overlap: bool P ∩ G.

    match_iou None: a reference lesion is detected and a predicted component matched when one
    of its voxels lies in P ∩ G (many-to-many). A number: pairs with IoU >= match_iou are
    matched one-to-one by :func:`_one_to_one` (panoptica's NaiveThresholdMatching).
    """
    ref_sizes = np.bincount(ref_labels[ref_labels > 0], minlength=n_ref + 1)[1:].astype(np.int64)
    ref_in, pred_in = ref_labels[overlap], pred_labels[overlap]
    ref_overlap = np.bincount(ref_in, minlength=n_ref + 1)[1:].astype(np.int64)
    if match_iou is None:
        pred_matched = np.bincount(pred_in, minlength=n_pred + 1)[1:] > 0
        return LesionMatch(ref_overlap > 0, pred_matched, ref_sizes, ref_overlap)
    pairs, inter = np.unique(ref_in.astype(np.int64) * (n_pred + 1) + pred_in, return_counts=True)
    ref_ids, pred_ids = pairs // (n_pred + 1), pairs % (n_pred + 1)
    pred_sizes = np.bincount(pred_labels[pred_labels > 0], minlength=n_pred + 1)
    iou = inter / (ref_sizes[ref_ids - 1] + pred_sizes[pred_ids] - inter)
    detected, pred_matched = _one_to_one(ref_ids, pred_ids, iou, match_iou, n_ref, n_pred)
    return LesionMatch(detected, pred_matched, ref_sizes, ref_overlap)


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


def lesion_f1(pred: np.ndarray, ref: np.ndarray, connectivity: int, match_iou: float | None = None) -> float:
    """Lesion-wise F1 = TP / (TP + (FP + FN) / 2) over connected components.

    match_iou None: a reference component is TP if any of its voxels is predicted, else FN; a
    predicted component touching no reference voxel is FP. A number: TP are the pairs matched
    one-to-one at IoU >= match_iou, FN and FP the unmatched components (ISLES'24).
    connectivity: 6 or 26. Both empty: 1.0. Only one empty: 0.0 (all FP or all FN).
    """
    _check_pair(pred, ref)
    pred_labels, n_pred = label_components(pred, connectivity)
    ref_labels, n_ref = label_components(ref, connectivity)
    return match_lesions(pred_labels, n_pred, ref_labels, n_ref, pred & ref, match_iou).f1


def lesion_count_difference(pred: np.ndarray, ref: np.ndarray, connectivity: int) -> int:
    """Absolute lesion count difference |#components(P) - #components(G)|; connectivity 6 or 26.

    Both empty: 0. Only one empty: the other's component count.
    """
    _check_pair(pred, ref)
    return abs(label_components(pred, connectivity)[1] - label_components(ref, connectivity)[1])


@dataclass(frozen=True, eq=False)
class MetricInputs:
    """What a :class:`Metric` computes from, counted once per case by :func:`case_metrics`.

    pred, ref: bool (X, Y, Z), the prediction P and the reference G; voxel_volume_ml: ml per
    voxel; preset: the challenge's conventions; n_pred, n_ref, n_overlap: voxels in P, G and
    P ∩ G (true-positive voxels); match: the lesions of P and G matched by the preset's rule.
    """

    pred: np.ndarray
    ref: np.ndarray
    voxel_volume_ml: float
    preset: Preset
    n_pred: int
    n_ref: int
    n_overlap: int
    match: LesionMatch

    @property
    def n_pred_lesions(self) -> int:
        """Connected components of P under the preset's connectivity."""
        return int(self.match.pred_matched.size)

    @property
    def n_ref_lesions(self) -> int:
        """Connected components of G under the preset's connectivity."""
        return int(self.match.ref_detected.size)


@dataclass(frozen=True)
class Metric:
    """One per-case metric: the single entry from which :func:`case_metrics`, the CSV columns,
    summaries, tables and comparisons derive.

    key: column in per_case.csv and key in summaries; label: table header; unit: "" when
    unitless, else appended to the header ("Vol Diff (ml)"), and a preset's tables show the
    unitless metrics and those in its volume unit; decimals: digits in tables;
    higher_is_better: the direction of a better score (comparison tables, "favours");
    compute: :class:`MetricInputs` -> value, called unless an empty rule below applies;
    both_empty / pred_empty / ref_empty: the value when P and G are both empty / only P is
    empty / only G is empty (None: ``compute``'s value, whose docstring states it);
    primary: one of the paper's metrics (Holm family of comparisons); secondary ones reach
    the CSVs, summaries and extended tables and are corrected in their own family;
    paper_column: position in the paper's ATLAS/UOA table (None: not one of its columns);
    paper_header: its header there when it differs from :attr:`header`.
    """

    key: str
    label: str
    unit: str
    decimals: int
    higher_is_better: bool
    compute: Callable[[MetricInputs], float]
    both_empty: float | None = None
    pred_empty: float | None = None
    ref_empty: float | None = None
    primary: bool = False
    paper_column: int | None = None
    paper_header: str = ""

    @property
    def header(self) -> str:
        return f"{self.label} ({self.unit})" if self.unit else self.label

    def value(self, inputs: MetricInputs) -> float:
        """The metric of one case: the empty rule when P and/or G are empty and it names a value, else ``compute``."""
        rule = {(True, True): self.both_empty, (True, False): self.pred_empty, (False, True): self.ref_empty}.get((inputs.n_pred == 0, inputs.n_ref == 0))
        return rule if rule is not None else self.compute(inputs)


def _dice(inputs: MetricInputs) -> float:
    """2|P∩G| / (|P|+|G|); 0.0 when only one of P and G is empty."""
    return _dice_from_counts(inputs.n_overlap, inputs.n_pred, inputs.n_ref)


def _volume_voxels(inputs: MetricInputs) -> int:
    """| |P| - |G| | in voxels: 0 when both are empty, the other's volume when one is."""
    return abs(inputs.n_pred - inputs.n_ref)


def _volume_ml(inputs: MetricInputs) -> float:
    """| |P| - |G| | in ml: 0.0 when both are empty, the other's volume when one is."""
    return abs(inputs.n_pred - inputs.n_ref) * float(inputs.voxel_volume_ml)


def _lesion_f1(inputs: MetricInputs) -> float:
    """:attr:`LesionMatch.f1` under the preset's matching rule; 0.0 when only one is empty."""
    return inputs.match.f1


def _lesion_count(inputs: MetricInputs) -> int:
    """|#components(P) - #components(G)|: 0 when both are empty, the other's count when one is."""
    return abs(inputs.n_pred_lesions - inputs.n_ref_lesions)


def _voxel_precision(inputs: MetricInputs) -> float:
    """TP / (TP + FP) over voxels: |P∩G| / |P|; 0.0 when G is empty and P is not (all false
    positives). P empty: by the entry's rule, 1.0 when G is empty too, else 0.0."""
    return inputs.n_overlap / inputs.n_pred


METRICS: dict[str, Metric] = {
    m.key: m
    for m in (
        Metric("dice", "DSC", "", 4, True, _dice, both_empty=1.0, primary=True, paper_column=0, paper_header="DSC ± std"),
        Metric("abs_volume_diff_voxels", "Vol Diff", "voxels", 0, False, _volume_voxels, primary=True, paper_column=3),
        Metric("abs_volume_diff_ml", "Vol Diff", "ml", 2, False, _volume_ml, primary=True),
        Metric("lesion_f1", "Lesion F1", "", 4, True, _lesion_f1, both_empty=1.0, primary=True, paper_column=1),
        Metric("abs_lesion_count_diff", "Lesion Count Diff", "", 2, False, _lesion_count, primary=True, paper_column=2),
        # Both empty: 1.0 (nothing to find, nothing wrongly found; as Dice). Only P empty: 0.0,
        # not NaN (nnU-Net's rule), so a missed lesion lowers the mean instead of leaving it.
        Metric("precision", "Precision", "", 4, True, _voxel_precision, both_empty=1.0, pred_empty=0.0),
    )
}


def case_metrics(pred: np.ndarray, ref: np.ndarray, voxel_volume_ml: float, preset: str) -> dict:
    """All metrics of one case under a named preset (a key of :data:`PRESETS`).

    pred, ref: boolean (X, Y, Z); voxel_volume_ml: ml per voxel. Components of P and G are
    labelled once and shared by every metric and detection (:class:`MetricInputs`). Returns a
    JSON-able dict: the keys of :data:`METRICS` (each :meth:`Metric.value`); "preset",
    "connectivity", "match_iou" (the preset's IoU for a lesion match, None: any overlap);
    "ref_volume_ml", "pred_volume_ml"; "n_ref_lesions", "n_pred_lesions"; "fp_lesions"
    (predicted components counted as false positives); "lesions": one dict per reference
    lesion ("lesion_id" 1.., "ref_volume_ml", "detected" by the preset's rule,
    "overlap_fraction": its predicted voxels / its voxels).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    found = PRESETS[preset]
    volume_difference(pred, ref, voxel_volume_ml)  # validates the pair and the voxel volume
    overlap = pred & ref
    pred_labels, n_pred = label_components(pred, found.connectivity)
    ref_labels, n_ref = label_components(ref, found.connectivity)
    match = match_lesions(pred_labels, n_pred, ref_labels, n_ref, overlap, found.match_iou)
    inputs = MetricInputs(pred, ref, voxel_volume_ml, found, int(np.count_nonzero(pred)), int(np.count_nonzero(ref)), int(np.count_nonzero(overlap)), match)
    lesions = [
        {"lesion_id": i + 1, "ref_volume_ml": int(size) * voxel_volume_ml, "detected": bool(hit), "overlap_fraction": int(inter) / int(size)}
        for i, (size, inter, hit) in enumerate(zip(match.ref_sizes, match.ref_overlap, match.ref_detected))
    ]
    return {
        **{key: metric.value(inputs) for key, metric in METRICS.items()},
        "preset": preset,
        "connectivity": found.connectivity,
        "match_iou": found.match_iou,
        "ref_volume_ml": inputs.n_ref * voxel_volume_ml,
        "pred_volume_ml": inputs.n_pred * voxel_volume_ml,
        "n_ref_lesions": n_ref,
        "n_pred_lesions": n_pred,
        "fp_lesions": n_pred - int(match.pred_matched.sum()),
        "lesions": lesions,
    }
