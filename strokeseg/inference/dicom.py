"""DICOM in and DICOM-SEG out for ``predict.py`` (optional extra: ``pip install -r requirements-dicom.txt``).

In: an ``--input`` folder holding DICOM files and no NIfTI is read series by series (pydicom,
headers only). Each series whose headers name a modality of the model (:data:`SERIES_ROLES`:
the ImageType or SeriesDescription says ADC; diffusion b-values (0018,9087) or a description
saying DWI/diffusion/trace; T1 descriptions for T1w models) is converted by dcm2niix (the
``dcm2niix`` package's binary; anonymised BIDS JSON, ``.bval``/``.bvec`` from the headers) to
``<output-dir>/dicom_nifti/<case>/series-<N>/<case>_<key>.nii.gz``. The case id is the
PatientID and StudyDate, letters and digits only (``P 01``, 2024-01-02: ``P01_20240102``).
Discovery then reads that folder with ``--modality KEY=**/*_<key>.nii.gz`` globs, so 4-D DWI,
computed ADC, unit and swap checks and quality flags apply as to NIfTI input.
``dicom_nifti/dicom_series.json`` records which DICOM files each converted image came from.

Out: ``--dicom-seg`` writes ``<case>_desc-lesion_seg.dcm`` beside each mask: a binary DICOM
Segmentation (highdicom) of the mask on the frames of the source DWI (or T1w) series it references
(one frame per source slice; of a series with several b-values the slices at the b-value used),
segment "lesion" (SNOMED morphologically abnormal structure / infarct), algorithm
identification: the model label and the code version.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from ..core.io import CaseError, atomic_path, one_line, read_json, walk_files, write_json
from ..core.runner import RunReport, get_logger
from ..core.case import Case
from .prediction import MASK_SUFFIX, SIDECAR_SUFFIX, InputSpec

__all__ = ["INSTALL", "SERIES_ROLES", "CONVERTED", "MANIFEST", "SEG_SUFFIX", "require_extra", "is_dicom_folder", "series_role",
           "dicom_case_id", "convert_folder", "dicom_input", "frame_voxels", "mask_frames", "write_case_seg", "write_segs"]

INSTALL = "pip install -r requirements-dicom.txt"
CONVERTED = "dicom_nifti"  # folder in --output-dir of the converted series
MANIFEST = "dicom_series.json"  # in CONVERTED: converted image (relative path) -> its DICOM series
SEG_SUFFIX = "_desc-lesion_seg.dcm"
# Modality key -> (ImageType value, SeriesDescription regex): a series is that key's when either
# matches (ADC first: an ADC series' description often says "diff" too).
SERIES_ROLES = (
    ("adc", "ADC", r"\badc\b|apparent|_adc"),
    ("dwi", "", r"dwi|diff|trace|b ?1000"),
    ("image", "", r"t1|mprage|spgr|bravo|tfl"),
)
_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])
_INFARCT = ("55641003", "SCT", "Infarct")  # SNOMED CT morphologic abnormality


def require_extra(what: str) -> tuple[ModuleType, ModuleType]:
    """(pydicom, highdicom), imported on first use; :class:`CaseError` (one line: the install
    command) when the optional extra is not installed. ``what``: the feature that needs it."""
    try:
        import dcm2niix  # noqa: F401
        import highdicom
        import pydicom
    except ImportError as err:
        raise CaseError(f"{what} needs the optional DICOM extra ({err.name} is missing): {INSTALL}") from err
    return pydicom, highdicom


def _is_dicom_file(path: Path) -> bool:
    """Whether ``path`` starts with the DICOM preamble (b"DICM" at byte 128)."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_dicom_folder(root: Path) -> bool:
    """Whether ``root`` is a folder holding DICOM files and no NIfTI (no extra needed)."""
    if not Path(root).is_dir():
        return False
    files = walk_files(root)
    if any(re.search(r"\.nii(\.gz)?$", p.name, re.IGNORECASE) for p in files):
        return False
    return any(_is_dicom_file(p) for p in files)


def series_role(header: Any, keys: Sequence[str]) -> str | None:
    """The model input key a DICOM series is, from one instance's ``header``: the first role of
    :data:`SERIES_ROLES` its ImageType or SeriesDescription names (a diffusion b-value makes it
    DWI unless it is an ADC), when the model reads it (one of ``keys``); else None."""
    image_type = [str(v).upper() for v in (header.get("ImageType") or [])]
    description = str(header.get("SeriesDescription", "") or header.get("ProtocolName", "")).lower()
    for key, type_value, pattern in SERIES_ROLES:
        named = (type_value and type_value in image_type) or re.search(pattern, description)
        if named or (key == "dwi" and header.get("DiffusionBValue") is not None):
            return key if key in keys else None
    return None


def dicom_case_id(header: Any) -> str:
    """PatientID and StudyDate, letters and digits only, joined by "_" (``P01_20240102``)."""
    parts = [re.sub(r"[^A-Za-z0-9]", "", str(header.get(tag, "") or "")) for tag in ("PatientID", "StudyDate")]
    return "_".join(p for p in parts if p) or "unknown"


def _series(root: Path, pydicom: ModuleType) -> dict[str, tuple[Any, list[Path]]]:
    """SeriesInstanceUID -> (first instance's header, its files) of the DICOM files under ``root``."""
    series: dict[str, tuple[Any, list[Path]]] = {}
    for path in walk_files(root):
        if not _is_dicom_file(path):
            continue
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            uid = str(header.SeriesInstanceUID)
        except Exception as err:  # pydicom raises many types for corrupt files; the other files still count
            get_logger().info(f"WARNING {path}: unreadable DICOM or no SeriesInstanceUID, skipped ({one_line(err)})")
            continue
        series.setdefault(uid, (header, []))[1].append(path)
    return series


def _run_dcm2niix(files: Sequence[Path], out_dir: Path, name: str) -> list[Path]:
    """Convert one series (``files``, linked into a temporary folder) with dcm2niix into
    ``out_dir`` as ``name.nii.gz`` (+ .json, .bval, .bvec); the NIfTI files written."""
    import dcm2niix

    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp, "in"), Path(tmp, "out")
        source.mkdir()
        target.mkdir()
        for i, path in enumerate(files):
            os.symlink(Path(path).resolve(), source / f"{i:06d}.dcm")
        done = subprocess.run([dcm2niix.bin, "-z", "y", "-b", "y", "-f", name, "-o", str(target), str(source)], capture_output=True, text=True)
        written = sorted(target.glob("*.nii.gz"))
        if done.returncode != 0 or not written:
            raise CaseError(f"{files[0].parent}: dcm2niix could not convert series {name} (exit {done.returncode}: {one_line(done.stderr or done.stdout)})")
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(target.iterdir()):
            final = out_dir / path.name
            if not (final.is_file() and final.read_bytes() == path.read_bytes()):  # same bytes: kept (its digest matches earlier masks)
                with atomic_path(final) as tmp_path:
                    shutil.copyfile(path, tmp_path)
        return [out_dir / p.name for p in written]


def convert_folder(root: Path, out_dir: Path, keys: Sequence[str]) -> dict[str, dict]:
    """Convert every series of the DICOM folder ``root`` whose role (:func:`series_role`) is
    one of ``keys`` into ``out_dir`` (see the module docstring); series of other roles are
    skipped, and so (one WARNING/ERROR line each) are unreadable files and series dcm2niix cannot
    convert: the other cases still run. Returns and records in ``out_dir/dicom_series.json`` the converted image (path
    relative to ``out_dir``) -> {"SeriesInstanceUID", "Files" (absolute DICOM paths), "Key"}."""
    pydicom, _ = require_extra(f"{root}: DICOM input")
    manifest_path = out_dir / MANIFEST
    manifest = read_json(manifest_path) if manifest_path.is_file() else {}
    converted, folders = {}, set()
    for uid, (header, files) in sorted(_series(Path(root), pydicom).items()):
        key = series_role(header, keys)
        if key is None:
            continue
        case_id = dicom_case_id(header)
        folder = out_dir / case_id / f"series-{header.get('SeriesNumber') or uid[-8:]}"
        if folder in folders:  # two series with one number (two studies of one day): both kept, the case fails naming both
            folder = folder.with_name(f"{folder.name}-{uid[-8:]}")
        folders.add(folder)
        try:
            written = _run_dcm2niix(files, folder, f"{case_id}_{key}")
        except CaseError as err:  # the case's other series still convert; a case missing its DWI fails naming what is there
            get_logger().info(f"ERROR {case_id}: {one_line(err)}")
            continue
        for path in written:
            record = {"SeriesInstanceUID": uid, "Files": [str(p.resolve()) for p in files], "Key": key}
            converted[path.relative_to(out_dir).as_posix()] = record
    if not converted:
        raise CaseError(f"{root}: no DICOM series for this model's inputs ({', '.join(keys)}) found: series are told apart by ImageType "
                        f"(ADC), DiffusionBValue and SeriesDescription ({'; '.join(f'{k}: {p}' for k, _, p in SERIES_ROLES)})")
    write_json(manifest_path, {**manifest, **converted})
    return converted


def dicom_input(inputs: InputSpec, output_dir: Path, dicom_seg: bool = False) -> InputSpec:
    """``inputs`` unchanged, or for a DICOM ``--input`` folder its series converted
    (:func:`convert_folder`) into ``output_dir/dicom_nifti`` and that folder read by
    ``--modality KEY=**/*_<key>.nii.gz`` globs (reference masks do not come from DICOM).
    ``dicom_seg`` (``--dicom-seg``) without DICOM input raises :class:`CaseError`."""
    if inputs.input_dir is None or not is_dicom_folder(inputs.input_dir):
        if dicom_seg:
            raise CaseError(f"--dicom-seg needs --input with DICOM series (the SEG references them); {inputs.input_dir or 'single files'} holds none")
        return inputs
    if dicom_seg:
        require_extra("--dicom-seg")
    if inputs.modalities:
        raise CaseError(f"{inputs.input_dir}: --modality goes with NIfTI folders; DICOM series are told apart by their headers")
    keys = inputs.input_keys
    convert_folder(inputs.input_dir, output_dir / CONVERTED, keys)
    globs = tuple((key, f"**/*_{key}.nii.gz") for key in keys)
    return dataclasses.replace(inputs, input_dir=output_dir / CONVERTED, modalities=globs, image_pattern=None, mask_pattern="")


def frame_voxels(header: Any, affine: np.ndarray) -> np.ndarray:
    """Voxel coordinates (3, rows, columns), float64, in the NIfTI grid of ``affine`` (RAS mm)
    of each pixel centre of the DICOM frame ``header`` (ImagePositionPatient: the first pixel,
    ImageOrientationPatient: row then column direction, PixelSpacing: row then column spacing, LPS mm)."""
    position = np.asarray(header.ImagePositionPatient, dtype=np.float64)
    orientation = np.asarray(header.ImageOrientationPatient, dtype=np.float64)
    row_spacing, column_spacing = (float(v) for v in header.PixelSpacing)
    rows, columns = np.mgrid[0: int(header.Rows), 0: int(header.Columns)].astype(np.float64)
    lps = position + (columns * column_spacing)[..., None] * orientation[:3] + (rows * row_spacing)[..., None] * orientation[3:]
    return nib.affines.apply_affine(np.linalg.inv(affine), lps * _LPS_TO_RAS).transpose(2, 0, 1)


def mask_frames(mask: np.ndarray, affine: np.ndarray, headers: Sequence[Any]) -> np.ndarray:
    """The mask (X, Y, Z) on the frames of the DICOM ``headers``: uint8 (frames, rows, columns),
    nearest voxel (:func:`frame_voxels`; on the converted grid each pixel centre is a voxel centre); 0 outside."""
    return np.stack([ndimage.map_coordinates(mask.astype(np.uint8), frame_voxels(h, affine), order=0, mode="constant", cval=0) for h in headers])


def _source_frames(files: Sequence[str], b_value: float | None, pydicom: ModuleType) -> list[Any]:
    """One instance per slice position of the source series (lowest InstanceNumber), of a series
    with several b-values those nearest ``b_value`` (the one used; None: the highest)."""
    datasets = [pydicom.dcmread(path) for path in files]
    b_values = {i: float(ds.DiffusionBValue) for i, ds in enumerate(datasets) if ds.get("DiffusionBValue") is not None}
    if len(set(b_values.values())) > 1:
        wanted = max(b_values.values()) if b_value is None else min(b_values.values(), key=lambda b: abs(b - b_value))
        datasets = [ds for i, ds in enumerate(datasets) if abs(b_values.get(i, -1e9) - wanted) <= 0.05 * max(wanted, 1.0)]
    by_position: dict[tuple[float, ...], Any] = {}
    for ds in sorted(datasets, key=lambda d: int(d.get("InstanceNumber") or 0)):
        by_position.setdefault(tuple(round(float(v), 3) for v in ds.ImagePositionPatient), ds)
    return list(by_position.values())


def write_case_seg(mask_path: Path, source: Path, output_dir: Path, model_label: str, version: str, b_value: float | None) -> Path | None:
    """Write ``<mask>_desc-lesion_seg.dcm`` (see the module docstring) for the mask NIfTI
    ``mask_path`` predicted on the converted image ``source``; None when ``source`` came from no
    DICOM series (not in the manifest). Raises :class:`CaseError` naming the mask on failure."""
    pydicom, hd = require_extra("--dicom-seg")
    manifest_path = output_dir / CONVERTED / MANIFEST
    manifest = read_json(manifest_path) if manifest_path.is_file() else {}
    try:
        record = manifest.get(Path(source).resolve().relative_to((output_dir / CONVERTED).resolve()).as_posix())
    except ValueError:
        record = None
    if record is None:
        return None
    saved = nib.load(str(mask_path))
    sources = _source_frames(record["Files"], b_value, pydicom)
    frames = mask_frames(np.asarray(saved.dataobj) > 0, saved.affine, sources)
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(name=model_label, version=version, family=codes.DCM.ArtificialIntelligence)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lesion", segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=hd.sr.CodedConcept(*_INFARCT), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[segment],
            series_instance_uid=hd.UID(), series_number=int(sources[0].get("SeriesNumber") or 0) + 1000, sop_instance_uid=hd.UID(), instance_number=1,
            manufacturer="strokeseg", manufacturer_model_name=model_label, software_versions=version, device_serial_number="none",
            omit_empty_frames=False, series_description="lesion segmentation")
    except (ValueError, TypeError, AttributeError) as err:
        raise CaseError(f"{mask_path}: DICOM-SEG not written ({one_line(err)})") from err
    seg_path = mask_path.with_name(mask_path.name.replace(MASK_SUFFIX, SEG_SUFFIX))
    with atomic_path(seg_path) as tmp_path:
        seg.save_as(tmp_path)
    return seg_path


def write_segs(cases: Mapping[str, Case], report: RunReport, output_dir: Path, model_label: str, version: str) -> dict:
    """:func:`write_case_seg` for each done case and each skipped case without a SEG (its mask
    is unchanged: an existing SEG is kept). Returns {"written": [paths], "failed": {case id: reason}},
    each failure logged on one ERROR line."""
    written, failed = [], {}
    for result in report.results:
        case = cases.get(result.case_id)
        if case is None or case.meta.get("source") is None or result.status not in ("done", "skipped"):
            continue
        mask_path = output_dir / f"{case.meta['out_stem']}{MASK_SUFFIX}"
        if result.status == "skipped" and mask_path.with_name(mask_path.name.replace(MASK_SUFFIX, SEG_SUFFIX)).is_file():
            continue
        try:
            sidecar = read_json(output_dir / f"{case.meta['out_stem']}{SIDECAR_SUFFIX}")
            path = write_case_seg(mask_path, case.meta["source"], output_dir, model_label, version, sidecar.get("DwiBValue"))
        except CaseError as err:
            failed[case.case_id] = one_line(err)
            get_logger().info(f"ERROR {case.case_id}: {failed[case.case_id]}")
            continue
        if path is not None:
            written.append(str(path))
    return {"written": written, "failed": failed}
