"""Prediction on new data: NIfTI in; lesion masks on the input's native grid, volumes and a
lesion table out (the tables: :mod:`strokeseg.inference.tables`).

A *model set* is the fold checkpoints of one or more training runs (or model folders written
by :mod:`strokeseg.export`) sharing one data contract: the dataset whose preprocessing made the
training data, the input keys in channel order, the threshold and the preprocessing settings.
Each case is read (:func:`read_case`), then preprocessed by its dataset's ``prepare``, the
function the preprocessing stage runs (:attr:`strokeseg.datasets.registry.DatasetSpec.prepare`),
with the contract's settings, predicted with the mean probability of the fold models
(:func:`strokeseg.inference.fold_models.predict_probability`, as ``evaluate.py`` does), mapped back to the
native grid (:func:`strokeseg.core.geometry.uncrop_to_native`, trilinear on probabilities) and
thresholded there.
"""
from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch

import models

from ..datasets.contract import DataContract, contract_from_checkpoint, preprocessing_differences
from ..core.geometry import as_binary_mask, uncrop_to_native
from ..core.case import LABEL, Case
from ..core.case_io import read_images
from ..core.io import CaseError, file_digest, load_nifti, one_line, read_json, save_nifti, write_json
from ..core.runner import CaseResult, RunReport, run_cases
from ..datasets.registry import DatasetSpec, dataset_spec
from .fold_models import FoldModel, discover_checkpoints, load_fold_model
from .inferer import Inferer
from ..core.metrics import PRESETS, case_metrics
from . import qc
from .html_report import save_case_overview
from .uncertainty import STDDEV_SUFFIX, ensemble_mean, fold_probabilities, fold_review, lesion_labels
from .diffusion import log_record, read_diffusion_case
from .inputs import diffusion_items, t1w_items
from .model_folders import check_exported, distinct_runs, empty_fold_folders

__all__ = [
    "MASK_SUFFIX",
    "PROB_SUFFIX",
    "SIDECAR_SUFFIX",
    "ModelSet",
    "InputSpec",
    "PredictOptions",
    "settings_id",
    "voxel_volume_ml",
    "stale_masks",
    "source_images",
    "code_version",
    "stored_contract",
    "shared_contract",
    "load_model_set",
    "discover_cases",
    "read_case",
    "prepare_case",
    "lesion_table",
    "predict_case",
    "predict_cases",
    "write_dataset_description",
]

# Contract keys that may differ between the members of one model set.
_PER_MODEL_KEYS = ("window", "fold", "train_cases", "val_cases", "fingerprint")
MASK_SUFFIX = "_desc-lesion_mask.nii.gz"
PROB_SUFFIX = "_desc-lesion_probseg.nii.gz"
SIDECAR_SUFFIX = "_desc-lesion_mask.json"  # the mask's BIDS sidecar: its source, model and settings


def code_version() -> str:
    """``git describe --always --dirty`` of this checkout, or "unknown" outside a git clone."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


# --------------------------------------------------------------------------- models


def stored_contract(checkpoint: Mapping[str, Any], path: Path) -> DataContract:
    """The data contract stored in a loaded checkpoint (:func:`strokeseg.datasets.contract.contract_from_checkpoint`),
    checked to hold preprocessing settings prediction can apply.

    Raises :class:`CaseError` naming ``path`` when there is none (a checkpoint written before
    contracts were stored: how its training data was preprocessed is unknown), when it records
    no preprocessing settings, names a dataset whose raw data prediction cannot read, or holds
    invalid settings.
    """
    if checkpoint.get("data_contract") is None:
        raise CaseError(f"{path}: checkpoint has no data contract, so how its training data was preprocessed is unknown; retrain it with this version to use it for prediction")
    contract = contract_from_checkpoint(checkpoint, path)
    if not contract.preprocessing:
        raise CaseError(f"{path}: data contract records no preprocessing settings (its training data had no run_args.json); prediction cannot reproduce them")
    try:
        spec = dataset_spec(contract.dataset)
        if spec.prepare is None:
            raise ValueError(f"{path}: dataset {spec.name} has no prepare function; prediction cannot preprocess its raw data")
        if spec.validate_settings is not None:
            spec.validate_settings(contract.preprocessing, f"{path}: data contract")
    except (ValueError, TypeError) as err:
        raise CaseError(one_line(err)) from err
    return contract


@dataclass
class ModelSet:
    """Fold models with one data contract. label: the run folder names joined by '+';
    members: "fold_<k>" per model (prefixed "<run>/" when several runs are combined);
    empty_folds: ``fold_<k>`` folders found without a checkpoint (not used)."""

    fold_models: list[FoldModel]
    contract: DataContract
    label: str
    members: list[str]
    empty_folds: list[Path] = field(default_factory=list)

    @property
    def spec(self) -> DatasetSpec:
        return dataset_spec(self.contract.dataset)

    @property
    def unfinished(self) -> dict[str, str]:
        """member -> "unfinished (epoch k of N)" for the models whose training stopped early."""
        return {member: fm.unfinished for member, fm in zip(self.members, self.fold_models) if fm.unfinished}


def _load_member(path: Path, fold: int, device: torch.device) -> tuple[FoldModel, DataContract, dict]:
    try:
        checkpoint = models.load_checkpoint(path)
        contract = stored_contract(checkpoint, path)
    except (FileNotFoundError, ValueError) as err:
        raise CaseError(one_line(err)) from err
    fold_model = load_fold_model(path, fold, contract.dataset, torch.device("cpu"), None)
    fold_model.model.to(device)
    return fold_model, contract, {key: value for key, value in checkpoint.items() if key != "model"}


def shared_contract(contract: DataContract) -> dict:
    """The part of a data contract (as stored) that every model of one model set shares: all
    but window, fold and the case lists."""
    return {key: value for key, value in contract.as_dict().items() if key not in _PER_MODEL_KEYS}


def _contract_differences(a: DataContract, b: DataContract) -> list[str]:
    """What differs between two contracts beyond window, fold and case lists: key names, and
    for preprocessing each differing setting (:func:`strokeseg.datasets.contract.preprocessing_differences`)."""
    shared_a, shared_b = shared_contract(a), shared_contract(b)
    keys = [key for key in shared_a if key != "preprocessing" and shared_a[key] != shared_b.get(key)]
    return keys + preprocessing_differences(a.preprocessing, b.preprocessing)


def load_model_set(run_dirs: Sequence[Path], folds: Sequence[int] | None, device: torch.device) -> ModelSet:
    """Every ``fold_<k>/best_model.pth`` of each run or model folder (only ``folds`` when
    given), rebuilt on ``device`` in eval mode. Raises :class:`CaseError` for a folder given
    twice, a missing folder or checkpoint, a checkpoint without a valid data contract, an
    exported folder that differs from its model card
    (:func:`strokeseg.inference.model_folders.check_exported`), or members whose contracts differ
    in anything but window, fold and case lists."""
    distinct_runs(run_dirs)
    fold_models, members, empty, contract, first = [], [], [], None, None
    for run_dir in map(Path, run_dirs):
        loaded = {fold: _load_member(path, fold, device) for fold, path in discover_checkpoints(run_dir, folds).items()}
        check_exported(run_dir, {fold: member[2] for fold, member in loaded.items()})
        empty += empty_fold_folders(run_dir) if folds is None else []
        for fold, (fold_model, found, _) in loaded.items():
            if contract is None:
                contract, first = found, fold_model.path
            elif _contract_differences(contract, found):
                differ = "; ".join(_contract_differences(contract, found))
                raise CaseError(f"{fold_model.path}: data contract differs from {first}'s: {differ}; models of one prediction must share it")
            fold_models.append(fold_model)
            members.append(f"fold_{fold}" if len(run_dirs) == 1 else f"{run_dir.name}/fold_{fold}")
    label = "+".join(Path(run_dir).resolve().name for run_dir in run_dirs)
    return ModelSet(fold_models, contract, label, members, empty)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class InputSpec:
    """Where the cases are: a folder (``input_dir``; T1w data also needs ``image_pattern``, a
    glob relative to it, and optionally ``mask_pattern``), or single files (``dwi`` with an
    optional ``adc``, or ``image``), each with an optional reference ``mask``. input_keys: the
    model's (empty: its dataset's); modalities: ``--modality`` (key, glob) pairs; case_id: the
    single files' case id (None: from the file name); dwi_volume: the volume of a 4-D DWI (None:
    by b-value). See :mod:`strokeseg.inference.inputs`."""

    input_dir: Path | None = None
    dwi: Path | None = None
    adc: Path | None = None
    image: Path | None = None
    mask: Path | None = None
    image_pattern: str | None = None
    mask_pattern: str = ""
    input_keys: tuple[str, ...] = ()
    modalities: tuple[tuple[str, str], ...] = ()
    case_id: str | None = None
    dwi_volume: int | None = None


def _grid_source(case: Case, spec: DatasetSpec) -> Path | None:
    """The image whose grid and header the outputs of ``case`` take: the file of the dataset's
    first input key (None when the case has a pairing problem)."""
    return case.source(spec.input_keys[0])


def _strip_nii(name: str) -> str:
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _bids_folder(source: Path) -> Path | None:
    """The folders of ``source`` from its last ``sub-*`` folder on (``sub-X/ses-Y/dwi``), or None."""
    parts = source.parent.parts
    starts = [i for i, part in enumerate(parts) if part.startswith("sub-")]
    return Path(*parts[starts[-1]:]) if starts else None


def _out_stem(case_id: str, source: Path | None, bids: bool) -> Path:
    """``<case_id>``; in a BIDS tree the source's folders and its entities (the name without
    its ``_<suffix>``): ``sub-X/ses-Y/dwi/sub-X_ses-Y``."""
    if not bids or source is None:
        return Path(case_id)
    stem = _strip_nii(source.name)
    entities = stem.rsplit("_", 1)[0] if "_" in stem else stem
    return _bids_folder(source) / entities  # type: ignore[operator]


def discover_cases(inputs: InputSpec, spec: DatasetSpec) -> tuple[dict[str, Case], bool]:
    """case id -> :class:`~strokeseg.core.case.Case` (not read; ``meta``: ``source``, the image
    whose grid and header the outputs take, None when the case has a pairing problem, and
    ``out_stem``, the output path without suffix, relative to the output folder), found as ``spec``'s preprocessing stage
    finds them (ISLES: layouts A and B; T1w: the glob patterns, paired by case id), and whether
    the output is a BIDS derivatives tree (a folder input whose every image lies under a
    ``sub-*`` folder). Masks are optional. Raises :class:`CaseError` when nothing is found."""
    if _reads_dwi(spec):
        items = diffusion_items(inputs, spec)
    else:
        items = t1w_items(inputs, spec) if "image" in spec.input_keys else _reader_items(inputs, spec)
    sources = {case_id: _grid_source(item, spec) for case_id, item in items.items()}
    found = [source for source in sources.values() if source is not None]
    bids = inputs.input_dir is not None and bool(found) and all(_bids_folder(source) is not None for source in found)
    cases = {case_id: item.replace(meta={"source": sources[case_id], "out_stem": _out_stem(case_id, sources[case_id], bids)}) for case_id, item in items.items()}
    return dict(sorted(cases.items())), bids


def _reader_items(inputs: InputSpec, spec: DatasetSpec) -> dict[str, Case]:
    """Case id -> case found by the dataset's own reader in the ``--input`` folder: a network
    that reads neither a DWI nor a T1w ``image`` (e.g. ISLES 2024: NCCT and perfusion maps)."""
    if inputs.input_dir is None or spec.reader is None:
        raise CaseError(f"this model reads {', '.join(inputs.input_keys or spec.input_keys)} ({spec.name}): give --input, a folder in the dataset's layout")
    return {case.case_id: case for case in spec.reader(inputs.input_dir)}


def _reads_dwi(spec: DatasetSpec) -> bool:
    """Whether the dataset's network reads a DWI: its raw cases may hold a 4-D series and
    computed or differently scaled ADC maps (:mod:`strokeseg.inference.diffusion`)."""
    return "dwi" in spec.input_keys


# --------------------------------------------------------------------------- one case


def read_case(case: Case, contract: DataContract) -> tuple[Case, dict]:
    """Read a discovered case on its native grid for the contract's model: images of the
    contract's input keys (DWI data through :func:`strokeseg.inference.diffusion.read_diffusion_case`:
    4-D series, computed or converted ADC) and the reference label when there is one. Returns
    the case and the record of how its inputs were made (for the mask's sidecar); bad input
    raises :class:`CaseError` (one line naming the file)."""
    spec = dataset_spec(contract.dataset)
    if not _reads_dwi(spec):
        return read_images(case, contract.input_keys, require_label=False), {}
    native, record = read_diffusion_case(case, "adc" in contract.input_keys, contract.acquisition or dict(spec.acquisition))
    log_record(case.case_id, record)
    return native, record


def prepare_case(native: Case, contract: DataContract) -> Case:
    """The network input of a read case: its dataset's ``prepare`` (the preprocessing stage's
    own) with the contract's settings. Returns a Case on the network grid whose ``meta`` holds
    ``bbox`` and ``cropped_shape``, the native region it covers."""
    spec = dataset_spec(contract.dataset)
    if spec.prepare is None:
        raise CaseError(f"{native.case_id}: dataset {spec.name} has no prepare function")
    return spec.prepare(native.replace(label=None), contract.preprocessing)


def _to_native(prepared: Case, shape: tuple[int, int, int], probability: np.ndarray) -> np.ndarray:
    """A network-grid probability of ``prepared`` on its native grid of ``shape`` (trilinear)."""
    return uncrop_to_native(probability, prepared.meta["bbox"], prepared.meta["cropped_shape"], shape, is_label=False)


def lesion_table(mask: np.ndarray, affine: np.ndarray, voxel_ml: float, connectivity: int) -> list[dict]:
    """One dict per connected lesion of ``mask`` (bool (X, Y, Z)): lesion_id (1-based, in
    labelling order), voxels, volume_ml, centroid in world mm (``affine`` applied to the voxel
    centroid: centroid_x_mm, centroid_y_mm, centroid_z_mm)."""
    # Labelled inside the mask's box: the same components in the same order, work for its voxels only.
    labels, count, box = lesion_labels(mask, connectivity)
    if count == 0:
        return []
    coordinates = np.nonzero(labels)
    ids = labels[coordinates]
    voxels = np.bincount(ids, minlength=count + 1)[1:]
    sums = [np.bincount(ids, weights=c.astype(np.float64) + s.start, minlength=count + 1)[1:] for c, s in zip(coordinates, box)]
    centroids = np.stack(sums, axis=1) / voxels[:, None]
    world = centroids @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    return [
        {"lesion_id": i + 1, "voxels": int(voxels[i]), "volume_ml": float(voxels[i]) * voxel_ml,
         "centroid_x_mm": world[i, 0], "centroid_y_mm": world[i, 1], "centroid_z_mm": world[i, 2]}
        for i in range(count)
    ]


def voxel_volume_ml(affine: np.ndarray, zooms: Sequence[float], where: object) -> tuple[float, str | None]:
    """A voxel's volume in ml from the affine (|det| of its 3x3 part, as the centroids use it), and
    a QC warning when the header's pixdim product disagrees by more than 0.1 % (else None)."""
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    pixdim_ml = float(np.prod(zooms)) / 1000.0
    if np.isclose(voxel_ml, pixdim_ml, rtol=1e-3, atol=0.0):
        return voxel_ml, None
    return voxel_ml, (f"{where}: header pixdim gives {pixdim_ml * 1000:.4g} mm3 per voxel but the affine {voxel_ml * 1000:.4g} mm3; "
                      "volumes use the affine (as the centroids do): check the file's header")


def _case_info(case_id: str, mask: np.ndarray, affine: np.ndarray, zooms: Sequence[float], reference: np.ndarray | None, model_set: ModelSet) -> dict:
    """The case's rows: "volume" (lesion_volumes.csv), "lesions" (lesions.csv), "scores" (or
    None), and "qc" (a warning about the header, or None)."""
    preset = model_set.spec.preset
    voxel_ml, header_warning = voxel_volume_ml(affine, zooms, case_id)
    lesions = [{"case_id": case_id, **row} for row in lesion_table(mask, affine, voxel_ml, PRESETS[preset].connectivity)]
    volume = {
        "case_id": case_id,
        "lesion_volume_ml": int(np.count_nonzero(mask)) * voxel_ml,
        "lesion_count": len(lesions),
        "largest_lesion_ml": max((row["volume_ml"] for row in lesions), default=0.0),
        "model": model_set.label,
        "folds": " ".join(model_set.members),
        "unfinished": "; ".join(f"{member}: {state}" for member, state in model_set.unfinished.items()),
    }
    scores = None
    if reference is not None:
        if reference.shape != mask.shape:
            raise CaseError(f"{case_id}: reference mask shape {reference.shape} differs from the prediction's {mask.shape}")
        scores = {"case_id": case_id, **case_metrics(mask, reference, voxel_ml, preset)}
        scores.update(ref_voxels=int(np.count_nonzero(reference)), pred_voxels=int(np.count_nonzero(mask)))
    return {"volume": volume, "lesions": lesions, "scores": scores, "qc": header_warning}


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class PredictOptions:
    """output_dir: where masks, tables and overlays go; inferer: how the networks run;
    save_probabilities: also write the native-grid probability (float32 NIfTI); overwrite:
    predict cases whose mask exists again (default: keep it and read its rows from it)."""

    output_dir: Path
    inferer: Inferer
    save_probabilities: bool = False
    overwrite: bool = False
    settings_id: str = ""  # :func:`settings_id` of the models and settings the folder records
    save_uncertainty: bool = False  # also write the std of the fold probabilities (STDDEV_SUFFIX)


def settings_id(settings: Mapping[str, Any]) -> str:
    """A short stable digest (16 hex digits) of the settings that shape a mask (the models'
    fingerprints, TTA, precision, ...), stored in each mask's sidecar."""
    canonical = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _read_sidecar(sidecar: Path) -> dict:
    """A mask's sidecar as a dict; empty when it is missing or unreadable."""
    try:
        recorded = read_json(sidecar)
    except CaseError:
        return {}
    return recorded if isinstance(recorded, dict) else {}


def _made_with(sidecar: Path, wanted: str) -> bool:
    """Whether the mask of ``sidecar`` was made with the settings of digest ``wanted``."""
    return _read_sidecar(sidecar).get("SettingsId") == wanted


def source_images(case: Case, dataset: str) -> dict[str, Path]:
    """Modality -> the image file of ``case`` the network reads (missing ones left out)."""
    images = {key: case.source(key) for key in dataset_spec(dataset).input_keys}
    return {key: path for key, path in images.items() if path is not None}


def _check_same_source(mask_path: Path, recorded: Mapping[str, Any], images: Mapping[str, Path], digests: Mapping[str, str]) -> None:
    """Refuse (:class:`CaseError` naming both files) to treat an existing mask as this case's
    unless its sidecar records the same image contents: two patients whose files give one case
    id (``p1/case_dwi.nii.gz``, ``p2/case_dwi.nii.gz``) must never share a mask."""
    made_from = recorded.get("SourceDigests")
    if not isinstance(made_from, dict):
        raise CaseError(f"{mask_path} exists but records no digest of its source images (made by an older version), so it cannot be "
                        f"matched to {', '.join(map(str, images.values()))}: use another --output-dir, or --overwrite to predict it again")
    for key, path in images.items():
        if made_from.get(key) != digests[key]:
            sources = recorded.get("Sources") or ["other images"]
            raise CaseError(f"{mask_path} was made from {', '.join(map(str, sources))}, not from {path} ({key} content differs): another patient "
                            f"with the same case id? Use another --output-dir, or --overwrite if {path} replaces that image")


def stale_masks(output_dir: Path, wanted: str) -> list[str]:
    """Masks in ``output_dir`` (any depth) not made with the settings of digest ``wanted``: made
    before an ``--overwrite`` with other models or settings and not predicted again since (or
    without a sidecar). Relative paths, sorted."""
    masks = sorted(output_dir.rglob(f"*{MASK_SUFFIX}"))
    return [str(m.relative_to(output_dir)) for m in masks if not _made_with(m.with_name(m.name.replace(MASK_SUFFIX, SIDECAR_SUFFIX)), wanted)]


def _finished_case(case: Case, mask_path: Path, model_set: ModelSet, recorded: Mapping[str, Any]) -> CaseResult:
    """A case whose mask exists: its rows are read back from that mask (and its reference), its
    quality flags and lesion uncertainty from its sidecar ``recorded``."""
    saved = load_nifti(mask_path, dtype=None)
    mask = saved.data.astype(bool)
    reference = None
    if case.source(LABEL) is not None:
        stored = load_nifti(case.source(LABEL), dtype=None)
        reference = as_binary_mask(stored.data, stored.path).astype(bool)
    info = _case_info(case.case_id, mask, saved.affine, saved.zooms, reference, model_set)
    qc.annotate_rows(info, recorded)
    return CaseResult(case.case_id, "skipped", reason=f"{mask_path} exists (use --overwrite)", info=info)


def predict_case(case: Case, model_set: ModelSet, options: PredictOptions) -> CaseResult:
    """Preprocess, predict and write one case: ``<out_stem>_desc-lesion_mask.nii.gz`` (uint8
    {0,1}, the source image's grid, affine and header geometry; written last, so its presence
    marks the case finished) after its sidecar ``_desc-lesion_mask.json`` (source images and their
    SHA-256, model, folds, :func:`settings_id`). An existing mask is kept only when its sidecar
    records the same image contents (else the case fails, naming both files: another patient
    with the same case id) and settings (else it is predicted again),
    ``_desc-lesion_probseg.nii.gz`` with ``save_probabilities``, ``_desc-lesion_stddev.nii.gz`` (float32:
    std of the fold probabilities) with ``save_uncertainty`` and ``overlays/<case_id>.png``
    (:func:`strokeseg.inference.html_report.save_case_overview`). The quality flags and per-lesion
    uncertainty (:mod:`strokeseg.inference.qc`, :mod:`strokeseg.inference.uncertainty`) go into
    the rows and the sidecar. Returns a :class:`CaseResult` whose info holds its table rows."""
    out_stem = case.meta["out_stem"]
    mask_path = options.output_dir / f"{out_stem}{MASK_SUFFIX}"
    sidecar = options.output_dir / f"{out_stem}{SIDECAR_SUFFIX}"
    images = source_images(case, model_set.contract.dataset)
    digests = {key: file_digest(path) for key, path in images.items()}
    if mask_path.exists() and not options.overwrite:
        recorded = _read_sidecar(sidecar)
        _check_same_source(mask_path, recorded, images, digests)
        if recorded.get("SettingsId") == options.settings_id:
            return _finished_case(case, mask_path, model_set, recorded)
    native, record = read_case(case, model_set.contract)
    prepared = prepare_case(native, model_set.contract)
    folds = fold_probabilities(prepared.arrays(model_set.contract.input_keys), model_set.fold_models, options.inferer)
    source = native.first
    to_native = functools.partial(_to_native, prepared, source.shape)
    probability = to_native(ensemble_mean(folds))
    mask = probability >= model_set.contract.threshold
    reference = None if native.label is None else native.label.data.astype(bool)
    info = _case_info(case.case_id, mask, source.affine, source.zooms, reference, model_set)
    header = nib.load(str(source.path)).header
    connectivity = PRESETS[model_set.spec.preset].connectivity
    lesions, stddev = fold_review(folds, to_native, mask, probability, model_set.contract.threshold, connectivity, options.save_uncertainty)
    review = {"QcFlags": qc.case_flags(mask, source, header.get_zooms()[:3], model_set.contract), "LesionUncertainty": lesions}
    qc.annotate_rows(info, review)
    if options.save_probabilities:
        save_nifti(options.output_dir / f"{out_stem}{PROB_SUFFIX}", probability.astype(np.float32), source.affine, header)
    if stddev is not None:
        save_nifti(options.output_dir / f"{out_stem}{STDDEV_SUFFIX}", stddev, source.affine, header)
    title = f"{case.case_id}: {info['volume']['lesion_volume_ml']:.2f} ml in {info['volume']['lesion_count']} lesion(s)"
    if info["scores"] is not None:
        title += f", Dice {info['scores']['dice']:.3f}"
    save_case_overview(options.output_dir / "overlays" / f"{case.case_id}.png", native.arrays(), source.affine, mask, reference, title)
    write_json(sidecar, {"Sources": [str(path) for path in images.values()], "SourceDigests": digests, "Model": model_set.label,
                         "Folds": model_set.members, "SettingsId": options.settings_id, **record, **review})
    save_nifti(mask_path, mask.astype(np.uint8), source.affine, header)
    return CaseResult(case.case_id, "done", info=info)


def predict_cases(cases: Mapping[str, Case], model_set: ModelSet, options: PredictOptions, workers: int = 1) -> RunReport:
    """:func:`predict_case` for every case (in ``workers`` processes; CPU only), failures
    collected as one-line reasons."""
    process = functools.partial(predict_case, model_set=model_set, options=options)
    return run_cases(cases, process, workers=workers, desc="cases")


def write_dataset_description(output_dir: Path, model_set: ModelSet) -> None:
    """``dataset_description.json`` of a BIDS derivatives dataset (BIDS 1.9, GeneratedBy)."""
    write_json(output_dir / "dataset_description.json", {
        "Name": f"strokeseg lesion masks ({model_set.label})",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{
            "Name": "strokeseg predict.py",
            "Version": code_version(),
            "Description": f"{model_set.contract.dataset} model {model_set.label}, {' '.join(model_set.members)}: mean probability >= {model_set.contract.threshold}",
        }],
    })
