"""What a model folder given to ``predict.py --run`` (or exported by :mod:`strokeseg.export`) must
hold before its checkpoints are used: each folder once, no empty ``fold_<k>`` folder unnoticed,
and an exported folder exactly as its model card lists it.

An *exported* folder is one with ``model_card.json`` (its ``"format"`` is :data:`CARD_FORMAT`) or
whose checkpoints carry the :data:`EXPORT_KEY` entry the export writes into each of them (so a
deleted card is noticed). Its ``fold_<k>`` folders must be the card's folds, and each
checkpoint's weights digest (:func:`models.weights_digest`, checked against the weights when the
file is loaded) the card's. A training run folder has neither and is not checked.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import models

from ..core.io import CaseError, read_json
from .fold_models import fold_of_path

__all__ = ["CARD_NAME", "CARD_FORMAT", "EXPORT_KEY", "distinct_runs", "empty_fold_folders", "is_exported", "check_exported"]

CARD_NAME = "model_card.json"
CARD_FORMAT = "strokeseg model card 1"  # the card's "format" entry: what marks an exported folder
EXPORT_KEY = "export"  # checkpoint entry of an exported fold: {"card": CARD_NAME}


def distinct_runs(run_dirs: Sequence[Path]) -> None:
    """Raise :class:`CaseError` when two of ``run_dirs`` are one folder (spelled with a trailing
    slash, relative and absolute, or through a symbolic link): it would weigh twice in the mean."""
    seen: dict[Path, Path] = {}
    for run_dir in run_dirs:
        real = Path(os.path.realpath(run_dir))
        if real in seen:
            raise CaseError(f"--run {run_dir} and --run {seen[real]} are the same folder ({real}); give each model folder once (it would count twice in the ensemble)")
        seen[real] = Path(run_dir)


def _fold_folders(run_dir: Path, name: str) -> dict[int, Path]:
    """fold -> ``run_dir/fold_<k>`` for every fold folder present."""
    folders = {}
    for sub in run_dir.iterdir() if run_dir.is_dir() else ():
        fold = fold_of_path(sub / name)
        if fold is not None and sub.is_dir():
            folders[fold] = sub
    return dict(sorted(folders.items()))


def empty_fold_folders(run_dir: Path, name: str = "best_model.pth") -> list[Path]:
    """The ``fold_<k>`` folders of ``run_dir`` without ``name`` (a fold whose training has not
    written its best model: still running, failed, or never started), sorted by fold."""
    return [folder for folder in _fold_folders(run_dir, name).values() if not (folder / name).is_file()]


def is_exported(run_dir: Path, checkpoints: Mapping[int, Mapping[str, Any]]) -> bool:
    """Whether ``run_dir`` is an exported model folder: it holds a model card, or one of its
    loaded ``checkpoints`` (fold -> checkpoint dict) was written by the export."""
    return (run_dir / CARD_NAME).exists() or any(EXPORT_KEY in checkpoint for checkpoint in checkpoints.values())


def _read_card(run_dir: Path) -> dict:
    card_path = run_dir / CARD_NAME
    if not card_path.exists():
        raise CaseError(f"{card_path}: missing, but {run_dir} holds exported checkpoints; an exported model is used only with its model card (export it again)")
    card = read_json(card_path)
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT or not isinstance(card.get("folds"), dict):
        raise CaseError(f"{card_path}: not a model card of this pipeline (no \"format\": {CARD_FORMAT!r} and \"folds\" entry); export the model again")
    return card


def check_exported(run_dir: Path, checkpoints: Mapping[int, Mapping[str, Any]], name: str = "best_model.pth") -> None:
    """Check an exported folder against its model card; nothing for a training run folder.

    ``checkpoints``: fold -> loaded checkpoint dict of the folds about to be used. Raises
    :class:`CaseError` naming the file when the card is missing or not a card, when the
    ``fold_<k>`` folders present are not the folds the card lists, or when a checkpoint's
    weights digest is not the card's (another export's fold, or an edited card)."""
    if not is_exported(run_dir, checkpoints):
        return
    card = _read_card(run_dir)
    listed = sorted(card["folds"])
    present = sorted(f"fold_{fold}" for fold in _fold_folders(run_dir, name))
    if present != listed:
        raise CaseError(f"{run_dir / CARD_NAME}: lists folds {listed} but the folder holds {present}; an export is used only as written (export it again)")
    for fold, checkpoint in checkpoints.items():
        recorded = card["folds"][f"fold_{fold}"].get("weights_sha256") if isinstance(card["folds"][f"fold_{fold}"], dict) else None
        if recorded is None or recorded != checkpoint.get(models.DIGEST_KEY):
            raise CaseError(f"{run_dir / f'fold_{fold}' / name}: weights digest differs from the one {run_dir / CARD_NAME} records; "
                            "the checkpoint or the card was replaced or edited (export the model again)")
