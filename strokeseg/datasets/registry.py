"""The dataset registry: one :class:`DatasetSpec` per dataset, looked up by its name.

Each spec is defined beside its dataset's preprocessing code (ISLES 2022 in
:mod:`strokeseg.datasets.isles`, ATLAS and UOA in :mod:`strokeseg.datasets.foundation`, BraTS 2024 in
:mod:`strokeseg.datasets.brats`) and registered there; the training scripts, evaluation, reports and
the checkpoint data contract read every dataset fact from it and never compare dataset names.
Add a dataset with :func:`register_dataset` (see README "Extending").

A cohort that needs no new preprocessing math (any T1w dataset) is a ``datasets`` entry of
config.json and nothing else: the first look-up registers every entry of :func:`config_path`
(:func:`strokeseg.datasets.foundation.register_config_datasets`). Every case, whatever the
stage, is a :class:`strokeseg.core.case.Case`.
"""
from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence


from ..core.case import Case
from ..core.io import CaseError, read_json

__all__ = [
    "DatasetSpec",
    "register_dataset",
    "dataset_spec",
    "dataset_names",
    "registered_names",
    "config_path",
    "CONFIG_ENV",
    "spec_named_like",
    "same_folder",
    "settings_from_run_args",
    "RUN_ARGS_NAME",
    "SCORING_GRIDS",
]

SCORING_GRIDS = ("native", "preprocessed")
RUN_ARGS_NAME = "run_args.json"  # what every stage writes into its output folder
# Modules whose import registers the built-in datasets (imported on the first look-up, so the
# registry module itself imports no dataset code).
_BUILTIN_MODULES = ("strokeseg.datasets.isles", "strokeseg.datasets.foundation", "strokeseg.datasets.brats")


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the pipeline needs to know about one dataset.

    name: the key in splits files, checkpoints and ``--dataset``; display_name: in tables.
    input_keys: npz keys of the network inputs, in channel order (a model may read a prefix,
    e.g. DWI only); mask_key: npz key of the training label; brain_key: npz key of a brain mask
    (None: no brain mask; random training patches then come from the whole volume).
    splits_name: the splits file the preprocessing stage writes into the case folder.
    preset: metrics preset (:data:`strokeseg.core.metrics.PRESETS`); table_layout: the paper table
    of :func:`strokeseg.evaluation.report.results_markdown` ("strategy": Strategy | Init | Mean DSC;
    "dataset": the ATLAS/UOA table); pretrained_label: a pretrained start in that table
    ("BraTS", "Transfer"). whole_brain: volumes hold the whole head or brain (not cropped to it),
    so inference may first crop to the brain. find_case_dir(data_dir, name): the folder holding
    ``<case>.npz`` given what a user passes as ``--data-dir``. read_preprocessing(case_dir):
    the settings that shaped the files of a case folder, ``{"source": <file>, <setting>: value}``
    ({} when the folder records none). load_eval_case(case_dir, case_id, input_keys): a
    :class:`~strokeseg.core.case.Case` of the network inputs (``input_keys``, on the inference
    grid) and the label (bool, on the scoring grid, its affine and zooms the scoring grid's);
    ``meta`` ``bbox`` (3, 2) [start, stop) and ``cropped_shape`` map the inference grid onto the
    scoring grid (absent when the two are one). None: the dataset is not evaluated by
    ``evaluate.py``. run_config_key: the
    training script's data-folder argument that identifies the dataset in checkpoints written
    before data contracts (None: such checkpoints name it as "dataset"). bids_suffixes:
    (modality key, BIDS file suffixes in lower case) pairs that name the raw files of each input
    key and of the reference ("mask"), e.g. ("dwi", ("dwi",)): how prediction finds them and
    tells a wrong modality. modalities: (image key, glob relative to the raw dataset root) pairs
    in channel order, and label_pattern the glob of the lesion masks ("" when the reader finds
    its files another way). reader(root): the raw cases under ``root``, sorted by id, as
    :class:`~strokeseg.core.case.Case` s whose ``sources`` name the files (images not read yet;
    a pairing problem in ``meta["problem"]``). prepare(case, settings): a read native case ->
    the network input, a Case on the network grid (keys ``input_keys``; label resampled when the
    native case has one) whose ``meta`` holds ``bbox`` (3, 2) [start, stop) and
    ``cropped_shape``, the native region that grid covers, and anything else the stage records;
    ``settings`` are the preprocessing settings (a stage folder's or a data contract's). The
    same ``prepare`` serves the preprocessing stage and prediction; validate_settings(settings,
    where) raises ValueError naming ``where`` for settings ``prepare`` cannot apply (checked
    before any case runs). scoring_grid: "native" (the
    reference on the raw grid; predictions are mapped back) or "preprocessed". split_group(case
    id) -> patient id: the cases one patient contributes stay on one side of every split (None:
    each case its own group). patch_size: default training patch edge in voxels (None: the
    architecture's). id_markers: where the case id ends in a raw file name (earliest marker
    wins, :func:`strokeseg.datasets.foundation.case_id_from_filename`; empty: the name without its
    ``_<suffix>``). acquisition: facts about the training images that prediction
    reproduces, recorded in every data contract (:func:`strokeseg.datasets.contract.build_data_contract`):
    ``dwi_b_value`` (s/mm², the b-value of the DWI the network was trained on) and ``adc_unit``
    (mm²/s per stored ADC unit, e.g. 1e-3).
    """

    name: str
    display_name: str
    input_keys: tuple[str, ...]
    mask_key: str
    splits_name: str
    preset: str
    table_layout: str
    whole_brain: bool
    find_case_dir: Callable[[Path, str], Path]
    read_preprocessing: Callable[[Path], dict[str, Any]]
    load_eval_case: Callable[[Path, str, Sequence[str]], Case] | None = None
    brain_key: str | None = None
    pretrained_label: str = "Transfer"
    run_config_key: str | None = None
    bids_suffixes: tuple[tuple[str, tuple[str, ...]], ...] = ()
    acquisition: tuple[tuple[str, float], ...] = ()
    modalities: tuple[tuple[str, str], ...] = ()
    label_pattern: str = ""
    reader: Callable[[Path], list[Case]] | None = None
    prepare: Callable[[Case, Mapping[str, Any]], Case] | None = None
    validate_settings: Callable[[Mapping[str, Any], Any], object] | None = None
    scoring_grid: str = "preprocessed"
    split_group: Callable[[str], str] | None = None
    patch_size: int | None = None
    id_markers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.scoring_grid not in SCORING_GRIDS:
            raise ValueError(f"dataset {self.name!r}: scoring_grid must be one of {SCORING_GRIDS}, got {self.scoring_grid!r}")

    def case_dir(self, data_dir: str | Path) -> Path:
        """The folder holding this dataset's ``<case>.npz`` under ``data_dir`` (checked to exist)."""
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise CaseError(f"{data_dir}: data folder not found")
        return self.find_case_dir(data_dir, self.name)


CONFIG_ENV = "STROKESEG_CONFIG"  # a config.json whose datasets to register instead of the repository's
_REPOSITORY_CONFIG = Path(__file__).resolve().parents[2] / "config.json"
_DATASETS: dict[str, DatasetSpec] = {}
_loaded = False
_configs_read: set[Path] = set()


def config_path() -> Path:
    """The config.json whose ``datasets`` entries the registry adds on look-up: the file named
    by the environment variable ``STROKESEG_CONFIG`` when set, else the repository's config.json."""
    named = os.environ.get(CONFIG_ENV)
    return Path(named).resolve() if named else _REPOSITORY_CONFIG


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
    path = config_path()
    if path not in _configs_read:
        importlib.import_module("strokeseg.datasets.foundation").register_config_datasets(path)
        _configs_read.add(path)


def registered_names() -> tuple[str, ...]:
    """The names registered so far, without loading built-ins or config entries."""
    return tuple(_DATASETS)


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` to the registry; a name registered twice is a ValueError."""
    if spec.name in _DATASETS:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    _DATASETS[spec.name] = spec
    return spec


def dataset_names() -> tuple[str, ...]:
    """Registered dataset names, built-ins first."""
    _load_builtins()
    return tuple(_DATASETS)


def dataset_spec(name: str) -> DatasetSpec:
    """The spec registered as ``name``; an unknown name is a ValueError listing the known ones."""
    _load_builtins()
    spec = _DATASETS.get(name)
    if spec is None:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(_DATASETS)}")
    return spec


def spec_named_like(text: str) -> DatasetSpec | None:
    """The spec whose name equals ``text`` ignoring case and non-alphanumerics ("atlas",
    "uoa_private"), else None. Only for run configs of checkpoints without a data contract."""
    _load_builtins()
    key = re.sub(r"[^a-z0-9]", "", text.lower())
    return next((spec for name, spec in _DATASETS.items() if re.sub(r"[^a-z0-9]", "", name.lower()) == key), None)


def same_folder(data_dir: Path, name: str) -> Path:
    """``find_case_dir`` of datasets whose case files sit directly in ``--data-dir``."""
    return data_dir


def settings_from_run_args(case_dir: Path, keys: Sequence[str], within: Sequence[str] = ()) -> dict[str, Any]:
    """``{"source": <case_dir>/run_args.json, key: value}`` for ``keys`` of the stage's recorded
    arguments (:func:`strokeseg.core.runner.write_run_args`: its "args"), looked up inside the nested
    objects ``within`` (e.g. ("resolved_config",
    "preprocessing")); {} when the folder has no run_args.json. A listed key missing from the
    file is recorded as None (the stage did not have that setting)."""
    path = Path(case_dir) / RUN_ARGS_NAME
    if not path.is_file():
        return {}
    values = read_json(path).get("args")
    for key in within:
        values = values.get(key) if isinstance(values, dict) else None
    if not isinstance(values, dict):
        raise CaseError(f"{path}: no {'.'.join(('args', *within))} object")
    return {"source": str(path), **{key: values.get(key) for key in keys}}
