"""The optimiser, its learning-rate schedule (a pure function of the step) and one optimiser
step on a batch."""
from __future__ import annotations

import math

import torch
from torch import nn

from .losses import multi_head_loss
from .settings import TrainSettings

__all__ = ["lr_at", "make_optimizer", "make_grad_scaler", "train_step"]

_POLY_POWER = 0.9


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int, schedule: str) -> float:
    """Learning rate of optimiser step ``step`` (0-based), a pure function of the step.

    Linear warmup from base_lr / warmup_steps to base_lr over ``warmup_steps`` steps, then
    'cosine' (half cosine to 0 at ``total_steps``), 'poly' (base_lr · (1 - t)^0.9) or 'none'
    (constant), with t the fraction of the post-warmup steps done.
    """
    if schedule not in ("cosine", "poly", "none"):
        raise ValueError(f"schedule must be 'cosine', 'poly' or 'none', got {schedule!r}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "poly":
        return base_lr * (1.0 - t) ** _POLY_POWER
    return base_lr


def make_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """AdamW or Nesterov SGD over all parameters, as ``settings`` says."""
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum, nesterov=True, weight_decay=settings.weight_decay)
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {settings.optimizer!r}")


def make_grad_scaler(amp_dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling, enabled only for float16 autocast (bfloat16 and float32 need none)."""
    return torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loss_fn: nn.Module,
    amp_dtype: torch.dtype | None,
    grad_clip: float,
) -> torch.Tensor:
    """One optimiser step on a batch: images float32 (B, C, X, Y, Z), masks integer labels
    (B, X, Y, Z), both on the model's device. Forward under autocast when ``amp_dtype`` is set,
    loss summed over the model's heads, scaled backward, gradient clipping to ``grad_clip``
    (global L2 norm; 0 = off). Returns the detached scalar loss."""
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = multi_head_loss(loss_fn, model(images), masks)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()
