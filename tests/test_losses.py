"""Tests for strokeseg/training/losses.py: hand-computed values, perfect and empty cases, batch Dice, errors."""
from __future__ import annotations

import math

import pytest
import torch

from strokeseg.training.losses import DiceCELoss, GeneralizedDiceLoss, build_loss, multi_head_loss

# Four voxels along X, reference [1, 0, 0, 0]; lesion probabilities [3/4, 1/4, 1/2, 1/2].
TARGET = torch.tensor([1, 0, 0, 0]).view(1, 1, 4, 1, 1)
LESION_LOGIT = torch.tensor([math.log(3), -math.log(3), 0.0, 0.0]).view(1, 1, 4, 1, 1)
TWO_CLASS_LOGITS = torch.cat([torch.zeros_like(LESION_LOGIT), LESION_LOGIT], dim=1)


def _perfect_logits(labels: torch.Tensor, classes: int = 2, margin: float = 50.0) -> torch.Tensor:
    """(B, 1, X, Y, Z) labels → logits with +margin on the true class, -margin elsewhere."""
    one_hot = torch.nn.functional.one_hot(labels[:, 0], classes).permute(0, 4, 1, 2, 3).float()
    return margin * (2 * one_hot - 1)


def test_generalized_dice_hand_computed():
    # lesion: ref 1 → w = 1, intersection 3/4, sum p + r = 2 + 1 = 3
    # background: ref 3 → w = 1/9, intersection 1/4·0 + 3/4 + 1/2 + 1/2 = 7/4, sum p + r = 2 + 3 = 5
    # loss = 1 - 2 (3/4 + 7/36) / (3 + 5/9) = 1 - (17/9) / (32/9) = 15/32
    loss = GeneralizedDiceLoss()
    assert loss(TWO_CLASS_LOGITS, TARGET).item() == pytest.approx(15 / 32, abs=1e-6)
    assert loss(LESION_LOGIT, TARGET).item() == pytest.approx(15 / 32, abs=1e-6)  # sigmoid: two implicit classes
    assert loss(TWO_CLASS_LOGITS, TARGET[:, 0]).item() == pytest.approx(15 / 32, abs=1e-6)  # (B, X, Y, Z) target


def test_generalized_dice_empty_class_gets_largest_present_weight():
    # Reference all background (2 voxels), lesion probability 1/2 on both.
    # background: ref 2 → w = 1/4, intersection 1, sum 1 + 2 = 3; lesion absent → w = 1/4, sum 1.
    # loss = 1 - 2 (1/4 · 1) / (1/4 · 3 + 1/4 · 1) = 1/2
    logits = torch.zeros(1, 2, 2, 1, 1)
    target = torch.zeros(1, 1, 2, 1, 1, dtype=torch.long)
    assert GeneralizedDiceLoss()(logits, target).item() == pytest.approx(0.5, abs=1e-6)


def test_dice_ce_hand_computed():
    # Dice: 1 - (2 · 3/4 + 1) / (3 + 1) = 3/8; CE: mean(-log 3/4, -log 3/4, -log 1/2, -log 1/2)
    expected = 3 / 8 + (2 * math.log(4 / 3) + 2 * math.log(2)) / 4
    loss = DiceCELoss()
    assert loss(TWO_CLASS_LOGITS, TARGET).item() == pytest.approx(expected, abs=1e-6)
    assert loss(LESION_LOGIT, TARGET).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("name", ["gdice", "dice_ce"])
def test_perfect_prediction_scores_zero(name):
    torch.manual_seed(0)
    labels = (torch.rand(2, 1, 6, 5, 4) > 0.8).long()
    labels[0, 0, 0, 0, 0] = 1
    assert build_loss(name)(_perfect_logits(labels), labels).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ["gdice", "dice_ce"])
def test_empty_mask_is_finite_and_perfect_empty_prediction_scores_zero(name):
    labels = torch.zeros(2, 1, 8, 8, 8, dtype=torch.long)
    loss = build_loss(name)
    assert loss(_perfect_logits(labels, margin=20.0), labels).item() == pytest.approx(0.0, abs=1e-5)
    wrong = torch.randn(2, 2, 8, 8, 8, requires_grad=True)
    value = loss(wrong, labels)
    value.backward()
    assert torch.isfinite(value) and value.item() > 0.01
    assert torch.isfinite(wrong.grad).all()


def test_generalized_dice_is_batch_dice():
    # Two samples score like one volume holding both (sums over batch and space), which is
    # not the mean of the per-sample losses.
    torch.manual_seed(1)
    logits = torch.randn(2, 2, 4, 3, 3)
    labels = torch.zeros(2, 1, 4, 3, 3, dtype=torch.long)
    labels[0, 0, :2] = 1  # sample 0: 18 lesion voxels, sample 1: 1
    labels[1, 0, 0, 0, 0] = 1
    loss = GeneralizedDiceLoss()
    joined = loss(torch.cat([logits[:1], logits[1:]], dim=2), torch.cat([labels[:1], labels[1:]], dim=2))
    batch = loss(logits, labels)
    per_sample = (loss(logits[:1], labels[:1]) + loss(logits[1:], labels[1:])) / 2
    assert batch.item() == pytest.approx(joined.item(), abs=1e-6)
    assert abs(batch.item() - per_sample.item()) > 1e-3


def test_multi_head_loss_sums_heads():
    loss = GeneralizedDiceLoss()
    perfect = _perfect_logits(TARGET)
    total = multi_head_loss(loss, (TWO_CLASS_LOGITS, perfect, TWO_CLASS_LOGITS), TARGET)
    assert total.item() == pytest.approx(2 * 15 / 32, abs=1e-6)
    with pytest.raises(ValueError, match="non-empty tuple"):
        multi_head_loss(loss, (), TARGET)


@pytest.mark.parametrize(
    "logits,target,match",
    [
        (torch.zeros(1, 2, 4, 1, 1), torch.zeros(1, 1, 3, 1, 1, dtype=torch.long), r"target shape \(1, 1, 3, 1, 1\)"),
        (torch.zeros(1, 2, 4, 1, 1), torch.zeros(1, 1, 4, 1, 1), "integer class labels"),
        (torch.zeros(1, 2, 4, 1, 1), torch.full((1, 1, 4, 1, 1), 2), r"0\.\.1 .* got 2\.\.2"),
        (torch.zeros(2, 4, 1, 1), torch.zeros(2, 4, 1, 1, dtype=torch.long), r"\(B, K, X, Y, Z\)"),
    ],
)
def test_bad_inputs_raise(logits, target, match):
    for name in ("gdice", "dice_ce"):
        with pytest.raises(ValueError, match=match):
            build_loss(name)(logits, target)


def test_unknown_loss_name():
    with pytest.raises(ValueError, match="'focal'"):
        build_loss("focal")
