"""The settings of one training run: :class:`TrainSettings` (the shared training flags, see
:data:`strokeseg.training.arguments.TRAINING_DEFAULTS`) and :class:`InitSpec` (how the weights
start)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

__all__ = ["TrainSettings", "InitSpec"]


@dataclass(frozen=True)
class TrainSettings:
    """Everything the engine needs besides the model config and the data (see TRAINING_DEFAULTS)."""

    output_dir: Path
    fold: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    optimizer: str
    momentum: float
    schedule: str
    warmup_epochs: float
    grad_clip: float
    loss: str
    amp: str
    seed: int
    workers: int
    overlap: float
    sw_batch_size: int
    channels_last: bool = True
    val_every: int = 1
    tensorboard: bool = False
    device: str = "auto"
    resume: bool = False
    resume_if_exists: bool = False
    overwrite: bool = False

    @staticmethod
    def from_args(values: Mapping[str, Any]) -> "TrainSettings":
        """The settings among parsed arguments ``values`` (``vars(args)``)."""
        return TrainSettings(**{f.name: values[f.name] for f in fields(TrainSettings)})

    @property
    def fold_dir(self) -> Path:
        return Path(self.output_dir) / f"fold_{self.fold}"


@dataclass(frozen=True)
class InitSpec:
    """How the weights start: label ('scratch', 'brats', 'transfer', 'finetune'), and for a
    pretrained start the checkpoint, the scope copied ('encoder' | 'all'), the dataset it must
    have been trained on (source_dataset, a registry name; None: any) and this fold's test case
    ids, which, like its validation cases, it must not have seen; fold: this run's fold, which a
    source checkpoint recording its fold must share unless allow_fold_mismatch
    (:func:`strokeseg.datasets.contract.check_pretrained`, before anything is written)."""

    label: str = "scratch"
    checkpoint: Path | None = None
    scope: str = "encoder"
    source_dataset: str | None = None
    test_cases: tuple[str, ...] = ()
    fold: int | None = None
    allow_fold_mismatch: bool = False
