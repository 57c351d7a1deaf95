"""Shareable models: a self-contained folder of fold checkpoints and a model card.

    python -m strokeseg.export runs/isles_shared_brats exported/isles_shared_brats \\
        --evaluation results/ISLES2022

writes ``OUT_DIR/fold_<k>/best_model.pth`` (weights and their digest, model config, data
contract, training arguments, initialisation, validation cases, epoch, best validation Dice and
history; no optimiser, scheduler, scaler or RNG state) and ``OUT_DIR/model_card.json``: what the
model is for and is not (intended use, limitations), its training data (dataset, case counts,
whether it was generated), architecture, data contract, training arguments, each fold's
validation Dice and weights digest, the evaluation summary of this run when ``--evaluation``
names an ``evaluate.py`` output, the code version and the usage line. Local absolute paths are
shortened to their last part. ``predict.py --run OUT_DIR`` uses the folder as it uses a training
run folder, after checking it against the card (:mod:`strokeseg.inference.model_folders`).

The export is built beside ``OUT_DIR`` (``OUT_DIR.partial-*``) and moved into place when
complete; ``--overwrite`` replaces a previous export whole (no fold of it survives), and only
after the new one is complete. Checkpoints without a data contract are refused, and so are folds
whose training stopped early and empty fold folders unless ``--allow-unfinished``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import models

from .datasets.contract import DataContract, contract_from_checkpoint
from .core.io import CaseError, one_line, read_json, write_json
from .core.runner import get_logger
from .datasets.synthetic import is_generated
from .inference.fold_models import discover_checkpoints, unfinished_training
from .inference.model_folders import CARD_FORMAT, CARD_NAME, EXPORT_KEY, empty_fold_folders
from .inference.prediction import code_version, shared_contract, stored_contract

__all__ = ["KEPT_KEYS", "export_checkpoint", "evaluation_record", "training_data", "model_card", "export_run", "main"]

# Checkpoint entries an exported model keeps besides format_version, model_config and weights.
KEPT_KEYS = ("config", "init", "val_cases", "data_contract", "epoch", "best_score", "history")


def export_checkpoint(source: Path, target: Path, allow_unfinished: bool = False) -> dict:
    """Rebuild ``source``'s network (strict) and write it to ``target`` with :data:`KEPT_KEYS`
    only, marked as exported (:data:`strokeseg.inference.model_folders.EXPORT_KEY`) and, when its
    training stopped early, with "unfinished" (read by
    :func:`strokeseg.inference.fold_models.unfinished_training`, as last.pth is not exported).
    Returns the exported checkpoint's entries (weights left out). Raises :class:`CaseError` for an
    unreadable checkpoint, one without a data contract prediction can use, or an unfinished
    training unless ``allow_unfinished``."""
    try:
        model, checkpoint = models.model_from_checkpoint(source)
    except (FileNotFoundError, ValueError) as err:
        raise CaseError(one_line(err)) from err
    stored_contract(checkpoint, source)
    unfinished = unfinished_training(source, checkpoint, checkpoint.get("config") or {})
    if unfinished and not allow_unfinished:
        raise CaseError(f"{source}: training {unfinished}; not exported (resume the training, or pass --allow-unfinished)")
    extra = {key: checkpoint[key] for key in KEPT_KEYS if key in checkpoint}
    extra.update({EXPORT_KEY: {"card": CARD_NAME}, **({"unfinished": unfinished} if unfinished else {})})
    models.save_checkpoint(target, model, checkpoint["model_config"], **extra)
    return {**extra, "model_config": checkpoint["model_config"], models.DIGEST_KEY: models.weights_digest(model.state_dict())}


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
    return {"summary": path.name, "dataset": summary.get("dataset"), "split": summary.get("split"), "preset": summary.get("preset"), "runs": runs}


def _data_folders(contract: DataContract) -> tuple[str | None, bool]:
    """The name of the preprocessed data folder the contract records, and whether the raw data
    its preprocessing stage read was generated (:func:`strokeseg.datasets.synthetic.is_generated`)."""
    source = contract.preprocessing.get("source")
    if not source:
        return None, False
    try:
        stage_args = read_json(source).get("args", {})
    except (CaseError, AttributeError):
        stage_args = {}
    folders = [value for value in stage_args.values() if isinstance(value, str) and Path(value).is_dir()]
    return Path(source).parent.name, any(is_generated(folder) for folder in folders)


def training_data(contracts: Sequence[DataContract]) -> dict:
    """The card's "training_data": dataset, preprocessed data folder (name only), whether the data
    was generated, and the numbers of distinct training and validation cases over the folds
    (None when not recorded)."""
    folder, generated = _data_folders(contracts[0])

    def count(kind: str) -> int | None:
        lists = [getattr(c, kind) for c in contracts]
        return None if any(cases is None for cases in lists) else len({case for cases in lists for case in cases})

    cases = None if count("train_cases") is None or count("val_cases") is None else len({x for c in contracts for x in (*c.train_cases, *c.val_cases)})
    return {"dataset": contracts[0].dataset, "data": "synthetic (generated by strokeseg.datasets.synthetic)" if generated else folder,
            "synthetic": generated, "train_cases": count("train_cases"), "val_cases": count("val_cases"), "cases": cases}


def _limitations(data: Mapping[str, Any], unfinished: Mapping[str, str]) -> list[str]:
    notes = [
        f"Trained on {data['cases'] if data['cases'] is not None else 'an unrecorded number of'} {data['dataset']} cases; "
        "scanners, protocols and populations unlike them may give worse masks, and nothing here measures how much.",
        "Validation Dice per fold is on the cases that selected its checkpoint (optimistic); the evaluation entry, when present, "
        "is on held-out test cases.",
        "Inputs must be preprocessable as the data contract states (modalities, orientation, intensities); "
        "predict.py refuses inputs its preprocessing stage refuses, not every unsuitable image.",
    ]
    if data["synthetic"]:
        notes.insert(0, "Trained on generated (synthetic) data only: it has never seen a real patient; for testing the pipeline, not for any use on patients.")
    notes += [f"{fold}: training {state}." for fold, state in unfinished.items()]
    return notes


def _without_local_paths(value: Any) -> Any:
    """``value`` with every absolute path string shortened to its last part (a card is shared)."""
    if isinstance(value, dict):
        return {key: _without_local_paths(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_local_paths(item) for item in value]
    return Path(value).name if isinstance(value, str) and os.path.isabs(value) else value


def model_card(run_dir: Path, out_dir: Path, checkpoints: Mapping[int, Mapping[str, Any]], evaluation: dict | None) -> dict:
    """model_card.json content from the exported fold checkpoints (fold -> checkpoint entries
    from :func:`export_checkpoint`); ``out_dir`` as the user gave it (the usage line's --run)."""
    first = checkpoints[min(checkpoints)]
    contracts = [contract_from_checkpoint(checkpoint, run_dir) for checkpoint in checkpoints.values()]
    folds = {
        f"fold_{fold}": {
            "file": f"fold_{fold}/best_model.pth", "weights_sha256": checkpoint[models.DIGEST_KEY],
            "validation_dice": checkpoint.get("best_score"), "best_epoch": checkpoint.get("epoch"), "unfinished": checkpoint.get("unfinished"),
            "init": checkpoint.get("init"), "val_cases": checkpoint.get("val_cases"), "train_cases": checkpoint["data_contract"].get("train_cases"),
        }
        for fold, checkpoint in sorted(checkpoints.items())
    }
    data = training_data(contracts)
    shared = shared_contract(contracts[0])
    card = {
        "format": CARD_FORMAT,
        "name": run_dir.resolve().name,
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "code_version": code_version(),
        "intended_use": f"Research: segmenting ischemic stroke lesions in {data['dataset']}-like {'+'.join(shared['input_keys'])} MRI, preprocessed as "
                        "the data contract states, with predict.py. Not a medical device; not for diagnosis or treatment decisions.",
        "limitations": _limitations(data, {name: fold["unfinished"] for name, fold in folds.items() if fold["unfinished"]}),
        "training_data": data,
        "architecture": first["model_config"],
        "data_contract": shared,
        "training_arguments": first.get("config"),
        "folds": folds,
        "evaluation": evaluation,
        "usage": f"python predict.py --input DATA --run {out_dir.name if out_dir.is_absolute() else out_dir} --output-dir OUT",
    }
    return _without_local_paths(card)


def _swap_in(built: Path, out_dir: Path) -> None:
    """Move the complete export ``built`` to ``out_dir``; a previous export there is moved
    aside first and deleted only once the new one is in place (put back if that move fails)."""
    if not out_dir.exists():
        os.rename(built, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.old-", dir=out_dir.parent))
    os.rename(out_dir, old / out_dir.name)
    try:
        os.rename(built, out_dir)
    except OSError:
        os.rename(old / out_dir.name, out_dir)
        raise
    shutil.rmtree(old)


def _check_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing export without ``overwrite`` and any other non-empty folder; remove
    the half-built exports a killed export left beside ``out_dir``."""
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / CARD_NAME).exists():
            raise CaseError(f"{out_dir}: exists and is not an exported model (no {CARD_NAME}); choose another folder")
        if not overwrite:
            raise CaseError(f"{out_dir}: holds an exported model ({CARD_NAME}); use --overwrite to replace it")
    elif out_dir.exists() and not out_dir.is_dir():
        raise CaseError(f"{out_dir}: exists and is not a folder")
    leftovers = [f"{out_dir.name}.partial-*", *([f"{out_dir.name}.old-*"] if out_dir.exists() else [])]
    for leftover in (path for pattern in leftovers for path in out_dir.parent.glob(pattern)) if out_dir.parent.is_dir() else ():
        shutil.rmtree(leftover, ignore_errors=True)


def export_run(run_dir: Path, out_dir: Path, folds: Sequence[int] | None, evaluation: Path | None, overwrite: bool, allow_unfinished: bool = False) -> dict:
    """Export every ``fold_<k>/best_model.pth`` of ``run_dir`` (or ``folds``) to ``out_dir``
    (built beside it, then swapped in whole). Returns the card. Raises :class:`CaseError` for
    bad input, an existing export without ``overwrite``, or (unless ``allow_unfinished``) an
    unfinished fold or a fold folder without a checkpoint; OSError when writing fails."""
    _check_target(out_dir, overwrite)
    found = discover_checkpoints(run_dir, folds)
    empty = empty_fold_folders(run_dir) if folds is None else []
    if empty and not allow_unfinished:
        raise CaseError(f"{empty[0]}: fold folder without best_model.pth (training not finished, or failed); export chosen folds with --folds, or pass --allow-unfinished")
    for folder in empty:
        get_logger().info(f"WARNING {folder}: fold folder without best_model.pth; not exported")
    record = evaluation_record(evaluation, run_dir) if evaluation is not None else None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    built = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        checkpoints = {fold: export_checkpoint(path, built / f"fold_{fold}" / "best_model.pth", allow_unfinished) for fold, path in found.items()}
        card = model_card(run_dir, out_dir, checkpoints, record)
        write_json(built / CARD_NAME, card)
        _swap_in(built, out_dir)
    finally:
        shutil.rmtree(built, ignore_errors=True)
    return card


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m strokeseg.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="training run folder with fold_<k>/best_model.pth")
    parser.add_argument("out_dir", type=Path, help="folder for the exported model (not inside the repository's models/ package)")
    parser.add_argument("--folds", type=int, nargs="+", help="folds to export (default: every fold found)")
    parser.add_argument("--evaluation", type=Path, help="evaluate.py output folder (or its summary.json) to put in the model card")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export in out_dir whole (the new one is built beside it first)")
    parser.add_argument("--allow-unfinished", action="store_true", help="export folds whose training stopped before its last epoch (the card says so) and leave out fold folders without a checkpoint")
    args = parser.parse_args(argv)
    log = get_logger()
    try:
        card = export_run(args.run_dir, args.out_dir, args.folds, args.evaluation, args.overwrite, args.allow_unfinished)
    except (CaseError, OSError) as err:
        log.info(f"ERROR {one_line(err)}")
        return 2
    dice = ", ".join(f"{name} {fold['validation_dice']:.4f}" for name, fold in card["folds"].items() if fold["validation_dice"] is not None)
    log.info(f"exported {len(card['folds'])} fold model(s) of {args.run_dir} to {args.out_dir} (validation Dice: {dice or 'not recorded'}); {CARD_NAME} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
