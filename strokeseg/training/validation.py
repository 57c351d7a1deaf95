"""Whole-volume validation during training: mean Dice at p >= 0.5 over the validation cases,
split between ranks, every ``--val-every`` epochs and after the last."""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

import models

from ..core.metrics import dice
from ..datasets.contract import THRESHOLD
from ..inference.sliding_window import sample_shape, sliding_window_inference, training_precision
from .data import load_case_volume
from .distributed import all_sum, broadcast_buffers
from .preemption import StopFlag
from .settings import TrainSettings
from .state import Run

__all__ = ["validation_due", "validate"]


def validation_due(settings: TrainSettings, epoch: int) -> bool:
    """Whether 0-based ``epoch`` ends with whole-volume validation: every ``val_every``-th
    epoch and the last one."""
    return (epoch + 1) % settings.val_every == 0 or epoch + 1 == settings.epochs


def validate(run: Run, stop: StopFlag) -> float | None:
    """Mean Dice (p >= 0.5) over whole validation volumes by sliding-window inference with
    windows of the training sample shape (:func:`sample_shape`: the training patch, or the whole
    volume when the patch covers it); cases are split over ranks and the sums all-reduced.
    Returns None when a preemption signal arrives (checked after every case, on all ranks)."""
    ctx, cases = run.ctx, run.val_cases
    net = run.model  # not DDP's forward, which would broadcast buffers: ranks see different case counts
    broadcast_buffers(net, ctx)  # every rank validates the model rank 0 saves
    net.eval()
    total, count = 0.0, 0
    try:
        for first in range(0, len(cases), ctx.world_size):
            index = first + ctx.rank
            if index < len(cases):
                image, mask = load_case_volume(cases[index])
                total += dice(_foreground_probability(run, net, image) >= THRESHOLD, mask)
                count += 1
            if stop.agreed(ctx):
                return None
    finally:
        net.train()
    total, count = all_sum([total, count], ctx)
    return total / count


def _foreground_probability(run: Run, net: nn.Module, image: np.ndarray) -> np.ndarray:
    """Foreground probabilities (X, Y, Z), a float32 numpy array, of one validation volume ``image``
    (C, X, Y, Z) float32 by ``net`` (in eval mode): sliding windows of the training sample shape
    with the run's --overlap, --sw-batch-size, device and --amp precision."""
    settings = run.settings
    predictor = functools.partial(models.foreground_probability, net)
    return sliding_window_inference(
        torch.from_numpy(image), predictor, sample_shape(run.window, image.shape[1:]), overlap=settings.overlap,
        sw_batch_size=settings.sw_batch_size, device=run.ctx.device, precision=training_precision(settings.amp),
    )
