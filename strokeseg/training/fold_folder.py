"""The fold folder ``<output-dir>/fold_<k>/``: one run at a time (:func:`fold_lock`), the
choice between resuming and starting fresh (:func:`prepare_fold_dir`) and the removal of a
previous run's files when ``--overwrite`` replaces it (:func:`replace_previous_run`).

One run per fold folder. ``fit`` holds an exclusive ``flock`` on ``fold_<k>/.lock`` (host and
pid inside) while it runs; a second training into the folder fails at once naming the holder.
``--overwrite`` checks every input first and keeps the previous run's files until the new run
writes its first ``last.pth``.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
from pathlib import Path
from typing import Iterator

from ..core.io import CaseError
from .distributed import DistContext, all_sum
from .history import TENSORBOARD_DIR
from .settings import TrainSettings

__all__ = ["LOCK_NAME", "prepare_fold_dir", "replace_previous_run", "fold_lock"]

LOCK_NAME = ".lock"  # in every fold folder: "host <name> pid <n>" of the training holding it


def prepare_fold_dir(settings: TrainSettings) -> tuple[bool, bool]:
    """Decide between resuming and starting fresh: (resume, replace), replace meaning a fresh
    start over a previous run (--overwrite), whose files stay until this run's first last.pth
    (:func:`replace_previous_run`). Deletes nothing. Raises CaseError when --resume finds no
    last.pth, or a fresh start would replace a run without --overwrite."""
    last = settings.fold_dir / "last.pth"
    if settings.resume and not last.is_file():
        raise CaseError(f"--resume: {last} not found (start without --resume, or use --resume-if-exists)")
    if settings.resume or (settings.resume_if_exists and last.is_file()):
        return True, False
    existing = [settings.fold_dir / n for n in ("last.pth", "best_model.pth") if (settings.fold_dir / n).exists()]
    if existing and not settings.overwrite:
        raise CaseError(f"{settings.fold_dir} already holds a run ({existing[0].name}); pass --resume to continue or --overwrite to start over")
    return False, bool(existing)


def replace_previous_run(fold_dir: Path) -> None:
    """Remove what a previous run left beside last.pth (its best model, history, curves and
    arguments, TensorBoard events), just before this run's first last.pth replaces the old one."""
    for name in ("best_model.pth", "history.csv", "curves.png", "run_args.json"):
        (fold_dir / name).unlink(missing_ok=True)
    shutil.rmtree(fold_dir / TENSORBOARD_DIR, ignore_errors=True)


@contextlib.contextmanager
def fold_lock(fold_dir: Path, ctx: DistContext) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``fold_dir/.lock`` (rank 0, for the duration of the
    ``with``; the kernel releases it when the process ends, however it ends) and record the
    holder's host and pid in it. Raises CaseError on every rank when another process holds it:
    two trainings must never write into one fold folder."""
    handle, holder = None, None
    if ctx.is_main:
        fold_dir.mkdir(parents=True, exist_ok=True)
        handle = open(fold_dir / LOCK_NAME, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "holder not recorded yet"
            handle.close()
    if all_sum([1.0 if holder else 0.0], ctx)[0] > 0:
        raise CaseError(f"{fold_dir} is in use by another training ({holder or 'rank 0 could not lock it'}); "
                        f"wait for it, or give this run another --fold / --output-dir")
    try:
        if handle is not None:
            handle.truncate(0)
            handle.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
            handle.flush()
        yield
    finally:
        if handle is not None:
            handle.close()
