"""Shareable models: a self-contained folder of fold checkpoints and a model card.

    python -m strokeseg.export runs/isles_shared_brats models/isles_shared_brats \\
        --evaluation results/isles

writes ``OUT_DIR/fold_<k>/best_model.pth`` (weights, model config, data contract, training
arguments, initialisation, validation cases, epoch, best validation Dice and history; no
optimiser, scheduler, scaler or RNG state) and ``OUT_DIR/model_card.json`` (architecture, data
contract, training arguments, validation Dice per fold, the evaluation summary of this run when
``--evaluation`` names an ``evaluate.py`` output, the code version). ``predict.py --run OUT_DIR``
uses the folder as it uses a training run folder. Checkpoints without a data contract are refused.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import models

from .core.contract import contract_from_checkpoint
from .core.io import CaseError, one_line, read_json, write_json
from .core.runner import get_logger
from .evaluation.engine import discover_checkpoints
from .inference.prediction import code_version, shared_contract, stored_contract

__all__ = ["KEPT_KEYS", "export_checkpoint", "evaluation_record", "model_card", "export_run", "main"]

# Checkpoint entries an exported model keeps besides format_version, model_config and weights.
KEPT_KEYS = ("config", "init", "val_cases", "data_contract", "epoch", "best_score", "history")


def export_checkpoint(source: Path, target: Path) -> dict:
    """Rebuild ``source``'s network (strict) and write it to ``target`` with :data:`KEPT_KEYS`
    only. Returns the source checkpoint. Raises :class:`CaseError` for an unreadable checkpoint
    or one without a data contract prediction can use (:func:`strokeseg.inference.prediction.stored_contract`)."""
    try:
        model, checkpoint = models.model_from_checkpoint(source)
    except (FileNotFoundError, ValueError) as err:
        raise CaseError(one_line(err)) from err
    stored_contract(checkpoint, source)
    extra = {key: checkpoint[key] for key in KEPT_KEYS if key in checkpoint}
    models.save_checkpoint(target, model, checkpoint["model_config"], **extra)
    return checkpoint


def evaluation_record(path: Path, run_dir: Path) -> dict:
    """The entries of an ``evaluate.py`` summary (``path``: its output folder or summary.json)
    about the run whose checkpoints lie in ``run_dir``: dataset, split, preset and per run label
    its fold and ensemble summaries. Raises :class:`CaseError` when no run of it is there."""
    summary = read_json(path / "summary.json" if path.is_dir() else path)
    root = run_dir.resolve()
    runs = {}
    for label, run in summary.get("runs", {}).items():
        paths = [Path(c["path"]).resolve() for c in run.get("checkpoints", {}).values()]
        if paths and all(root in p.parents for p in paths):
            runs[label] = {key: run.get(key) for key in ("strategy", "init", "folds", "n_test_cases", "fold_summary", "ensemble_summary")}
    if not runs:
        raise CaseError(f"{path}: evaluation summary has no run whose checkpoints are in {run_dir}")
    return {"summary": str(path), "dataset": summary.get("dataset"), "split": summary.get("split"), "preset": summary.get("preset"), "runs": runs}


def model_card(run_dir: Path, checkpoints: Mapping[int, Mapping[str, Any]], evaluation: dict | None) -> dict:
    """model_card.json content from the exported fold checkpoints (fold -> checkpoint dict)."""
    first = checkpoints[min(checkpoints)]
    folds = {
        f"fold_{fold}": {
            "file": f"fold_{fold}/best_model.pth",
            "validation_dice": checkpoint.get("best_score"),
            "best_epoch": checkpoint.get("epoch"),
            "init": checkpoint.get("init"),
            "val_cases": checkpoint.get("val_cases"),
            "train_cases": checkpoint["data_contract"].get("train_cases"),
        }
        for fold, checkpoint in sorted(checkpoints.items())
    }
    return {
        "name": run_dir.resolve().name,
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "code_version": code_version(),
        "architecture": first["model_config"],
        "data_contract": shared_contract(contract_from_checkpoint(first, run_dir)),
        "training_arguments": first.get("config"),
        "folds": folds,
        "evaluation": evaluation,
        "usage": f"python predict.py --input DATA --run {run_dir.resolve().name} --output-dir OUT",
    }


def export_run(run_dir: Path, out_dir: Path, folds: Sequence[int] | None, evaluation: Path | None, overwrite: bool) -> dict:
    """Export every ``fold_<k>/best_model.pth`` of ``run_dir`` (or ``folds``) to ``out_dir`` and
    write model_card.json last. Returns the card. Raises :class:`CaseError` for bad input or an
    existing export without ``overwrite``."""
    if (out_dir / "model_card.json").exists() and not overwrite:
        raise CaseError(f"{out_dir}: holds an exported model (model_card.json); use --overwrite to replace it")
    found = discover_checkpoints(run_dir, folds)
    record = evaluation_record(evaluation, run_dir) if evaluation is not None else None
    checkpoints = {fold: export_checkpoint(path, out_dir / f"fold_{fold}" / "best_model.pth") for fold, path in found.items()}
    card = model_card(run_dir, checkpoints, record)
    write_json(out_dir / "model_card.json", card)
    return card


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m strokeseg.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="training run folder with fold_<k>/best_model.pth")
    parser.add_argument("out_dir", type=Path, help="folder for the exported model")
    parser.add_argument("--folds", type=int, nargs="+", help="folds to export (default: every fold found)")
    parser.add_argument("--evaluation", type=Path, help="evaluate.py output folder (or its summary.json) to put in the model card")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export in out_dir")
    args = parser.parse_args(argv)
    log = get_logger()
    try:
        card = export_run(args.run_dir, args.out_dir, args.folds, args.evaluation, args.overwrite)
    except CaseError as err:
        log.info(f"ERROR {one_line(err)}")
        return 2
    dice = ", ".join(f"{name} {fold['validation_dice']:.4f}" for name, fold in card["folds"].items() if fold["validation_dice"] is not None)
    log.info(f"exported {len(card['folds'])} fold model(s) of {args.run_dir} to {args.out_dir} (validation Dice: {dice or 'not recorded'}); model_card.json written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
