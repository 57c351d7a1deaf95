"""Segmentation losses on logits: generalized Dice (Sudre et al. 2017) and Dice + cross-entropy.

Inputs to every loss:

- ``logits`` (B, K, X, Y, Z) float, raw network output. K >= 2: softmax over K classes
  (channel 0 background). K = 1: sigmoid of one lesion logit, read as two classes
  (background = 1 - p, lesion = p).
- ``target`` integer (or bool) labels (B, 1, X, Y, Z) or (B, X, Y, Z) with values in
  0 .. max(K, 2) - 1.

Both Dice terms are *batch* Dice: intersections and volumes are summed over the batch and all
voxels before the ratio is taken, so a patch with an empty mask does not produce an undefined
0/0 of its own and small lesions are not over-weighted per patch (as in nnU-Net's batch Dice).
Losses are computed in float32 (also under autocast) and return a scalar tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LOSS_NAMES", "GeneralizedDiceLoss", "DiceCELoss", "build_loss", "multi_head_loss"]

LOSS_NAMES = ("gdice", "dice_ce")
_SUM_DIMS = (0, 2, 3, 4)  # batch and space: batch Dice


def _labels(logits: Tensor, target: Tensor) -> Tensor:
    """Validated labels (B, X, Y, Z) int64 matching ``logits`` (B, K, X, Y, Z)."""
    if logits.ndim != 5:
        raise ValueError(f"logits must be (B, K, X, Y, Z), got shape {tuple(logits.shape)}")
    labels = target[:, 0] if target.ndim == 5 and target.shape[1] == 1 else target
    if tuple(labels.shape) != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}; "
            "expected (B, 1, X, Y, Z) or (B, X, Y, Z)"
        )
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"target must hold integer class labels, got dtype {labels.dtype}")
    classes = max(logits.shape[1], 2)
    low, high = torch.stack(torch.aminmax(labels)).tolist()  # one device sync, not two
    if low < 0 or high >= classes:
        raise ValueError(
            f"target labels must lie in 0..{classes - 1} for {logits.shape[1]} logit channel(s), got {low}..{high}"
        )
    return labels.long()


def _class_probabilities(logits: Tensor) -> Tensor:
    """(B, K, X, Y, Z) logits → (B, max(K, 2), X, Y, Z) float32 class probabilities."""
    logits = logits.float()
    if logits.shape[1] == 1:
        lesion = torch.sigmoid(logits)
        return torch.cat([1.0 - lesion, lesion], dim=1)
    return torch.softmax(logits, dim=1)


def _one_hot(labels: Tensor, classes: int) -> Tensor:
    """(B, X, Y, Z) labels → (B, classes, X, Y, Z) float32 one-hot."""
    return F.one_hot(labels, classes).permute(0, 4, 1, 2, 3).float()


class GeneralizedDiceLoss(nn.Module):
    """Generalized Dice loss (Sudre et al. 2017) over all classes, background included.

    With p the class probabilities and r the one-hot reference, summed over batch and voxels
    per class k: w_k = 1 / (Σ r_k)², loss = 1 - 2 Σ_k w_k Σ p_k r_k / Σ_k w_k Σ (p_k + r_k)
    (numerator and denominator summed over classes before dividing).

    Empty classes: w_k would be infinite, so a class absent from the whole batch gets the
    largest weight among the present classes (it counts like the rarest present class). A
    batch with an empty lesion mask then scores ≈ (predicted lesion volume) / (2 · voxels): finite,
    and 0 for a perfect empty prediction.
    """

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        labels = _labels(logits, target)
        probs = _class_probabilities(logits)
        reference = _one_hot(labels, probs.shape[1])
        ref_volume = reference.sum(_SUM_DIMS)  # (K,) voxels
        intersection = (probs * reference).sum(_SUM_DIMS)
        total = probs.sum(_SUM_DIMS) + ref_volume
        present = ref_volume > 0
        weights = torch.where(present, 1.0 / ref_volume.clamp(min=1.0) ** 2, 0.0)
        weights = torch.where(present, weights, weights.max())  # empty class: weight of the rarest present one
        return 1.0 - 2.0 * (weights * intersection).sum() / (weights * total).sum()


class DiceCELoss(nn.Module):
    """Soft Dice on the foreground classes plus cross-entropy, weighted 1:1.

    Dice term: per foreground class k >= 1 (the lesion for K <= 2), summed over batch and
    voxels, dice_k = (2 Σ p_k r_k + smooth) / (Σ p_k + Σ r_k + smooth); term = 1 - mean_k dice_k.
    ``smooth`` (default 1 voxel) makes an empty reference with an empty prediction score 0 and
    keeps the ratio finite. Cross-entropy: mean over voxels (binary cross-entropy on the logit
    when K = 1).
    """

    def __init__(self, smooth: float = 1.0):
        super().__init__()
        if not smooth > 0:
            raise ValueError(f"smooth must be > 0, got {smooth!r}")
        self.smooth = smooth

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        labels = _labels(logits, target)
        probs = _class_probabilities(logits)
        reference = _one_hot(labels, probs.shape[1])
        intersection = (probs * reference).sum(_SUM_DIMS)[1:]
        total = (probs + reference).sum(_SUM_DIMS)[1:]
        dice = (2.0 * intersection + self.smooth) / (total + self.smooth)
        if logits.shape[1] == 1:
            ce = F.binary_cross_entropy_with_logits(logits[:, 0].float(), labels.float())
        else:
            ce = F.cross_entropy(logits.float(), labels)
        return (1.0 - dice.mean()) + ce


def build_loss(name: str) -> nn.Module:
    """The loss called ``name``: 'gdice' (:class:`GeneralizedDiceLoss`) or 'dice_ce' (:class:`DiceCELoss`)."""
    if name == "gdice":
        return GeneralizedDiceLoss()
    if name == "dice_ce":
        return DiceCELoss()
    raise ValueError(f"loss must be one of {LOSS_NAMES}, got {name!r}")


def multi_head_loss(loss_fn: nn.Module, head_logits: tuple[Tensor, ...], target: Tensor) -> Tensor:
    """Sum of ``loss_fn(logits, target)`` over the heads of a model's output tuple (scalar).

    Every head is supervised with the same target (ResNet 'separate'/'shared': DWI and ADC heads).
    """
    if not isinstance(head_logits, (tuple, list)) or not head_logits:
        raise ValueError(
            f"head_logits must be a non-empty tuple of (B, K, X, Y, Z) logits, got {type(head_logits).__name__}"
        )
    return sum(loss_fn(logits, target) for logits in head_logits)
