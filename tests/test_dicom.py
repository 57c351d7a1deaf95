"""DICOM in and DICOM-SEG out (issue 24, item 8): synthetic MR series made with pydicom,
converted by dcm2niix, predicted, and the SEG read back with highdicom."""
from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import predict
from strokeseg.core.io import read_json
from strokeseg.inference import dicom
import models
import torch
from strokeseg.datasets.contract import DataContract
from test_predict import ISLES_SHAPE, _run_dir

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")
pytest.importorskip("dcm2niix")

SHAPE = (16, 12, 8)  # rows, columns, slices of the synthetic series
SPACING = (2.0, 1.5, 3.0)  # row spacing, column spacing, slice spacing (mm)
# Row direction LPS +y, column direction LPS +x (not the usual axial one, so a swapped axis shows).
ORIENTATION = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0)
ISLES_SETTINGS = {"target_shape": [ISLES_SHAPE] * 3, "margin": 4}


def _write_series(folder: Path, volumes: list[np.ndarray], description: str, study: str, frame_of_reference: str, number: int,
                  b_values: list[float] | None = None, image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"),
                  patient: str = "P 01") -> None:
    """One MR series: each volume (rows, columns, slices) uint16 one instance per slice, slices
    3 mm apart along the normal of ORIENTATION; b_values[v]: DiffusionBValue of volume v."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid, normal = generate_uid(), np.cross(ORIENTATION[:3], ORIENTATION[3:])
    instance = 0
    for v, volume in enumerate(volumes):
        for s in range(volume.shape[2]):
            instance += 1
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.TransferSyntaxUID = MRImageStorage, ExplicitVRLittleEndian
            ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient, "Test^Patient", "19600101", "O"
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series_uid, frame_of_reference
            ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20240102", "101010", "1", "A1", ""
            ds.Modality, ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = "MR", "SIEMENS", number, instance, description
            ds.ImageType, ds.PatientPosition = list(image_type), "HFS"
            ds.ImageOrientationPatient = list(ORIENTATION)
            ds.ImagePositionPatient = [float(x) for x in np.array([-20.0, -30.0, -10.0]) + SPACING[2] * s * normal]
            ds.PixelSpacing, ds.SliceThickness, ds.SpacingBetweenSlices = list(SPACING[:2]), SPACING[2], SPACING[2]
            ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = volume.shape[0], volume.shape[1], 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            ds.EchoTime, ds.RepetitionTime, ds.MagneticFieldStrength, ds.AcquisitionNumber = 90, 5000, 3, 1
            if b_values is not None:
                ds.DiffusionBValue = float(b_values[v])
            ds.PixelData = np.ascontiguousarray(volume[:, :, s], dtype=np.uint16).tobytes()
            ds.save_as(folder / f"IM{number:02d}_{instance:04d}.dcm", enforce_file_format=True)


def _patient(root: Path, seed: int = 0, patient: str = "P 01", with_adc: bool = True) -> dict[str, np.ndarray]:
    """A DWI series (b=0 and b=1000 volumes as instances with DiffusionBValue) and an ADC series
    (10^-6 mm^2/s, bright CSF) of one patient: an ellipsoid brain with a bright DWI lesion off
    centre (so a flipped axis shows). Returns the volumes (rows, columns, slices)."""
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed)
    r, c, s = np.mgrid[0: SHAPE[0], 0: SHAPE[1], 0: SHAPE[2]]
    brain = ((r - 7.5) / 7) ** 2 + ((c - 5.5) / 5) ** 2 + ((s - 3.5) / 4) ** 2 <= 1
    csf = brain & (np.abs(c - 5.5) < 1.2)
    lesion = brain & (r >= 9) & (c <= 4) & (s >= 4)
    noise = lambda scale: rng.normal(0, scale, SHAPE)  # noqa: E731
    b0 = np.where(brain, 1000 + noise(20), 5 + np.abs(noise(2)))
    b1000 = np.where(brain, np.where(lesion, 900, 450) + noise(15), 3 + np.abs(noise(2)))
    adc = np.where(brain, np.where(csf, 3000, np.where(lesion, 450, 800)) + noise(20), 0)
    volumes = {name: np.clip(v, 0, None).astype(np.uint16) for name, v in (("b0", b0), ("b1000", b1000), ("adc", adc))}
    study, frame_of_reference = generate_uid(), generate_uid()
    _write_series(root / "dwi", [volumes["b0"], volumes["b1000"]], "ep2d_diff_3scan_trace", study, frame_of_reference, 3, b_values=[0, 1000], patient=patient)
    if with_adc:
        _write_series(root / "adc", [volumes["adc"]], "ep2d_diff_3scan_trace_ADC", study, frame_of_reference, 4,
                      image_type=("DERIVED", "PRIMARY", "DIFFUSION", "ADC"), patient=patient)
        _write_series(root / "t2", [volumes["b0"]], "t2_tse_tra", study, frame_of_reference, 5, image_type=("ORIGINAL", "PRIMARY", "M", "NONE"), patient=patient)
    return volumes




def _isles_run(root: Path, threshold: float) -> Path:
    """The untrained one-fold DWI+ADC model of ``_run_dir`` (same seed, same weights) with ``threshold`` in its contract."""
    torch.manual_seed(0)
    config = {"arch": "resnet18_unet", "variant": "shared", "width": 4, "in_channels": 2}
    contract = DataContract("ISLES2022", ("dwi", "adc"), "mask", (ISLES_SHAPE,) * 3, threshold, ISLES_SETTINGS, 0, (), ("val0",)).as_dict()
    run_config = {"dataset": "ISLES2022", "fold": 0, "patch_size": ISLES_SHAPE, "init": "scratch"}
    models.save_checkpoint(root / "fold_0" / "best_model.pth", models.build_model(config), config, config=run_config, epoch=3, best_score=0.4, data_contract=contract)
    return root


def _predict(root: Path, run: Path, out: Path, *extra: str) -> int:
    return predict.main(["--input", str(root), "--run", str(run), "--output-dir", str(out), "--precision", "fp32", *extra])


@pytest.fixture(scope="module")
def dicom_prediction(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two patients as DICOM (P 01: DWI, ADC and a T2 series; P02: DWI only), predicted with
    --dicom-seg by a model whose threshold is the median probability (a mask neither empty nor full)."""
    root = tmp_path_factory.mktemp("dicom")
    volumes = _patient(root / "in" / "p01")
    _patient(root / "in" / "p02", seed=1, patient="P02", with_adc=False)
    probe = root / "probe"
    assert _predict(root / "in", _run_dir(root / "run05", "ISLES2022", ["dwi", "adc"], ISLES_SHAPE, ISLES_SETTINGS, folds=(0,)), probe, "--save-probabilities") == 0
    probability = nib.load(str(probe / "P01_20240102_desc-lesion_probseg.nii.gz")).get_fdata()
    run = _isles_run(root / "run", float(np.median(probability)))
    out = root / "out"
    rc = _predict(root / "in", run, out, "--dicom-seg")
    return {"root": root, "run": run, "out": out, "rc": rc, "volumes": volumes}


def test_dicom_series_are_converted_and_predicted_as_nifti_cases(dicom_prediction: dict) -> None:
    out = dicom_prediction["out"]
    assert dicom_prediction["rc"] == 0
    converted = read_json(out / "dicom_nifti" / "dicom_series.json")
    assert sorted(converted) == ["P01_20240102/series-3/P01_20240102_dwi.nii.gz", "P01_20240102/series-4/P01_20240102_adc.nii.gz",
                                 "P02_20240102/series-3/P02_20240102_dwi.nii.gz"]  # the T2 series is no input of this model
    assert len(converted["P01_20240102/series-3/P01_20240102_dwi.nii.gz"]["Files"]) == 2 * SHAPE[2]
    assert (out / "dicom_nifti/P01_20240102/series-3/P01_20240102_dwi.bval").read_text().split() == ["0", "1000"]
    first, second = (read_json(out / f"{case}_desc-lesion_mask.json") for case in ("P01_20240102", "P02_20240102"))
    assert first["DwiVolumes"] == [1] and first["DwiBValue"] == 1000.0  # b-values from the DICOM headers (item 2)
    assert first["AdcUnit"] == "10⁻⁶ mm²/s" and first["AdcConvertedTo"] == "10⁻³ mm²/s"  # unit check (item 3)
    assert second["AdcSource"].startswith("computed")  # no ADC series: computed from b=0 (item 2)
    mask = nib.load(str(out / "P01_20240102_desc-lesion_mask.nii.gz"))
    dwi = nib.load(str(out / "dicom_nifti/P01_20240102/series-3/P01_20240102_dwi.nii.gz"))
    assert np.allclose(mask.affine, dwi.affine) and mask.shape == dwi.shape[:3]  # the mask is on the converted DWI grid


def test_dicom_seg_frames_equal_the_nifti_mask_and_reference_the_source_series(dicom_prediction: dict) -> None:
    out, b1000 = dicom_prediction["out"], dicom_prediction["volumes"]["b1000"]
    seg = hd.seg.segread(out / "P01_20240102_desc-lesion_seg.dcm")
    segment = seg.get_segment_description(1)
    assert segment.segment_label == "lesion"
    algorithm = segment.algorithm_identification[0]
    assert algorithm.AlgorithmName == "run" and algorithm.AlgorithmVersion == predict.pr.code_version()
    dwi_files = read_json(out / "dicom_nifti" / "dicom_series.json")["P01_20240102/series-3/P01_20240102_dwi.nii.gz"]["Files"]
    sources = sorted((pydicom.dcmread(f) for f in dwi_files), key=lambda ds: ds.InstanceNumber)[SHAPE[2]:]  # the b=1000 slices
    assert {uid for _, _, uid in seg.get_source_image_uids()} == {ds.SOPInstanceUID for ds in sources}
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    mask_img = nib.load(str(out / "P01_20240102_desc-lesion_mask.nii.gz"))
    mask = np.asarray(mask_img.dataobj)
    dwi = np.asarray(nib.load(str(out / "dicom_nifti/P01_20240102/series-3/P01_20240102_dwi.nii.gz")).dataobj)[..., 1]
    assert 0 < mask.sum() < mask.size
    frames = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in sources], segment_numbers=[1])[..., 0]
    for s, ds in enumerate(sources):
        voxels = dicom.frame_voxels(ds, mask_img.affine)
        index = tuple(np.rint(voxels).astype(int))
        assert np.allclose(voxels, index, atol=1e-4)  # every pixel centre is a voxel centre of the converted grid
        assert np.array_equal(dwi[index], b1000[:, :, s])  # the affine relation, checked on the image data
        assert np.array_equal(frames[s], mask[index])


def test_rerun_keeps_the_converted_images_masks_and_seg(dicom_prediction: dict) -> None:
    out = dicom_prediction["out"]
    seg_time = (out / "P01_20240102_desc-lesion_seg.dcm").stat().st_mtime_ns
    assert _predict(dicom_prediction["root"] / "in", dicom_prediction["run"], out, "--dicom-seg") == 0
    summary = read_json(out / "prediction_summary.json")
    assert summary["this_call"]["n_skipped"] == 2 and summary["dicom_seg"] == {"written": [], "failed": {}}
    assert (out / "P01_20240102_desc-lesion_seg.dcm").stat().st_mtime_ns == seg_time


def test_dicom_without_the_extra_and_seg_without_dicom_are_one_line_errors(dicom_prediction: dict, isles_sample_dir: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    run = dicom_prediction["run"]
    assert _predict(isles_sample_dir, run, tmp_path / "nifti", "--dicom-seg") == 2
    assert "--dicom-seg needs --input with DICOM series" in capsys.readouterr().out
    assert _predict(dicom_prediction["root"] / "in", run, tmp_path / "glob", "--modality", "dwi=*.dcm") == 2
    assert "--modality goes with NIfTI folders" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "highdicom", None)  # the optional extra not installed
    assert _predict(dicom_prediction["root"] / "in", run, tmp_path / "noextra") == 2
    error = [line for line in capsys.readouterr().out.splitlines() if "ERROR" in line]
    assert len(error) == 1 and error[0].endswith("DICOM input needs the optional DICOM extra (highdicom is missing): pip install -r requirements-dicom.txt")


def test_two_dwi_series_of_one_patient_and_day_fail_that_case_naming_both(dicom_prediction: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pydicom.uid import generate_uid

    _patient(tmp_path / "in" / "p02", seed=1, patient="P02", with_adc=False)
    (tmp_path / "in" / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 7)  # skipped with a warning
    b1000 = dicom_prediction["volumes"]["b1000"]
    _write_series(tmp_path / "in" / "p02_again", [b1000], "DWI b1000", generate_uid(), generate_uid(), 3, b_values=[1000], patient="P02")
    assert _predict(tmp_path / "in", dicom_prediction["run"], tmp_path / "out") == 1
    reason = read_json(tmp_path / "out" / "prediction_summary.json")["failed"][0]
    assert reason["case_id"] == "P02_20240102" and "2 dwi files give this one case id" in reason["reason"]
    assert "series-3/P02_20240102_dwi.nii.gz" in reason["reason"] and "series-3-" in reason["reason"]
    assert f"WARNING {tmp_path / 'in' / 'broken.dcm'}: unreadable DICOM or no SeriesInstanceUID, skipped" in capsys.readouterr().out


@pytest.mark.parametrize("header, keys, role", [
    ({"ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"], "SeriesDescription": "ep2d_diff_trace_ADC"}, ("dwi", "adc"), "adc"),
    ({"ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"], "SeriesDescription": "ep2d_diff_trace_ADC"}, ("dwi",), None),
    ({"SeriesDescription": "AX DIFFUSION", "DiffusionBValue": 1000}, ("dwi", "adc"), "dwi"),
    ({"SeriesDescription": "ep2d_b0_b1000"}, ("dwi",), "dwi"),
    ({"SeriesDescription": "localizer"}, ("dwi", "adc"), None),
    ({"SeriesDescription": "SE_DWI_TRACE"}, ("dwi",), "dwi"),
    ({"SeriesDescription": "t2_tse_tra"}, ("dwi", "adc"), None),
    ({"SeriesDescription": "Sag MPRAGE"}, ("image",), "image"),
])
def test_series_role_from_headers(header: dict, keys: tuple, role: str | None) -> None:
    assert dicom.series_role(header, keys) == role


def test_dicom_case_id_is_patient_and_study_date_sanitised() -> None:
    assert dicom.dicom_case_id({"PatientID": "P 01/ä", "StudyDate": "20240102"}) == "P01_20240102"
    assert dicom.dicom_case_id({"PatientID": "", "StudyDate": ""}) == "unknown"
