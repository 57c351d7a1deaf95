"""Fold models: checkpoints found in a run folder, rebuilt from the file alone, checked against the
dataset, and run over one case's inputs (evaluation and prediction load models the same way).

Models are rebuilt from checkpoints alone (:func:`models.model_from_checkpoint`); their input
channels, window and identity are checked against the dataset before any case runs.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

import models

from ..core.io import CaseError, one_line
from ..core.runner import get_logger
from ..datasets.contract import DataContract, contract_from_checkpoint
from ..datasets.registry import dataset_spec
from .inferer import Inferer, inference_window

__all__ = [
    "FoldModel",
    "discover_checkpoints",
    "fold_of_path",
    "load_fold_model",
    "unfinished_training",
    "report_unfinished",
    "predict_probability",
]


_FOLD_DIR = re.compile(r"^fold_(\d+)$")


@dataclass
class FoldModel:
    """A fold's network in eval mode on its device, with what evaluation needs to know about it.

    contract: the checkpoint's data contract (:mod:`strokeseg.datasets.contract`: dataset, input keys,
    window, threshold, preprocessing, case ids); window: sliding-window size (voxels), the
    contract's unless ``--window`` overrides it (see :meth:`window_for`); run_config: the
    training run's arguments stored in the checkpoint ({} when absent); init: the checkpoint's
    initialisation label ("scratch", "brats", "transfer", ...; None when not recorded);
    unfinished: "unfinished (epoch k of N)" when its training stopped early (:func:`unfinished_training`).
    """

    fold: int
    path: Path
    model: nn.Module
    model_config: dict
    run_config: dict
    contract: DataContract
    window: tuple[int, int, int]
    init: str | None = None
    unfinished: str | None = None

    @property
    def channels(self) -> tuple[str, ...]:
        """npz keys stacked as the input channels, in order."""
        return self.contract.input_keys

    @property
    def downsampling(self) -> int:
        """Input voxels per voxel of the network's coarsest grid (the architecture's spec)."""
        return models.arch_spec(self.model_config["arch"]).downsampling

    @property
    def fixed_input_size(self) -> bool:
        """Whether the network runs only at its training window (the architecture's spec)."""
        return models.arch_spec(self.model_config["arch"]).fixed_input_size

    @property
    def val_cases(self) -> tuple[str, ...] | None:
        """The validation case ids the checkpoint was selected on (None when not recorded)."""
        return self.contract.val_cases

    def window_for(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """The window for a volume of spatial ``shape``: the inferer's window rule
        (:func:`strokeseg.inference.inferer.inference_window`) for this network."""
        return inference_window(self.window, shape, self.fixed_input_size)

    def record(self) -> dict:
        """JSON-able description for summary.json."""
        return {
            "path": str(self.path),
            "model_config": self.model_config,
            "window": list(self.window),
            "channels": list(self.channels),
            "init": self.init,
            "unfinished": self.unfinished,
            "run_config": self.run_config,
        }


def discover_checkpoints(run_dir: Path, folds: Sequence[int] | None, name: str = "best_model.pth") -> dict[int, Path]:
    """fold -> ``run_dir/fold_<k>/<name>``: every fold present, or exactly ``folds``.

    Raises :class:`CaseError` when the folder is missing, a requested fold has no checkpoint,
    or no fold folder holds one.
    """
    if not run_dir.is_dir():
        raise CaseError(f"{run_dir}: run folder not found")
    if folds is not None:
        found = {fold: run_dir / f"fold_{fold}" / name for fold in folds}
        missing = [str(path) for path in found.values() if not path.is_file()]
        if missing:
            raise CaseError(f"checkpoint not found: {', '.join(missing)}")
        return found
    found = {}
    for sub in sorted(run_dir.iterdir()):
        match = _FOLD_DIR.match(sub.name)
        if match and (sub / name).is_file():
            found[int(match.group(1))] = sub / name
    if not found:
        raise CaseError(f"{run_dir}: no fold_<k>/{name} found")
    return dict(sorted(found.items()))


def fold_of_path(path: Path) -> int | None:
    """The k of a ``fold_<k>/`` parent folder, else None (then the run config names the fold)."""
    match = _FOLD_DIR.match(path.parent.name)
    return int(match.group(1)) if match else None


def _window(contract: DataContract, model_config: Mapping, forced: Sequence[int] | None, path: Path) -> tuple[int, int, int]:
    """The contract's window, or ``forced`` (--window); a fixed-input-size architecture runs
    only at its training size (a different ``forced`` window is an error)."""
    arch = models.arch_spec(model_config["arch"])
    if forced is None:
        return contract.window
    if arch.fixed_input_size and tuple(forced) != contract.window:
        raise CaseError(
            f"{path}: {arch.name} runs only at its training size {'x'.join(map(str, contract.window))} (fixed input size); "
            f"got --window {' '.join(map(str, forced))}"
        )
    return tuple(int(w) for w in forced)  # type: ignore[return-value]


def _check_fits(contract: DataContract, model_config: Mapping, fold: int | None, dataset: str, path: Path) -> int:
    """The fold of a checkpoint whose contract fits ``dataset``; CaseError otherwise."""
    if contract.dataset != dataset:
        raise CaseError(f"{path}: checkpoint was trained on dataset {contract.dataset!r}, not {dataset}")
    available = dataset_spec(dataset).input_keys
    if any(key not in available for key in contract.input_keys) or len(contract.input_keys) != model_config.get("in_channels"):
        raise CaseError(
            f"{path}: checkpoint reads {list(contract.input_keys)} into in_channels {model_config.get('in_channels')!r}; "
            f"{dataset} provides {list(available)}"
        )
    source = "run config" if contract.derived else "data contract"
    if fold is not None and contract.fold is not None and contract.fold != fold:
        raise CaseError(f"{path}: found as fold {fold} but its {source} says fold {contract.fold}")
    fold = fold if fold is not None else contract.fold
    if fold is None:
        raise CaseError(f"{path}: fold unknown (not under fold_<k>/ and no fold in its {source})")
    return fold


def load_fold_model(path: Path, fold: int | None, dataset: str, device: torch.device, window: Sequence[int] | None) -> FoldModel:
    """Rebuild a checkpoint's network on ``device`` in eval mode, channels-last, and check it fits ``dataset``.

    Everything about the data comes from the checkpoint's data contract
    (:func:`strokeseg.datasets.contract.contract_from_checkpoint`; older checkpoints: derived from the run
    config, with a note). fold: the fold the file was found under (None: the contract's).
    ``window``: overrides the contract's (--window). Raises :class:`CaseError` for a missing or
    unreadable file, a contract naming another dataset or fold, input keys the dataset does not
    provide, or a forced window a fixed-input-size network cannot run.
    """
    try:
        model, checkpoint = models.model_from_checkpoint(path, map_location=device)
    except (FileNotFoundError, ValueError) as err:
        raise CaseError(one_line(err)) from err
    run_config = checkpoint.get("config") or {}
    if not isinstance(run_config, dict):
        raise CaseError(f"{path}: checkpoint 'config' is not a dict")
    contract = contract_from_checkpoint(checkpoint, path)
    model_config = checkpoint["model_config"]
    fold = _check_fits(contract, model_config, fold, dataset, path)
    init = checkpoint.get("init")
    models.prepare_for_inference(model)  # eval, BatchNorm folded, channels-last: the layout the inferer feeds
    return FoldModel(
        fold=int(fold),
        path=path,
        model=model,
        model_config=model_config,
        run_config=run_config,
        contract=contract,
        window=_window(contract, model_config, window, path),
        init=init.get("label") if isinstance(init, dict) else run_config.get("init"),
        unfinished=unfinished_training(path, checkpoint, run_config),
    )


def unfinished_training(path: Path, checkpoint: Mapping, run_config: Mapping) -> str | None:
    """"unfinished (epoch k of N)" when the training of the checkpoint at ``path`` stopped before
    its N epochs (the run config's "epochs"), else None.

    k is the number of epochs completed, read from ``last.pth`` beside ``path`` (the trainer
    writes it after every epoch and on preemption, before best_model.pth; ``checkpoint`` itself
    when ``path`` is that file): best_model.pth holds the best epoch, not the last. None too when
    N or last.pth is not there (a run whose last.pth was deleted cannot be told apart). An exported
    checkpoint (no last.pth) records the state under "unfinished" (:mod:`strokeseg.export`).
    Raises :class:`CaseError` for an unreadable last.pth.
    """
    if isinstance(checkpoint.get("unfinished"), str):
        return checkpoint["unfinished"]
    planned = run_config.get("epochs")
    last = path.parent / "last.pth"
    if not isinstance(planned, int) or not last.is_file():
        return None
    if last.resolve() == path.resolve():
        done = checkpoint.get("epoch")
    else:
        try:
            done = models.load_checkpoint(last).get("epoch")
        except (FileNotFoundError, ValueError) as err:
            raise CaseError(f"{one_line(err)} (read to tell whether {path} finished training)") from err
    return f"unfinished (epoch {done} of {planned})" if isinstance(done, int) and done < planned else None


def report_unfinished(labelled: Iterable[tuple[str, FoldModel]], allowed: bool, consequence: str) -> bool:
    """The rule of evaluate.py and predict.py for folds whose training stopped early: one log line
    per (label, fold model) with :attr:`FoldModel.unfinished` set, "ERROR <label> fold_<k> (<path>):
    training unfinished (epoch k of N); <consequence> (resume the training, or pass
    --allow-unfinished)", a NOTE instead of an ERROR when ``allowed``. Returns True when such a
    fold exists and is not allowed (the caller refuses or fails)."""
    unfinished = [(label, fm) for label, fm in labelled if fm.unfinished]
    for label, fm in unfinished:
        get_logger().info(f"{'NOTE' if allowed else 'ERROR'} {label} fold_{fm.fold} ({fm.path}): training {fm.unfinished}; {consequence} "
                          f"(resume the training, or pass --allow-unfinished)")
    return bool(unfinished) and not allowed


def predict_probability(inputs: Mapping[str, np.ndarray], fold_model: FoldModel, inferer: Inferer) -> np.ndarray:
    """Foreground probability float32 (X, Y, Z) on the inference grid of ``inputs`` (npz key ->
    float32 (X, Y, Z), e.g. :meth:`strokeseg.core.case.Case.arrays`): ``inferer`` run with the fold model's
    network, window, downsampling and fixed input size (:class:`strokeseg.inference.inferer.Inferer`).
    A non-finite probability raises :class:`CaseError` naming the checkpoint."""
    volume = np.stack([inputs[key] for key in fold_model.channels])
    predictor = functools.partial(models.foreground_probability, fold_model.model)
    probability = inferer(volume, predictor, fold_model.window, fold_model.downsampling, fold_model.fixed_input_size)
    bad = int(np.count_nonzero(~np.isfinite(probability)))
    if bad:  # never thresholded into an empty mask
        raise CaseError(f"{fold_model.path}: {bad} non-finite probabilities (NaN/inf) at precision {inferer.resolved_precision}; the model's weights or this input are broken")
    return probability
