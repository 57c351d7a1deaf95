"""What a training run reports per epoch: ``history.csv`` (:func:`write_history`),
``curves.png`` (:func:`plot_curves`) and, with ``--tensorboard``, TensorBoard event files
(:class:`TensorBoard`). Every file is written atomically."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..core.io import atomic_path

__all__ = ["TENSORBOARD_DIR", "write_history", "plot_curves", "TensorBoard"]

TENSORBOARD_DIR = "tensorboard"  # --tensorboard: event files in fold_<k>/tensorboard/


def write_history(path: Path, history: Sequence[Mapping[str, float | None]]) -> None:
    """history.csv: epoch (1-based), train_loss (mean over samples), val_dice (mean whole-volume
    Dice at p >= 0.5; empty for an epoch not validated, see --val-every), lr (at the epoch's
    last step), seconds (wall time of the epoch)."""
    columns = ("epoch", "train_loss", "val_dice", "lr", "seconds")
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in history:
            val = "" if row["val_dice"] is None else f"{row['val_dice']:.6f}"
            writer.writerow([row["epoch"], f"{row['train_loss']:.6f}", val, f"{row['lr']:.6g}", f"{row['seconds']:.1f}"])


def plot_curves(path: Path, history: Sequence[Mapping[str, float | None]]) -> None:
    """curves.png: training loss, validation Dice (validated epochs) and learning rate against epoch."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(12, 3.5))
    for ax, key, title in zip(fig.subplots(1, 3), ("train_loss", "val_dice", "lr"), ("training loss", "validation Dice (whole volumes)", "learning rate")):
        points = [(row["epoch"], row[key]) for row in history if row[key] is not None]
        ax.plot([e for e, _ in points], [v for _, v in points], marker="o" if len(points) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


class TensorBoard:
    """TensorBoard event files in ``log_dir`` (the optional package ``tensorboard``): per epoch
    (1-based step) ``train/loss``, ``val/dice`` (validated epochs only) and ``lr``. The writer
    opens when this process ends its first epoch and drops the events a preempted process left
    from that epoch on (``purge_step``), so a resumed run shows each epoch once."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ValueError(f"--tensorboard needs the optional package tensorboard (pip install tensorboard): {err}") from err
        self._writer_class = SummaryWriter
        self._writer: Any = None
        self.log_dir = log_dir

    def log(self, row: Mapping[str, float | None]) -> None:
        epoch = int(row["epoch"])
        if self._writer is None:
            self._writer = self._writer_class(log_dir=str(self.log_dir), purge_step=epoch)
        for tag, key in (("train/loss", "train_loss"), ("val/dice", "val_dice"), ("lr", "lr")):
            if row[key] is not None:
                self._writer.add_scalar(tag, row[key], epoch)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
