"""Whole-volume validation during training: mean Dice at p >= 0.5 over the validation cases,
split between ranks, every ``--val-every`` epochs and after the last."""
from __future__ import annotations

import functools

import torch

import models

from ..core.metrics import dice
from ..datasets.contract import THRESHOLD
from ..inference.inferer import Inferer
from ..inference.precision import training_precision
from .data import load_case_volume
from .distributed import all_sum, broadcast_buffers
from .preemption import StopFlag
from .settings import TrainSettings
from .state import Run

__all__ = ["validation_due", "validate", "validation_inferer"]


def validation_due(settings: TrainSettings, epoch: int) -> bool:
    """Whether 0-based ``epoch`` ends with whole-volume validation: every ``val_every``-th
    epoch and the last one."""
    return (epoch + 1) % settings.val_every == 0 or epoch + 1 == settings.epochs


def validate(run: Run, stop: StopFlag) -> float | None:
    """Mean Dice (p >= 0.5) over whole validation volumes by the inferer of evaluation and
    prediction (:func:`validation_inferer`; windows of the training patch, or the whole volume
    when the patch covers it); cases are split over ranks and the sums all-reduced.
    Returns None when a preemption signal arrives (checked after every case, on all ranks)."""
    ctx, cases = run.ctx, run.val_cases
    net = run.model  # not DDP's forward, which would broadcast buffers: ranks see different case counts
    broadcast_buffers(net, ctx)  # every rank validates the model rank 0 saves
    net.eval()
    inferer, predictor = validation_inferer(run.settings, ctx.device), functools.partial(models.foreground_probability, net)
    total, count = 0.0, 0
    try:
        for first in range(0, len(cases), ctx.world_size):
            index = first + ctx.rank
            if index < len(cases):
                image, mask = load_case_volume(cases[index])
                total += dice(inferer(torch.from_numpy(image), predictor, run.window) >= THRESHOLD, mask)
                count += 1
            if stop.agreed(ctx):
                return None
    finally:
        net.train()
    total, count = all_sum([total, count], ctx)
    return total / count


def validation_inferer(settings: TrainSettings, device: torch.device) -> Inferer:
    """The inferer of whole-volume validation: the run's --overlap and --sw-batch-size on
    ``device``, at the --amp precision (:func:`strokeseg.inference.precision.training_precision`);
    Gaussian blending, no TTA, no brain crop."""
    return Inferer(overlap=settings.overlap, sw_batch_size=settings.sw_batch_size, device=device, precision=training_precision(settings.amp))
