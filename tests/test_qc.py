"""The dataset fingerprint (preprocessing -> data contract) and predict.py's quality flags,
failed-case rows and the folder summary accumulated over calls (issue 24, item 5)."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import pytest

import models
import predict
import preprocess_isles_WITH_BBOX
import preprocess_stroke_foundation
from strokeseg.datasets.contract import DataContract, build_data_contract, contract_from_checkpoint
from strokeseg.core.case import Image
from strokeseg.core.io import load_npz, read_json, write_json
from strokeseg.core.runner import CaseResult, RunReport
from strokeseg.datasets.fingerprint import FINGERPRINT_NAME, case_fingerprint
from strokeseg.inference import qc

SHAPE = 16  # target shape and window of the tiny ISLES models (voxels per axis)
SES = "ses-0001"


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _subset(source: Path, root: Path, subjects: tuple[str, ...]) -> Path:
    for sub in subjects:
        shutil.copytree(source / sub, root / sub)
        shutil.copytree(source / "derivatives" / sub, root / "derivatives" / sub)
    return root


def _preprocess(source: Path, out: Path) -> Path:
    assert preprocess_isles_WITH_BBOX.main(["--isles-dir", str(source), "--output-dir", str(out), "--target-shape", *[str(SHAPE)] * 3]) == 0
    return out


def _images(root: Path, sub: str) -> list[Path]:
    folder = root / sub / SES / "dwi"
    return [folder / f"{sub}_{SES}_{kind}.nii.gz" for kind in ("dwi", "adc")]


# --------------------------------------------------------------------------- fingerprint


def test_case_fingerprint_hand_computed() -> None:
    image = np.zeros((4, 5, 6), dtype=np.float32)
    image[1:3, 1:4, 1:5] = np.arange(24, dtype=np.float32).reshape(2, 3, 4) + 1  # brain: values 1..24
    entry = case_fingerprint({"dwi": image}, image > 0, (1.0, 2.0, 3.0), 0.5)
    assert entry["spacing_mm"] == [1.0, 2.0, 3.0] and entry["shape"] == [4, 5, 6] and entry["lesion_ml"] == 0.5
    assert entry["intensity"]["dwi"] == pytest.approx({"p0_5": 1.115, "p50": 12.5, "p99_5": 23.885})
    assert case_fingerprint({"dwi": image}, image > 99, (1, 1, 1), None)["intensity"]["dwi"] is None


def test_preprocessing_writes_the_fingerprint_and_the_contract_carries_it(synthetic_isles_a: Path, tmp_path: Path) -> None:
    subjects = ("sub-strokecase0001", "sub-strokecase0006")
    data = _preprocess(_subset(synthetic_isles_a, tmp_path / "isles", subjects), tmp_path / "data")
    recorded = read_json(data / FINGERPRINT_NAME)
    assert sorted(recorded["cases"]) == list(subjects)
    summary = recorded["summary"]
    volumes = [float(load_npz(data / f"{s}.npz", keys=("lesion_ml",))["lesion_ml"]) for s in subjects]
    assert summary["n_cases"] == 2 and min(volumes) == 0.0 < max(volumes)  # 0006 has an empty mask
    assert (summary["lesion_ml"]["min"], summary["lesion_ml"]["max"]) == pytest.approx((min(volumes), max(volumes)))
    native = [nib.load(str(_images(tmp_path / "isles", s)[0])) for s in subjects]
    zooms = np.array([img.header.get_zooms()[:3] for img in native], dtype=np.float64)
    np.testing.assert_allclose(summary["spacing_mm"]["max"], zooms.max(axis=0), rtol=1e-6)
    fov = np.array([np.multiply(img.shape, img.header.get_zooms()[:3]) for img in native])
    np.testing.assert_allclose(summary["field_of_view_mm"]["min"], fov.min(axis=0), rtol=1e-6)
    medians = [float(np.median(np.asarray(img.get_fdata(dtype=np.float32))[np.asarray(img.dataobj) != 0])) for img in native]
    assert summary["intensity"]["dwi"]["p50"] == pytest.approx(np.median(medians), rel=1e-5)
    _preprocess(tmp_path / "isles", data)  # a rerun skips both cases: their entries are kept
    assert read_json(data / FINGERPRINT_NAME) == recorded
    contract = build_data_contract("ISLES2022", data, ["dwi", "adc"], SHAPE, 0, [], [])
    assert contract["fingerprint"] == summary
    assert contract_from_checkpoint({"data_contract": contract}, "ckpt").fingerprint == summary
    old = {key: value for key, value in contract.items() if key != "fingerprint"}  # a checkpoint of an older version
    assert contract_from_checkpoint({"data_contract": old}, "old.pth").fingerprint is None


def test_foundation_stage_writes_the_fingerprint_of_the_native_t1w(synthetic_uoa: Path, tmp_path: Path) -> None:
    from test_predict import FOUNDATION_SETTINGS

    config = {"output_base_dir": str(tmp_path / "out"), "preprocessing": FOUNDATION_SETTINGS,
              "datasets": [{"name": "UOA_Private", "data_dir": str(synthetic_uoa), "image_pattern": "**/*_T1_FNIRT_MNI.nii.gz", "mask_pattern": "**/*_lesion.nii.gz"}]}
    write_json(tmp_path / "config.json", config)
    assert preprocess_stroke_foundation.main(["--config", str(tmp_path / "config.json")]) in (0, 1)  # 4 cases: too few for splits
    data = tmp_path / "out" / "UOA_Private"
    recorded = read_json(data / FINGERPRINT_NAME)
    metadata = {case_id: read_json(data / f"{case_id}_metadata.json") for case_id in recorded["cases"]}
    assert len(metadata) == 4
    for case_id, meta in metadata.items():  # native grid, not the resampled one (UOA004 is 1.25 x 1.5 x 2 mm)
        entry = recorded["cases"][case_id]
        assert entry["spacing_mm"] == pytest.approx(meta["original_spacing"]) and entry["shape"] == meta["original_shape"]
        assert entry["lesion_ml"] == pytest.approx(meta["original_lesion_ml"]) and set(entry["intensity"]) == {"image"}
    assert recorded["summary"]["spacing_mm"]["max"] == pytest.approx([1.25, 1.5, 2.0])
    assert build_data_contract("UOA_Private", data, ["image"], 32, 0, [], [])["fingerprint"] == recorded["summary"]


# --------------------------------------------------------------------------- flags


def _contract(fingerprint: dict | None) -> DataContract:
    return DataContract("ISLES2022", ("dwi", "adc"), "mask", (SHAPE,) * 3, 0.5, {"target_shape": [SHAPE] * 3, "margin": 4}, 0, (), (), fingerprint=fingerprint)


FINGERPRINT = {"spacing_mm": {"min": [1, 1, 2], "max": [1, 1, 4]}, "field_of_view_mm": {"min": [10, 10, 20], "max": [10, 10, 40]},
               "lesion_ml": {"min": 0.002, "max": 0.004}}


@pytest.mark.parametrize(("zooms", "pixdim", "lesion_voxels", "expected"), [
    ((1, 1, 3), (1, 1, 3), 1, []),  # 0.003 ml in range, spacing and field of view in range
    ((1, 1, 3), (1, 1, 3), 3, ["lesion_volume_outside_training (0.009 ml, training 0.002 to 0.004 ml)"]),
    ((1, 1, 6.1), (1, 1, 6.1), 1, ["lesion_volume_outside_training", "spacing_far_from_training (1 x 1 x 6.1 mm, training 1 x 1 x 2 to 1 x 1 x 4)",
                                   "field_of_view_far_from_training (10 x 10 x 61 mm, training 10 x 10 x 20 to 10 x 10 x 40)"]),
    ((1, 1, 3), (1, 1, 2.5), 1, ["pixdim_disagrees_with_affine (pixdim 1 x 1 x 2.5 mm, affine 1 x 1 x 3 mm)"]),
])
def test_case_flags(zooms: tuple, pixdim: tuple, lesion_voxels: int, expected: list[str]) -> None:
    data = np.ones((10, 10, 10), dtype=np.float32)
    source = Image(data, np.diag([*zooms, 1.0]), zooms, Path("img.nii.gz"))
    mask = np.zeros(data.shape, dtype=bool)
    mask[5, 5, 2:2 + lesion_voxels] = True
    flags = qc.case_flags(mask, source, pixdim, _contract(FINGERPRINT))
    assert [f.split(" (")[0] for f in flags] == [e.split(" (")[0] for e in expected]
    assert all(f == e for f, e in zip(flags, expected) if "(" in e)
    assert qc.case_flags(mask, source, zooms, _contract(None)) == []  # no fingerprint: only the brain and pixdim checks


def test_mask_outside_the_brain_is_flagged() -> None:
    data = np.zeros((10, 10, 10), dtype=np.float32)
    data[:5] = 1.0  # the brain: x < 5
    source = Image(data, np.eye(4), (1.0, 1.0, 1.0), Path("img.nii.gz"))
    mask = np.zeros(data.shape, dtype=bool)
    mask[3:7, 5, 5] = True  # half the voxels outside
    assert qc.case_flags(mask, source, (1, 1, 1), _contract(None)) == ["mask_outside_brain (50 % of mask voxels)"]
    mask[5:] = False
    mask[:5, 0, 0] = True
    assert qc.case_flags(mask, source, (1, 1, 1), _contract(None)) == []


def test_failed_rows_and_earlier_summary_kept() -> None:
    earlier = [{"case_id": "a", "status": "done"}, {"case_id": "b", "status": "failed", "reason": "old"}, {"case_id": "c", "status": "done"}]
    failed = [{"case_id": "a", "status": "failed", "reason": "new"}, {"case_id": "b", "status": "failed", "reason": "new"}, {"case_id": "d", "status": "failed", "reason": "x"}]
    rows = qc.merge_volume_rows(earlier, [{"case_id": "c", "status": "done", "lesion_count": 2}], failed)
    # a: earlier mask still valid; b: the new failure replaces the old; c: predicted again; d: new failure
    assert rows == [earlier[0], failed[1], {"case_id": "c", "status": "done", "lesion_count": 2}, failed[2]]


# --------------------------------------------------------------------------- predict.py


def _copy_case(root: Path, source: Path, sub: str, new: str, affine_scale: float = 1.0, pixdim_z: float | None = None) -> None:
    for path in _images(source, sub):
        img = nib.load(str(path))
        header = img.header.copy()
        affine = img.affine.copy()
        affine[:3, :3] *= affine_scale
        out = nib.Nifti1Image(np.asarray(img.dataobj), affine, header)
        if pixdim_z is not None:
            out.header["pixdim"][3] = pixdim_z  # the sform (code 1) keeps the affine
        target = root / new / SES / "dwi" / path.name.replace(sub, new)
        target.parent.mkdir(parents=True, exist_ok=True)
        nib.save(out, str(target))


def test_predict_writes_quality_flags_failed_rows_and_keeps_earlier_failures(synthetic_isles_a: Path, tmp_path: Path) -> None:
    empty = "sub-strokecase0006"  # the one training case: an empty mask, so every predicted lesion is outside the range
    data = _preprocess(_subset(synthetic_isles_a, tmp_path / "train", (empty,)), tmp_path / "data")
    for fold in (0,):
        torch.manual_seed(fold)
        config = {"arch": "resnet18_unet", "variant": "shared", "width": 4, "in_channels": 2}
        contract = build_data_contract("ISLES2022", data, ["dwi", "adc"], SHAPE, fold, [], [f"val{fold}"])
        models.save_checkpoint(tmp_path / "run" / f"fold_{fold}" / "best_model.pth", models.build_model(config), config,
                               config={"dataset": "ISLES2022", "fold": fold}, epoch=1, best_score=0.5, data_contract=contract)
    first, second = tmp_path / "in1", tmp_path / "in2"
    _copy_case(first, synthetic_isles_a, empty, "sub-p1")
    _copy_case(first, synthetic_isles_a, empty, "sub-p2", affine_scale=2.0, pixdim_z=9.0)  # spacing and field of view twice the training's
    _copy_case(first, synthetic_isles_a, empty, "sub-p3")
    (first / "sub-p3" / SES / "dwi" / f"sub-p3_{SES}_adc.nii.gz").write_bytes(b"not a nifti")
    out = tmp_path / "out"
    argv = ["--run", str(tmp_path / "run"), "--output-dir", str(out), "--precision", "fp32"]
    assert predict.main(["--input", str(first), *argv]) == 1
    rows = {row["case_id"]: row for row in _csv(out / "lesion_volumes.csv")}
    assert list(rows) == ["sub-p1", "sub-p2", "sub-p3"]
    p1, p2, p3 = rows.values()
    names = lambda row: [flag.split(" (")[0] for flag in row["qc_flags"].split("; ") if flag]  # noqa: E731
    volume_flag = ["lesion_volume_outside_training"] if float(p1["lesion_volume_ml"]) > 0 else []
    # an untrained network may also predict outside the brain (a flag tested on its own above)
    assert [name for name in names(p1) if name != "mask_outside_brain"] == volume_flag and p1["status"] == "done"
    assert names(p2)[-3:] == ["spacing_far_from_training", "field_of_view_far_from_training", "pixdim_disagrees_with_affine"]
    assert p3["status"] == "failed" and "sub-p3" in p3["reason"] and p3["lesion_volume_ml"] == ""
    _copy_case(second, synthetic_isles_a, empty, "sub-p2", affine_scale=2.0, pixdim_z=9.0)  # the same images: skipped, flags from its sidecar
    _copy_case(second, synthetic_isles_a, empty, "sub-p4")
    assert predict.main(["--input", str(second), *argv]) == 0
    again = {row["case_id"]: row for row in _csv(out / "lesion_volumes.csv")}
    assert list(again) == ["sub-p1", "sub-p2", "sub-p3", "sub-p4"] and again["sub-p2"]["qc_flags"] == p2["qc_flags"]
    assert again["sub-p3"] == p3  # the earlier call's failure keeps its row ...
    summary = read_json(out / "prediction_summary.json")
    assert [item["case_id"] for item in summary["failed"]] == ["sub-p3"]  # ... and its summary record
    assert summary["this_call"] == {"n_cases": 2, "n_done": 1, "n_skipped": 1, "n_failed": 0} and summary["n_cases"] == 4


def test_accumulate_report_only_with_the_same_models(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    path.write_text('{"cases": [{"case_id": "a", "status": "failed", "reason": "bad", "seconds": 1.0, "info": {}}]}')
    now = RunReport([CaseResult("b", "done")])
    assert [r.case_id for r in qc.accumulate_report(path, now, keep_earlier=True).results] == ["a", "b"]
    assert qc.accumulate_report(path, now, keep_earlier=False) is now
