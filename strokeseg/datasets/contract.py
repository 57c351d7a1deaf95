"""The checkpoint data contract: what a model was trained on, stored in every checkpoint.

``strokeseg.training.engine.fit(..., data_contract=...)`` stores the dict built by
:func:`build_data_contract` under ``"data_contract"`` in ``last.pth`` and ``best_model.pth``::

    {"dataset": "ISLES2022",              # a registry name (strokeseg.datasets.registry)
     "input_keys": ["dwi", "adc"],        # npz keys stacked as input channels, in order
     "mask_key": "mask",                  # npz key of the training label
     "window": [96, 96, 96],              # training patch / sliding-window size (voxels)
     "threshold": 0.5,                    # probability >= threshold is lesion
     "preprocessing": {"source": ".../run_args.json", "target_shape": [96, 96, 96], "margin": 4},
     "acquisition": {"dwi_b_value": 1000.0, "adc_unit": 0.001},  # the dataset spec's acquisition
     "fold": 0, "train_cases": [...], "val_cases": [...],
     "fingerprint": {...}}                # the training data's dataset fingerprint, or None
                                          # (strokeseg.datasets.fingerprint; older checkpoints: none)

Evaluation and prediction read it with :func:`read_contract` instead of guessing, and
:func:`check_preprocessing` refuses data preprocessed with other settings. Checkpoints written
before contracts existed load with a one-line note: the contract is derived from their run config
(dataset, input channels, patch size, fold) and their preprocessing settings are unknown, so the
evaluation data cannot be checked against them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import models

from .fingerprint import read_dataset_fingerprint
from .registry import DatasetSpec, dataset_names, dataset_spec, spec_named_like
from ..core.io import CaseError
from ..core.runner import get_logger

__all__ = ["THRESHOLD", "DataContract", "build_data_contract", "contract_from_checkpoint", "read_contract", "preprocessing_differences", "check_preprocessing", "check_pretrained"]

THRESHOLD = 0.5  # probability >= THRESHOLD is lesion (validation, evaluation, prediction)


@dataclass(frozen=True)
class DataContract:
    """A checkpoint's data contract, typed (see the module docstring for the stored form).

    window: (X, Y, Z) voxels. preprocessing: {"source": file, setting: value} ({}: unknown).
    train_cases / val_cases: case ids (None: not recorded). derived: True when the checkpoint
    holds no contract and this one was derived from its run config (older checkpoints).
    fingerprint: the summary of the training folder's ``dataset_fingerprint.json``
    (:mod:`strokeseg.datasets.fingerprint`); None when it had none (older checkpoints).
    acquisition: facts about the training images prediction reproduces (DatasetSpec.acquisition:
    ``dwi_b_value`` s/mm², ``adc_unit`` mm²/s); contracts stored before it was recorded, and
    derived ones, take the dataset spec's.
    """

    dataset: str
    input_keys: tuple[str, ...]
    mask_key: str
    window: tuple[int, int, int]
    threshold: float
    preprocessing: dict[str, Any]
    fold: int | None
    train_cases: tuple[str, ...] | None
    val_cases: tuple[str, ...] | None
    derived: bool = False
    fingerprint: dict[str, Any] | None = None
    acquisition: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The JSON-able form stored in checkpoints."""
        return {
            "dataset": self.dataset,
            "input_keys": list(self.input_keys),
            "mask_key": self.mask_key,
            "window": list(self.window),
            "threshold": self.threshold,
            "preprocessing": dict(self.preprocessing),
            "acquisition": dict(self.acquisition),
            "fold": self.fold,
            "train_cases": None if self.train_cases is None else list(self.train_cases),
            "val_cases": None if self.val_cases is None else list(self.val_cases),
            "fingerprint": self.fingerprint,
        }


def _cube(window: int | Sequence[int]) -> tuple[int, int, int]:
    size = (window,) * 3 if isinstance(window, int) else tuple(window)
    if len(size) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"window must be a positive int or 3 positive ints (voxels), got {window!r}")
    return size  # type: ignore[return-value]


def build_data_contract(
    dataset: str,
    case_dir: str | Path,
    input_keys: Sequence[str],
    window: int | Sequence[int],
    fold: int,
    train_cases: Sequence[str],
    val_cases: Sequence[str],
) -> dict[str, Any]:
    """The contract of a training run on ``case_dir`` (the folder of ``<case>.npz``), as stored.

    Preprocessing settings are read with the dataset spec's ``read_preprocessing`` (the stage's
    run_args.json); a folder that records none gives {} and a logged note. The folder's dataset
    fingerprint (:func:`strokeseg.datasets.fingerprint.read_dataset_fingerprint`) goes along when
    it has one. ``input_keys`` must be keys the dataset provides. Raises ValueError for an unknown
    dataset or key.
    """
    spec = dataset_spec(dataset)
    unknown = [key for key in input_keys if key not in spec.input_keys]
    if unknown:
        raise ValueError(f"input key(s) {unknown} are not {dataset} inputs {list(spec.input_keys)}")
    preprocessing = spec.read_preprocessing(Path(case_dir))
    if not preprocessing:
        get_logger().info(f"NOTE {case_dir}: no run_args.json of a preprocessing stage; the checkpoint records no preprocessing settings")
    contract = DataContract(
        spec.name, tuple(input_keys), spec.mask_key, _cube(window), THRESHOLD, preprocessing, int(fold),
        tuple(train_cases), tuple(val_cases), fingerprint=read_dataset_fingerprint(case_dir), acquisition=dict(spec.acquisition),
    )
    return contract.as_dict()


def _from_stored(raw: Mapping[str, Any], where: str) -> DataContract:
    try:
        return DataContract(
            dataset=str(raw["dataset"]),
            input_keys=tuple(str(k) for k in raw["input_keys"]),
            mask_key=str(raw["mask_key"]),
            window=_cube(raw["window"]),
            threshold=float(raw["threshold"]),
            preprocessing=dict(raw.get("preprocessing") or {}),
            fold=None if raw.get("fold") is None else int(raw["fold"]),
            train_cases=None if raw.get("train_cases") is None else tuple(raw["train_cases"]),
            val_cases=None if raw.get("val_cases") is None else tuple(raw["val_cases"]),
            fingerprint=_fingerprint(raw.get("fingerprint")),
            acquisition=dict(raw["acquisition"]) if raw.get("acquisition") is not None else _spec_acquisition(str(raw["dataset"])),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CaseError(f"{where}: invalid data_contract ({type(err).__name__}: {err})") from err


def _fingerprint(raw: Any) -> dict[str, Any] | None:
    if raw is not None and not isinstance(raw, dict):
        raise TypeError(f"fingerprint must be an object or null, got {type(raw).__name__}")
    return raw


def _spec_acquisition(dataset: str) -> dict[str, float]:
    """The registered spec's acquisition facts ({} for a dataset not registered)."""
    return dict(dataset_spec(dataset).acquisition) if dataset in dataset_names() else {}


def _former_dataset(run_config: Mapping[str, Any], where: str) -> DatasetSpec:
    """The dataset of a checkpoint without a contract: its run config's "dataset" (any case),
    else the dataset whose training script's data-folder argument it holds."""
    named = run_config.get("dataset")
    if named is not None:
        spec = spec_named_like(str(named))
        if spec is None:
            raise CaseError(f"{where}: run config names dataset {named!r}, which is not registered")
        return spec
    for name in dataset_names():
        spec = dataset_spec(name)
        if spec.run_config_key is not None and spec.run_config_key in run_config:
            return spec
    raise CaseError(f"{where}: no data_contract and its run config names no dataset; retrain or evaluate a newer checkpoint")


def _derived(checkpoint: Mapping[str, Any], where: str) -> DataContract:
    run_config = checkpoint.get("config") or {}
    if not isinstance(run_config, dict):
        raise CaseError(f"{where}: checkpoint 'config' is not a dict")
    spec = _former_dataset(run_config, where)
    model_config = checkpoint["model_config"]
    n = model_config.get("in_channels")
    if not isinstance(n, int) or not 1 <= n <= len(spec.input_keys):
        raise CaseError(
            f"{where}: checkpoint in_channels {n!r} does not match {spec.name}, which provides "
            f"{len(spec.input_keys)} channel(s) {list(spec.input_keys)}"
        )
    arch = models.arch_spec(model_config["arch"])
    patch = model_config["patch_size"] if arch.fixed_input_size else run_config.get("patch_size", arch.default_patch)
    val_cases = checkpoint.get("val_cases")
    try:
        window = _cube(patch)
    except ValueError as err:
        raise CaseError(f"{where}: run config patch_size {patch!r} is not a size in voxels") from err
    fold = run_config.get("fold")
    return DataContract(
        spec.name, spec.input_keys[:n], spec.mask_key, window, THRESHOLD, {}, None if fold is None else int(fold),
        None, tuple(val_cases) if isinstance(val_cases, (list, tuple)) else None, derived=True, acquisition=dict(spec.acquisition),
    )


def contract_from_checkpoint(checkpoint: Mapping[str, Any], where: str | os.PathLike) -> DataContract:
    """The contract of a loaded checkpoint dict (``where`` names it in messages and the note).

    A stored contract is validated; a checkpoint without one gets a derived contract
    (:attr:`DataContract.derived`) and a one-line NOTE in the log. Raises :class:`CaseError`
    for an invalid contract or an older checkpoint whose dataset cannot be told.
    """
    raw = checkpoint.get("data_contract")
    if raw is not None:
        if not isinstance(raw, dict):
            raise CaseError(f"{where}: data_contract is not a dict")
        return _from_stored(raw, str(where))
    contract = _derived(checkpoint, str(where))
    get_logger().info(
        f"NOTE {where}: written before data contracts; derived from its run config: {contract.dataset}, inputs "
        f"{list(contract.input_keys)}, window {'x'.join(map(str, contract.window))}; preprocessing settings unknown, not checked"
    )
    return contract


def read_contract(checkpoint: str | os.PathLike) -> DataContract:
    """The data contract of the checkpoint file ``checkpoint`` (see :func:`contract_from_checkpoint`).

    Raises :class:`CaseError` naming the file for a missing or unreadable checkpoint too.
    """
    try:
        loaded = models.load_checkpoint(checkpoint)
    except (FileNotFoundError, ValueError) as err:
        raise CaseError(" ".join(str(err).split())) from err
    return contract_from_checkpoint(loaded, checkpoint)


def preprocessing_differences(trained: Mapping[str, Any], evaluated: Mapping[str, Any]) -> list[str]:
    """Settings recorded on both sides whose values differ: ``["margin 4 vs 2", ...]``
    (lists and tuples compare equal element-wise; "source" is not a setting)."""
    def normal(value: Any) -> Any:
        return [normal(v) for v in value] if isinstance(value, (list, tuple)) else value

    keys = [key for key in trained if key != "source" and key in evaluated]
    return [f"{key} {normal(trained[key])} vs {normal(evaluated[key])}" for key in keys if normal(trained[key]) != normal(evaluated[key])]


def check_preprocessing(contract: DataContract, case_dir: Path, checkpoint: str | os.PathLike) -> None:
    """Refuse evaluation data in ``case_dir`` preprocessed with other settings than the
    checkpoint's training data: :class:`CaseError` naming both settings and both files.

    Nothing to compare (an older checkpoint, or a folder recording no settings) passes; the
    latter with a logged note.
    """
    if not contract.preprocessing:
        return
    evaluated = dataset_spec(contract.dataset).read_preprocessing(Path(case_dir))
    if not evaluated:
        get_logger().info(f"NOTE {case_dir}: records no preprocessing settings; not checked against {checkpoint}")
        return
    differences = preprocessing_differences(contract.preprocessing, evaluated)
    if differences:
        raise CaseError(
            f"{checkpoint}: trained on data preprocessed with other settings than {case_dir}: "
            f"{'; '.join(differences)} (training {contract.preprocessing.get('source')}, evaluation {evaluated.get('source')}); "
            "preprocess the evaluation data with the training data's settings"
        )


def check_pretrained(checkpoint: str | os.PathLike, label: str, source_dataset: str | None, val_cases: Collection[str], test_cases: Collection[str],
                     fold: int | None = None, allow_fold_mismatch: bool = False) -> DataContract:
    """Refuse a pretrained checkpoint that is not what the run's init ``label`` says, that saw
    cases this fold holds out, or (``fold`` given, the run's) that was trained on another fold
    (the paper pairs stroke fold k with BraTS fold k) unless ``allow_fold_mismatch``; returns its contract.

    Its recorded dataset (data contract; older checkpoints: run config, see
    :func:`contract_from_checkpoint`) must be ``source_dataset`` (a registry name; None: any).
    Leakage: its recorded training cases must include none of this fold's ``val_cases`` and
    ``test_cases``, its validation cases none of ``test_cases`` (selected on the same validation
    cases, as when fine-tuning fold k from fold k, is allowed). Raises :class:`CaseError` naming
    the file; a checkpoint recording no training cases (older ones) is checked as far as it records.
    """
    contract = read_contract(checkpoint)
    source = "run config" if contract.derived else "data contract"
    if source_dataset is not None and contract.dataset != source_dataset:
        raise CaseError(f"{checkpoint}: trained on {contract.dataset} (its {source}), not {source_dataset}: refused as the {label!r} initialisation")
    if fold is not None and contract.fold is not None and contract.fold != fold and not allow_fold_mismatch:
        raise CaseError(f"{checkpoint}: trained on fold {contract.fold} (its {source}), this run is fold {fold}: refused as the {label!r} "
                        f"initialisation (the paper pairs each fold with the same source fold); pass --allow-fold-mismatch to use it anyway")
    trained, selected = set(contract.train_cases or ()), set(contract.val_cases or ())
    leaked = sorted((trained & (set(val_cases) | set(test_cases))) | (selected & set(test_cases)))
    if leaked:
        raise CaseError(
            f"{checkpoint}: trained or validated on {len(leaked)} of this fold's held-out case(s), e.g. {leaked[:5]}: "
            "leakage; pretrain on a split whose training and validation cases exclude this fold's validation and test cases"
        )
    if contract.train_cases is None:
        get_logger().info(f"NOTE {checkpoint}: records no training cases; checked for leakage against its validation cases only")
    return contract
