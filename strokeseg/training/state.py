"""The state of a training run: its progress (:class:`Progress`), what its checkpoints record
(:class:`Records`), everything the phases of :func:`strokeseg.training.engine.fit` share
(:class:`Run`), the RNG states and the check that a resumed run was configured alike.

Exact resume. The data order and every sample are pure functions of (seed, epoch, sample id)
(:mod:`strokeseg.training.data`), and the torch generator is reseeded from (seed, epoch, step, rank)
before every step (dropout, :func:`step_seed`), so replaying from a checkpoint gives the same
batches and random numbers. ``last.pth`` holds the model, optimiser, schedule position,
GradScaler, the epoch and the number of steps of it already done, the running loss sums, best
score, history and RNG states. On CPU a resumed run ends with bit-identical weights; on CUDA,
cuDNN's nondeterministic kernels make runs (resumed or not) agree only to rounding.
"""
from __future__ import annotations

import json
import random
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .data import BatchLoader, CaseFiles, EpochSampler
from .distributed import DistContext
from .history import TensorBoard
from .optimization import lr_at
from .settings import TrainSettings

__all__ = ["jsonable", "Progress", "rng_state", "restore_rng", "step_seed", "resume_check", "Records", "Run"]

# Settings that may change between a run and its resume without changing the result.
_RESUME_FREE = ("output_dir", "workers", "device", "resume", "resume_if_exists", "overwrite", "tensorboard")


def jsonable(value: Any) -> Any:
    """Plain JSON types only (paths → str), as checkpoints and run_args.json need."""
    return json.loads(json.dumps(value, default=str))


@dataclass
class Progress:
    """Where training stands: ``epoch`` in progress (0-based) and its ``step``s already done."""

    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    loss_count: float = 0.0
    seconds: float = 0.0
    best_dice: float = -1.0
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)


def rng_state() -> dict:
    """The torch, CUDA (one per device; [] without CUDA), NumPy and Python RNG states, as
    tensors and plain lists that ``torch.load(..., weights_only=True)`` reads back."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def restore_rng(state: dict) -> None:
    """Set every RNG to ``state`` (a :func:`rng_state` dict, as read from last.pth)."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """The torch seed of optimiser step ``step`` (0-based) of ``epoch`` on ``rank``: a 64-bit
    integer, a pure function of the four."""
    return int(np.random.SeedSequence([seed, epoch, step, rank]).generate_state(1, dtype=np.uint64)[0])


def resume_check(checkpoint: dict, expected: dict, path: Path) -> None:
    """Raise ValueError when the run being resumed was configured differently."""
    problems = []
    for key, value in expected.items():
        stored = checkpoint.get(key)
        if key == "settings":  # a setting newer than the checkpoint counts with its default
            defaults = {f.name: f.default for f in fields(TrainSettings) if f.default is not MISSING}
            stored = {k: v for k, v in {**defaults, **(stored or {})}.items() if k not in _RESUME_FREE}
            value = {k: v for k, v in value.items() if k not in _RESUME_FREE}
        if jsonable(stored) != jsonable(value):
            if isinstance(value, dict) and isinstance(stored, dict):
                diff = sorted(k for k in set(value) | set(stored) if jsonable(value.get(k)) != jsonable(stored.get(k)))
                problems.append(f"{key} differs in {diff}")
            else:
                problems.append(f"{key} differs")
    if problems:
        raise ValueError(f"{path}: cannot resume, the run was configured differently: {'; '.join(problems)}")


@dataclass(frozen=True)
class Records:
    """What every checkpoint stores beside the weights and the training state (JSON-able):
    the resolved model config, the script's arguments, how the weights started, the data
    contract, and the run's identity (settings, data, validation case ids), which a resume must
    match."""

    model_config: dict
    config: dict
    init: dict
    data_contract: dict | None
    identity: dict


@dataclass
class Run:
    """Everything the phases of :func:`strokeseg.training.engine.fit` share: the fixed set-up
    and the training state.

    ``model`` is the bare network (saved, validated), ``train_model`` the one trained (``model``
    or its DistributedDataParallel wrapper). ``steps``: optimiser steps per epoch and rank.
    ``lr``: the rate of the last step done. ``epoch_started``: perf_counter() value at which
    the current epoch would have started had it run without a break (the epoch's wall time is
    kept across a resume)."""

    settings: TrainSettings
    ctx: DistContext
    records: Records
    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    loss_fn: nn.Module
    sampler: EpochSampler
    loader: BatchLoader
    steps: int
    warmup_steps: int
    val_cases: Sequence[CaseFiles]
    window: int
    state: Progress
    lr: float = 0.0
    epoch_started: float = 0.0
    replacing: bool = False  # a previous run's files are still in the fold folder (--overwrite)
    tensorboard: TensorBoard | None = None  # rank 0 with --tensorboard

    @property
    def total_steps(self) -> int:
        return self.steps * self.settings.epochs

    def lr_of_step(self, step: int) -> float:
        """Learning rate of global optimiser step ``step`` (0-based) of this run."""
        s = self.settings
        return lr_at(step, self.total_steps, s.lr, self.warmup_steps, s.schedule)
