"""predict.py and strokeseg.inference.prediction: native-grid masks equal to evaluate.py's, geometry,
tables, BIDS derivatives, re-runs, the data contract, and bad input refused as the
preprocessing stages refuse it. Models are untrained tiny networks built at run time."""
from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

import evaluate
import models
import predict
import preprocess_isles_WITH_BBOX
import preprocess_stroke_foundation
from strokeseg.datasets.contract import DataContract
from strokeseg.core.io import read_json, write_json
from strokeseg.datasets.registry import dataset_spec
from strokeseg.inference.prediction import lesion_table

ISLES_SHAPE = 16  # contract target shape and window of the ISLES models (voxels per axis)
ATLAS_WINDOW = 32  # smaller than the synthetic brains: several windows per volume
ATLAS_PATTERNS = {"image_pattern": "**/*_T1w.nii.gz", "mask_pattern": "**/*_label-L_desc-T1lesion_mask.nii.gz"}
FOUNDATION_SETTINGS = {"target_spacing": [1.0, 1.0, 1.0], "normalization_method": "zscore", "clip_percentile": 99.5, "use_gpu": False, "brain_threshold": 0.0}


def _contract(dataset: str, keys: list[str], window: int, preprocessing: dict, fold: int) -> dict:
    """The contract as the trainer stores it (strokeseg.datasets.contract), with the given settings."""
    mask_key = dataset_spec(dataset).mask_key
    return DataContract(dataset, tuple(keys), mask_key, (window,) * 3, 0.5, preprocessing, fold, (), (f"val{fold}",)).as_dict()


def _run_dir(root: Path, dataset: str, keys: list[str], window: int, preprocessing: dict, folds: tuple[int, ...] = (0, 1), contract: bool = True) -> Path:
    """Untrained width-4 ResNet U-Nets in fold_<k>/best_model.pth, as the trainer lays them out."""
    variant = "shared" if len(keys) == 2 else "single"
    for fold in folds:
        torch.manual_seed(fold)
        config = {"arch": "resnet18_unet", "variant": variant, "width": 4, "in_channels": len(keys)}
        model = models.build_model(config)
        run_config = {"dataset": dataset, "fold": fold, "patch_size": window, "init": "scratch"}
        extra = {"data_contract": _contract(dataset, keys, window, preprocessing, fold)} if contract else {}
        models.save_checkpoint(root / f"fold_{fold}" / "best_model.pth", model, config, config=run_config, epoch=3, best_score=0.4 + fold / 10, **extra)
    return root


@pytest.fixture(scope="module")
def isles_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    settings = {"target_shape": [ISLES_SHAPE] * 3, "margin": 4}
    return _run_dir(tmp_path_factory.mktemp("isles_run"), "ISLES2022", ["dwi", "adc"], ISLES_SHAPE, settings)


@pytest.fixture(scope="module")
def atlas_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run_dir(tmp_path_factory.mktemp("atlas_run"), "ATLAS", ["image"], ATLAS_WINDOW, FOUNDATION_SETTINGS)


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _voxels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _splits(path: Path, dataset: str, test: list[str]) -> Path:
    write_json(path, {f"fold_{k}": {dataset: {"train": [f"train{k}"], "val": [f"val{k}"], "test": test}} for k in range(2)})
    return path


# --------------------------------------------------------------------------- equality with evaluate.py


def _isles_subset(source: Path, root: Path, subjects: tuple[str, ...]) -> Path:
    """A layout-A dataset holding only ``subjects`` of ``source`` (images and masks)."""
    for sub in subjects:
        shutil.copytree(source / sub, root / sub)
        shutil.copytree(source / "derivatives" / sub, root / "derivatives" / sub)
    return root


def test_isles_masks_equal_evaluate_save_nifti_voxel_for_voxel(synthetic_isles_a: Path, isles_run: Path, tmp_path: Path) -> None:
    # sub-strokecase0006 has an empty reference mask
    source = _isles_subset(synthetic_isles_a, tmp_path / "isles", ("sub-strokecase0001", "sub-strokecase0006"))
    data = tmp_path / "eval_data"
    assert preprocess_isles_WITH_BBOX.main(["--isles-dir", str(source), "--output-dir", str(data), "--target-shape", *[str(ISLES_SHAPE)] * 3]) == 0
    cases = sorted(p.stem for p in data.glob("sub-*.npz"))
    splits = _splits(tmp_path / "splits.json", "ISLES2022", cases)
    argv = ["--dataset", "ISLES2022", "--data-dir", str(data), "--splits-file", str(splits), "--run", f"m={isles_run}",
            "--ensemble", "--save-nifti", "--png", "none", "--bootstrap", "10", "--output-dir", str(tmp_path / "eval")]
    assert evaluate.main(argv) == 0
    out = tmp_path / "pred"
    assert predict.main(["--input", str(source), "--run", str(isles_run), "--output-dir", str(out), "--precision", "fp32"]) == 0
    single = tmp_path / "pred_fold1"
    assert predict.main(["--input", str(source), "--run", str(isles_run), "--folds", "1", "--output-dir", str(single), "--precision", "fp32"]) == 0
    lesion_voxels = 0
    for case_id in cases:
        stem = f"{case_id}/ses-0001/dwi/{case_id}_ses-0001"
        mask = _voxels(out / f"{stem}_desc-lesion_mask.nii.gz")
        assert np.array_equal(mask, _voxels(tmp_path / "eval" / "predictions" / "m" / "ensemble" / f"{case_id}.nii.gz")), case_id
        assert np.array_equal(_voxels(single / f"{stem}_desc-lesion_mask.nii.gz"), _voxels(tmp_path / "eval" / "predictions" / "m" / "fold_1" / f"{case_id}.nii.gz"))
        lesion_voxels += int(mask.sum())
    assert lesion_voxels > 0 and mask.dtype == np.uint8
    evaluated = {(row["fold"], row["case_id"]): row for row in _csv(tmp_path / "eval" / "per_case.csv")}
    for row in _csv(out / "scores.csv"):  # every synthetic case has a mask: scored like evaluate scores the ensemble
        assert float(row["dice"]) == pytest.approx(float(evaluated[("ensemble", row["case_id"])]["dice"]), abs=1e-12)


def test_atlas_masks_equal_evaluate_with_brain_crop(synthetic_atlas: Path, atlas_run: Path, tmp_path: Path) -> None:
    base = tmp_path / "foundation"
    config = {"output_base_dir": str(base), "preprocessing": FOUNDATION_SETTINGS,
              "datasets": [{"name": "ATLAS", "data_dir": str(synthetic_atlas), **ATLAS_PATTERNS}]}
    write_json(tmp_path / "config.json", config)
    assert preprocess_stroke_foundation.main(["--config", str(tmp_path / "config.json")]) == 0
    cases = ["sub-r001s001_ses-1", "sub-r001s002_ses-1"]
    splits = _splits(tmp_path / "splits.json", "ATLAS", cases)
    argv = ["--dataset", "ATLAS", "--data-dir", str(base), "--splits-file", str(splits), "--run", f"m={atlas_run}", "--folds", "0",
            "--save-nifti", "--png", "none", "--bootstrap", "10", "--output-dir", str(tmp_path / "eval"), "--brain-crop"]
    assert evaluate.main(argv) == 0
    out = tmp_path / "pred"
    assert predict.main(["--input", str(synthetic_atlas), "--pattern", "Training/R001/sub-r001s00[12]/**/*_T1w.nii.gz", "--run", str(atlas_run),
                         "--folds", "0", "--output-dir", str(out), "--precision", "fp32"]) == 0
    for case_id in cases:
        sub, ses = case_id.split("_")
        mask_path = out / sub / ses / "anat" / f"{case_id}_space-MNI152NLin2009aSym_desc-lesion_mask.nii.gz"
        expected = _voxels(tmp_path / "eval" / "predictions" / "m" / "fold_0" / f"{case_id}.nii.gz")
        assert np.array_equal(_voxels(mask_path), expected), case_id
    assert read_json(out / "prediction_summary.json")["n_done"] == 2


# --------------------------------------------------------------------------- outputs


@pytest.fixture(scope="module")
def sample_prediction(isles_sample_dir: Path, isles_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sample_pred")
    assert predict.main(["--input", str(isles_sample_dir), "--run", str(isles_run), "--output-dir", str(out), "--save-probabilities"]) == 0
    return out


def test_real_case_mask_has_the_source_grid_header_and_agrees_with_the_tables(sample_prediction: Path, isles_sample_dir: Path) -> None:
    source = nib.load(str(next(isles_sample_dir.rglob("*_dwi.nii.gz"))))
    stem = sample_prediction / "sub-strokecase0009" / "ses-0001" / "sub-strokecase0009_ses-0001"
    saved = nib.load(str(stem.parent / (stem.name + "_desc-lesion_mask.nii.gz")))
    mask = np.asarray(saved.dataobj)
    assert mask.shape == source.shape == (112, 112, 73) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert np.allclose(saved.affine, source.affine, atol=1e-6)
    for coded in ("get_qform", "get_sform"):
        assert getattr(saved.header, coded)(coded=True)[1] == getattr(source.header, coded)(coded=True)[1]
    prob = nib.load(str(stem.parent / (stem.name + "_desc-lesion_probseg.nii.gz"))).get_fdata()
    assert np.array_equal(prob >= 0.5, mask.astype(bool))
    voxel_ml = float(np.prod(source.header.get_zooms()[:3])) / 1000
    row = _csv(sample_prediction / "lesion_volumes.csv")[0]
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))  # isles22: 26-connectivity
    sizes = np.bincount(labels.ravel())[1:]
    assert row["case_id"] == "sub-strokecase0009" and int(row["lesion_count"]) == count > 0
    assert float(row["lesion_volume_ml"]) == pytest.approx(mask.sum() * voxel_ml)
    assert float(row["largest_lesion_ml"]) == pytest.approx(sizes.max() * voxel_ml)
    assert row["folds"] == "fold_0 fold_1"
    lesions = _csv(sample_prediction / "lesions.csv")
    assert len(lesions) == count and sum(int(r["voxels"]) for r in lesions) == mask.sum()
    biggest = max(lesions, key=lambda r: int(r["voxels"]))
    centroid = np.array(ndimage.center_of_mass(labels == int(biggest["lesion_id"])))
    world = source.affine[:3, :3] @ centroid + source.affine[:3, 3]
    assert [float(biggest[f"centroid_{a}_mm"]) for a in "xyz"] == pytest.approx(world.tolist())
    assert (sample_prediction / "overlays" / "sub-strokecase0009.png").stat().st_size > 1000
    assert _csv(sample_prediction / "scores.csv")[0]["case_id"] == "sub-strokecase0009"
    assert read_json(sample_prediction / "run_args.json")["args"]["precision"] == "auto"


@pytest.mark.parametrize("connectivity", [6, 26])
def test_lesion_table_agrees_with_scipy_labelling_and_centroids(connectivity: int) -> None:
    mask = np.zeros((30, 28, 26), dtype=bool)
    mask[3:7, 4:9, 5:8] = True
    mask[7, 9, 8] = True  # touches the first lesion by a corner: one lesion at 26, two at 6
    mask[20:27, 15:17, 2:25] = True
    mask[12, 25, 20] = True
    affine = np.array([[0.0, 0.0, 2.0, -10.0], [1.5, 0.0, 0.0, 4.0], [0.0, -1.0, 0.0, 7.0], [0, 0, 0, 1]])
    rows = lesion_table(mask, affine, voxel_ml=0.003, connectivity=connectivity)
    structure = ndimage.generate_binary_structure(3, 1 if connectivity == 6 else 3)
    labels, count = ndimage.label(mask, structure=structure)
    assert len(rows) == count == (4 if connectivity == 6 else 3)
    for i, row in enumerate(rows, start=1):
        voxels = int((labels == i).sum())
        centroid = np.array(ndimage.center_of_mass(mask, labels, i))
        assert row["lesion_id"] == i and row["voxels"] == voxels and row["volume_ml"] == pytest.approx(voxels * 0.003)
        world = affine[:3, :3] @ centroid + affine[:3, 3]
        np.testing.assert_allclose([row["centroid_x_mm"], row["centroid_y_mm"], row["centroid_z_mm"]], world, atol=1e-9)
    assert lesion_table(np.zeros((4, 4, 4), dtype=bool), affine, 0.001, connectivity) == []


def test_bids_input_gives_a_derivatives_tree(sample_prediction: Path) -> None:
    description = read_json(sample_prediction / "dataset_description.json")
    assert description["DatasetType"] == "derivative" and description["BIDSVersion"]
    assert description["GeneratedBy"][0]["Name"] == "strokeseg predict.py" and description["GeneratedBy"][0]["Version"]
    niftis = sorted(p.relative_to(sample_prediction).as_posix() for p in sample_prediction.rglob("*.nii.gz"))
    assert niftis == [
        "sub-strokecase0009/ses-0001/sub-strokecase0009_ses-0001_desc-lesion_mask.nii.gz",
        "sub-strokecase0009/ses-0001/sub-strokecase0009_ses-0001_desc-lesion_probseg.nii.gz",
    ]


def test_single_files_flat_output_scored_with_mask_and_rerun_skips(synthetic_isles_b: Path, isles_run: Path, tmp_path: Path) -> None:
    folder = synthetic_isles_b / "rawdata" / "sub-strokecase0002" / "ses-0001"
    mask = synthetic_isles_b / "derivatives" / "sub-strokecase0002" / "ses-0001" / "sub-strokecase0002_ses-0001_msk.nii.gz"
    out = tmp_path / "out"
    argv = ["--dwi", str(folder / "sub-strokecase0002_ses-0001_dwi.nii.gz"), "--adc", str(folder / "sub-strokecase0002_ses-0001_adc.nii.gz"),
            "--mask", str(mask), "--run", str(isles_run), "--output-dir", str(out)]
    assert predict.main(argv) == 0
    mask_path = out / "sub-strokecase0002_ses-0001_desc-lesion_mask.nii.gz"
    assert mask_path.is_file() and not (out / "dataset_description.json").exists()
    first = (mask_path.stat().st_mtime_ns, _csv(out / "lesion_volumes.csv"), _csv(out / "scores.csv"))
    assert predict.main(argv) == 0  # finished: kept, its rows read back from the mask on disk
    summary = read_json(out / "prediction_summary.json")
    assert summary["n_skipped"] == 1 and "exists" in summary["skipped"][0]["reason"]
    assert (mask_path.stat().st_mtime_ns, _csv(out / "lesion_volumes.csv"), _csv(out / "scores.csv")) == first
    assert predict.main([*argv, "--overwrite"]) == 0
    assert read_json(out / "prediction_summary.json")["n_done"] == 1 and mask_path.stat().st_mtime_ns != first[0]


def test_rerun_with_other_models_or_settings_is_refused_naming_them(synthetic_isles_b: Path, isles_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A folder's masks all come from one set of models and settings: another run, a model
    trained again or --tta is refused before any case (their masks would be skipped as finished);
    a second patient into the same folder is fine."""
    folder = synthetic_isles_b / "rawdata"
    def case_argv(subject: str) -> list[str]:
        stem = folder / subject / "ses-0001" / f"{subject}_ses-0001"
        return ["--dwi", f"{stem}_dwi.nii.gz", "--adc", f"{stem}_adc.nii.gz", "--run", str(run), "--output-dir", str(out)]
    run, out = shutil.copytree(isles_run, tmp_path / "run"), tmp_path / "out"
    assert predict.main(case_argv("sub-strokecase0002")) == 0
    assert predict.main(case_argv("sub-strokecase0003")) == 0  # another patient, same models: collected in one folder
    masks = {p.name: p.read_bytes() for p in out.glob("*_mask.nii.gz")}
    assert len(masks) == 2
    volumes = _csv(out / "lesion_volumes.csv")  # the tables list every patient of the folder, not the last one
    assert [row["case_id"][:18] for row in volumes] == ["sub-strokecase0002", "sub-strokecase0003"]
    assert {row["case_id"] for row in _csv(out / "lesions.csv")} <= {row["case_id"] for row in volumes}
    _run_dir(run, "ISLES2022", ["dwi", "adc"], ISLES_SHAPE, {"target_shape": [ISLES_SHAPE] * 3, "margin": 4}, folds=(0,))  # fold 0 trained again
    capsys.readouterr()
    for extra, named in (([], "checkpoints: "), (["--tta"], "tta: false there, true now")):
        assert predict.main([*case_argv("sub-strokecase0002"), *extra]) == 2
        (line,) = [line for line in capsys.readouterr().out.splitlines() if "ERROR" in line]
        assert f"ERROR {out}: holds outputs made with other settings (" in line and named in line and "--overwrite" in line, line
        assert {p.name: p.read_bytes() for p in out.glob("*_mask.nii.gz")} == masks  # nothing touched
    assert predict.main([*case_argv("sub-strokecase0002"), "--overwrite"]) == 0
    assert read_json(out / "prediction_summary.json")["n_done"] == 1
    assert [row["case_id"][:18] for row in _csv(out / "lesion_volumes.csv")] == ["sub-strokecase0002"]  # other models' rows dropped
    stale = "sub-strokecase0003_ses-0001_desc-lesion_mask.nii.gz"  # still the old models' mask, named as such
    assert f"WARNING 1 mask(s) in {out} come from other models or settings (not in the tables): {stale}" in capsys.readouterr().out
    assert read_json(out / "sub-strokecase0002_ses-0001_desc-lesion_mask.json")["Model"] == "run"
    assert predict.main(case_argv("sub-strokecase0003")) == 0  # without --overwrite: predicted again, not skipped as finished
    summary = read_json(out / "prediction_summary.json")  # the folder's cases; this call's counts apart
    assert summary["this_call"]["n_done"] == 1 and summary["n_done"] == 2
    assert [row["case_id"][:18] for row in _csv(out / "lesion_volumes.csv")] == ["sub-strokecase0002", "sub-strokecase0003"]
    assert "WARNING" not in capsys.readouterr().out


def test_same_case_id_from_another_patient_never_reuses_the_first_patients_mask(synthetic_isles_b: Path, isles_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """File names give two patients one case id ("case"): the second call must not be
    "skipped" with the first patient's mask. Identity is the images' content, not their path."""
    def patient(name: str, subject: str) -> list[str]:
        source = synthetic_isles_b / "rawdata" / subject / "ses-0001" / f"{subject}_ses-0001"
        folder = tmp_path / name
        folder.mkdir()
        for kind in ("dwi", "adc"):
            shutil.copy(f"{source}_{kind}.nii.gz", folder / f"case_{kind}.nii.gz")
        return ["--dwi", str(folder / "case_dwi.nii.gz"), "--adc", str(folder / "case_adc.nii.gz"), "--run", str(isles_run), "--output-dir", str(out)]
    out = tmp_path / "out"
    p1, p2 = patient("p1", "sub-strokecase0002"), patient("p2", "sub-strokecase0003")
    shutil.copytree(tmp_path / "p1", tmp_path / "p1_copy")
    assert predict.main(p1) == 0
    mask_path, sidecar = out / "case_desc-lesion_mask.nii.gz", out / "case_desc-lesion_mask.json"
    first = (mask_path.read_bytes(), _csv(out / "lesion_volumes.csv"))
    assert set(read_json(sidecar)["SourceDigests"]) == {"dwi", "adc"}
    capsys.readouterr()
    assert predict.main(p2) == 1  # refused, naming the mask and both patients' files
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "FAILED" in line or "ERROR" in line]
    assert str(mask_path) in line and str(tmp_path / "p1" / "case_dwi.nii.gz") in line and str(tmp_path / "p2" / "case_dwi.nii.gz") in line, line
    summary = read_json(out / "prediction_summary.json")
    assert summary["n_failed"] == 1 and "another patient" in summary["failed"][0]["reason"]
    assert (mask_path.read_bytes(), _csv(out / "lesion_volumes.csv")) == first  # patient 1's mask and rows kept
    same_content = [arg.replace(f"{tmp_path / 'p1'}", f"{tmp_path / 'p1_copy'}") for arg in p1]
    assert predict.main(same_content) == 0 and read_json(out / "prediction_summary.json")["n_skipped"] == 1
    assert predict.main([*p2, "--overwrite"]) == 0
    assert read_json(sidecar)["Sources"] == [str(tmp_path / "p2" / "case_dwi.nii.gz"), str(tmp_path / "p2" / "case_adc.nii.gz")]
    legacy = read_json(sidecar)
    del legacy["SourceDigests"]  # a mask made before sources were recorded cannot be matched: refused, not reused
    write_json(sidecar, legacy)
    assert predict.main(p2) == 1 and "records no digest" in read_json(out / "prediction_summary.json")["failed"][0]["reason"]


def test_t1w_image_on_another_grid_is_mapped_back_to_it(synthetic_uoa: Path, tmp_path: Path) -> None:
    run = _run_dir(tmp_path / "uoa_run", "UOA_Private", ["image"], ATLAS_WINDOW, FOUNDATION_SETTINGS, folds=(0,))
    image = synthetic_uoa / "UOA004" / "UOA004_T1_FNIRT_MNI.nii.gz"  # 1.25 x 1.5 x 2 mm: resampled to 1 mm for the network
    out = tmp_path / "out"
    assert predict.main(["--image", str(image), "--run", str(run), "--output-dir", str(out), "--no-brain-crop"]) == 0
    saved, source = nib.load(str(out / "UOA004_desc-lesion_mask.nii.gz")), nib.load(str(image))
    assert saved.shape == source.shape == (37, 36, 23) and np.allclose(saved.affine, source.affine)
    assert not (out / "scores.csv").exists()
    assert read_json(out / "prediction_summary.json")["data_contract"]["dataset"] == "UOA_Private"


def test_t1w_folder_by_pattern(synthetic_uoa: Path, atlas_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert predict.main(["--input", str(synthetic_uoa), "--pattern", "UOA00[12]/*_T1_FNIRT_MNI.nii.gz", "--run", str(atlas_run),
                         "--folds", "1", "--output-dir", str(out)]) == 0
    rows = _csv(out / "lesion_volumes.csv")
    assert [row["case_id"] for row in rows] == ["UOA001", "UOA002"]
    assert not (out / "scores.csv").exists()  # no --mask-pattern: nothing to score


# --------------------------------------------------------------------------- models and bad input


@pytest.mark.parametrize("contract, preprocessing, message", [
    (False, {}, "checkpoint has no data contract"),
    (True, {}, "data contract records no preprocessing settings"),
    (True, {"target_shape": [16, 16], "margin": 4}, "target_shape must be 3 positive ints"),
])
def test_checkpoint_without_usable_data_contract_is_refused(contract: bool, preprocessing: dict, message: str, isles_sample_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _run_dir(tmp_path / "old", "ISLES2022", ["dwi", "adc"], ISLES_SHAPE, preprocessing, folds=(0,), contract=contract)
    assert predict.main(["--input", str(isles_sample_dir), "--run", str(run), "--output-dir", str(tmp_path / "out")]) == 2
    assert re.search(rf"best_model\.pth: .*{message}", capsys.readouterr().out)


def test_models_with_different_contracts_are_not_mixed(isles_sample_dir: Path, isles_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    other = _run_dir(tmp_path / "other", "ISLES2022", ["dwi", "adc"], ISLES_SHAPE, {"target_shape": [32] * 3, "margin": 4}, folds=(0,))
    argv = ["--input", str(isles_sample_dir), "--run", str(isles_run), "--run", str(other), "--output-dir", str(tmp_path / "out")]
    assert predict.main(argv) == 2
    assert re.search(r"other/fold_0/best_model\.pth: data contract differs from .*'s: target_shape \[16, 16, 16\] vs \[32, 32, 32\]", capsys.readouterr().out)


def test_wrong_input_kind_for_the_model(synthetic_atlas: Path, isles_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image = next(synthetic_atlas.rglob("*_T1w.nii.gz"))
    assert predict.main(["--image", str(image), "--run", str(isles_run), "--output-dir", str(tmp_path / "out")]) == 2
    assert "this model reads DWI and ADC" in capsys.readouterr().out


def _stage_reasons(summary_path: Path) -> dict[str, str]:
    return {item["case_id"]: item["reason"] for item in read_json(summary_path)["failed"]}


def test_bad_isles_input_refused_as_the_preprocessing_stage_refuses_it(isles_sample_dir: Path, isles_run: Path, tmp_path: Path) -> None:
    from test_isles import _bad_dataset

    expected = _bad_dataset(isles_sample_dir, tmp_path / "bad")
    assert preprocess_isles_WITH_BBOX.main(["--isles-dir", str(tmp_path / "bad"), "--output-dir", str(tmp_path / "stage"), "--target-shape", "24", "24", "24"]) == 1
    stage = _stage_reasons(tmp_path / "stage" / "preprocessing_summary.json")
    out = tmp_path / "out"
    assert predict.main(["--input", str(tmp_path / "bad"), "--run", str(isles_run), "--folds", "0", "--output-dir", str(out)]) == 1
    failed = _stage_reasons(out / "prediction_summary.json")
    four_d = failed.pop("sub-strokecasefourd")
    assert "without b-values" in four_d and "3-D" in stage.pop("sub-strokecasefourd")  # predict reads 4-D DWIs (--dwi-volume)
    assert failed == {case_id: reason for case_id, reason in stage.items() if "no mask file" not in reason}
    assert len(failed) == len([p for p in expected.values() if p]) - 2  # a missing mask is no error here
    rows = _csv(out / "lesion_volumes.csv")  # every failed case keeps a row with its reason
    assert [row["case_id"] for row in rows if row["status"] == "done"] == ["sub-strokecasegood1", "sub-strokecasegood2", "sub-strokecasenomask"]
    assert {row["case_id"]: row["reason"] for row in rows if row["status"] == "failed"} == {**failed, "sub-strokecasefourd": four_d}
    assert not [p for p in out.rglob(".*")], "temporary files left behind"


def test_bad_t1w_input_refused_as_the_preprocessing_stage_refuses_it(synthetic_uoa: Path, tmp_path: Path) -> None:
    from test_foundation import _bad_dataset, _config, _run

    _bad_dataset(synthetic_uoa, tmp_path / "bad")
    assert _run(_config(tmp_path, use_gpu=False), tmp_path / "stage", ["--datasets", "UOA_Private"], UOA_Private=tmp_path / "bad") == 1
    stage = _stage_reasons(tmp_path / "stage" / "UOA_Private" / "UOA_Private_summary.json")
    run = _run_dir(tmp_path / "uoa_run", "UOA_Private", ["image"], ATLAS_WINDOW, FOUNDATION_SETTINGS, folds=(0,))
    out = tmp_path / "out"
    assert predict.main(["--input", str(tmp_path / "bad"), "--run", str(run), "--output-dir", str(out)]) == 1
    failed = _stage_reasons(out / "prediction_summary.json")
    assert failed == {case_id: reason for case_id, reason in stage.items() if case_id != "NOMASK"}
    rows = _csv(out / "lesion_volumes.csv")
    assert [row["case_id"] for row in rows if row["status"] == "done"] == ["GOOD1", "GOOD2", "NOMASK"]
    assert {row["case_id"]: row["reason"] for row in rows if row["status"] == "failed"} == failed
    assert {row["case_id"] for row in _csv(out / "scores.csv")} == {"GOOD1", "GOOD2"}


def test_argument_errors(tmp_path: Path) -> None:
    for argv in (
        ["--run", "r", "--output-dir", "o"],
        ["--input", "d", "--image", "i", "--run", "r", "--output-dir", "o"],
        ["--adc", "a", "--run", "r", "--output-dir", "o"],
        ["--input", "d", "--case-id", "c", "--run", "r", "--output-dir", "o"],
        ["--dwi", "d", "--modality", "dwi=*", "--run", "r", "--output-dir", "o"],
        ["--input", "d", "--mask", "m", "--run", "r", "--output-dir", "o"],
        ["--image", "i", "--output-dir", "o"],
    ):
        with pytest.raises(SystemExit) as err:
            predict.parse_args(argv)
        assert err.value.code == 2, argv


# --------------------------------------------------------------------------- export


def test_exported_model_predicts_the_same_and_carries_a_model_card(isles_sample_dir: Path, isles_run: Path, sample_prediction: Path, tmp_path: Path) -> None:
    from strokeseg import export

    run = tmp_path / "run"
    shutil.copytree(isles_run, run)
    checkpoint = models.load_checkpoint(run / "fold_0" / "best_model.pth")
    models.save_checkpoint(run / "fold_0" / "best_model.pth", models.model_from_checkpoint(run / "fold_0" / "best_model.pth")[0],
                           checkpoint["model_config"], optimizer={"state": {}, "param_groups": []}, rng={"seed": 1},
                           **{k: v for k, v in checkpoint.items() if k not in ("format_version", "model_config", "model", models.DIGEST_KEY)})
    splits = _splits(tmp_path / "splits.json", "ISLES2022", ["sub-strokecase0009"])
    data = tmp_path / "data"
    assert preprocess_isles_WITH_BBOX.main(["--isles-dir", str(isles_sample_dir), "--output-dir", str(data), "--target-shape", *[str(ISLES_SHAPE)] * 3]) == 0
    assert evaluate.main(["--dataset", "ISLES2022", "--data-dir", str(data), "--splits-file", str(splits), "--run", f"m={run}",
                          "--png", "none", "--bootstrap", "10", "--output-dir", str(tmp_path / "eval")]) == 0
    out = tmp_path / "model"
    assert export.main([str(run), str(out), "--evaluation", str(tmp_path / "eval")]) == 0
    stored = torch.load(out / "fold_0" / "best_model.pth", weights_only=True)
    assert "optimizer" not in stored and "rng" not in stored and stored["data_contract"]["dataset"] == "ISLES2022"
    card = read_json(out / "model_card.json")
    assert card["architecture"]["variant"] == "shared" and card["data_contract"]["preprocessing"]["target_shape"] == [ISLES_SHAPE] * 3
    assert card["folds"]["fold_1"]["validation_dice"] == pytest.approx(0.5) and card["training_arguments"]["patch_size"] == ISLES_SHAPE
    assert card["evaluation"]["runs"]["m"]["fold_summary"] and card["code_version"]
    assert export.main([str(run), str(out)]) == 2  # an existing export is kept
    assert predict.main(["--input", str(isles_sample_dir), "--run", str(out), "--output-dir", str(tmp_path / "pred"), "--save-probabilities"]) == 0
    name = "sub-strokecase0009/ses-0001/sub-strokecase0009_ses-0001_desc-lesion_mask.nii.gz"
    assert np.array_equal(_voxels(tmp_path / "pred" / name), _voxels(sample_prediction / name))


def test_export_refuses_a_checkpoint_without_data_contract(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from strokeseg import export

    run = _run_dir(tmp_path / "old", "ISLES2022", ["dwi", "adc"], ISLES_SHAPE, {}, folds=(0,), contract=False)
    assert export.main([str(run), str(tmp_path / "out")]) == 2
    assert "checkpoint has no data contract" in capsys.readouterr().out and not (tmp_path / "out" / "model_card.json").exists()


# --------------------------------------------------------------------------- model folders and checkpoint integrity


def _single_case(synthetic_isles_b: Path, subject: str = "sub-strokecase0002", mask: bool = False) -> list[str]:
    """--dwi/--adc (and --mask) arguments of one layout-B case."""
    stem = synthetic_isles_b / "rawdata" / subject / "ses-0001" / f"{subject}_ses-0001"
    argv = ["--dwi", f"{stem}_dwi.nii.gz", "--adc", f"{stem}_adc.nii.gz"]
    derivative = synthetic_isles_b / "derivatives" / subject / "ses-0001" / f"{subject}_ses-0001_msk.nii.gz"
    return [*argv, "--mask", str(derivative)] if mask else argv


def _error_lines(capsys: pytest.CaptureFixture) -> list[str]:
    """The ERROR, WARNING and NOTE lines logged since the last read, without their time stamps."""
    lines = [line.split(" ", 1)[-1] for line in capsys.readouterr().out.splitlines()]
    return [line for line in lines if line.startswith(("ERROR", "WARNING", "NOTE"))]


def test_unfinished_fold_and_empty_fold_folder_are_refused_unless_allowed(synthetic_isles_b: Path, isles_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = shutil.copytree(isles_run, tmp_path / "run")
    best = run / "fold_1" / "best_model.pth"
    checkpoint = models.load_checkpoint(best)
    model = models.model_from_checkpoint(best)[0]
    keep = {k: v for k, v in checkpoint.items() if k not in ("format_version", "model_config", "model", models.DIGEST_KEY, "config")}
    config = {**checkpoint["config"], "epochs": 50}  # preempted after epoch 7 of 50, waiting for a requeue
    models.save_checkpoint(best, model, checkpoint["model_config"], config=config, **keep)
    models.save_checkpoint(run / "fold_1" / "last.pth", model, checkpoint["model_config"], config=config, **{**keep, "epoch": 7})
    (run / "fold_2").mkdir()  # a fold whose training never wrote its best model
    argv = [*_single_case(synthetic_isles_b), "--run", str(run), "--output-dir", str(tmp_path / "out")]
    capsys.readouterr()
    assert predict.main(argv) == 2
    lines = _error_lines(capsys)
    assert lines[0].startswith(f"ERROR model fold_1 ({best}): training unfinished (epoch 7 of 50); refused"), lines
    assert lines[1].startswith(f"ERROR {run / 'fold_2'}: fold folder without best_model.pth"), lines
    assert not (tmp_path / "out").exists()
    assert predict.main([*argv, "--allow-unfinished"]) == 0
    assert f"WARNING {run / 'fold_2'}: fold folder without best_model.pth" in "\n".join(_error_lines(capsys))
    (row,) = _csv(tmp_path / "out" / "lesion_volumes.csv")
    assert row["folds"] == "fold_0 fold_1" and row["unfinished"] == "fold_1: unfinished (epoch 7 of 50)"
    summary = read_json(tmp_path / "out" / "prediction_summary.json")
    assert summary["unfinished"] == {"fold_1": "unfinished (epoch 7 of 50)"} and summary["empty_fold_folders"] == [str(run / "fold_2")]
    assert predict.main([*argv[:-2], "--output-dir", str(tmp_path / "out0"), "--folds", "0"]) == 0  # chosen folds: nothing to refuse


def _rewrite_weights(path: Path, change: Callable[[dict], None]) -> None:
    """Change the stored state_dict of ``path`` in place, keeping every other entry (its digest too)."""
    checkpoint = torch.load(path, weights_only=True)
    change(checkpoint["model"])
    torch.save(checkpoint, path)


def test_altered_or_non_finite_weights_are_refused_by_predict_and_evaluate(synthetic_isles_b: Path, isles_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = shutil.copytree(isles_run, tmp_path / "run")
    path = run / "fold_0" / "best_model.pth"
    key = next(k for k, v in torch.load(path, weights_only=True)["model"].items() if v.dim() == 5)

    def flip(state: dict) -> None:  # one exponent bit: 1.1e37 is finite, only the digest tells
        state[key].view(-1)[3] = 1.1e37

    _rewrite_weights(path, flip)
    data = tmp_path / "data"
    data.mkdir()
    eval_argv = ["--dataset", "ISLES2022", "--data-dir", str(data), "--splits-file", str(_splits(tmp_path / "splits.json", "ISLES2022", ["x"])),
                 "--run", f"m={run}", "--png", "none", "--output-dir", str(tmp_path / "eval")]
    pred_argv = [*_single_case(synthetic_isles_b), "--run", str(run), "--output-dir", str(tmp_path / "out")]
    capsys.readouterr()
    message = f"{path}: weights differ from the digest recorded when it was saved"
    assert predict.main(pred_argv) == 2 and any(line.startswith(f"ERROR {message}") for line in _error_lines(capsys))
    assert evaluate.main(eval_argv) == 1 and any(line.startswith(f"ERROR {message}") for line in _error_lines(capsys))
    _rewrite_weights(path, lambda state: state[key].view(-1).__setitem__(3, float("nan")))
    message = f"{path}: non-finite weights (NaN or inf) in tensor {key!r}"
    assert predict.main(pred_argv) == 2 and any(line.startswith(f"ERROR {message}") for line in _error_lines(capsys))
    assert evaluate.main(eval_argv) == 1 and any(line.startswith(f"ERROR {message}") for line in _error_lines(capsys))
    assert not (tmp_path / "out").exists()


def test_non_finite_probabilities_fail_the_case(synthetic_isles_b: Path, isles_run: Path, tmp_path: Path) -> None:
    run = shutil.copytree(isles_run, tmp_path / "run")
    path = run / "fold_0" / "best_model.pth"
    model, checkpoint = models.model_from_checkpoint(path)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 5:
                parameter.mul_(1e6)  # finite weights whose activations overflow: NaN probabilities
    keep = {k: v for k, v in checkpoint.items() if k not in ("format_version", "model_config", "model", models.DIGEST_KEY)}
    models.save_checkpoint(path, model, checkpoint["model_config"], **keep)
    out = tmp_path / "out"
    assert predict.main([*_single_case(synthetic_isles_b), "--run", str(run), "--output-dir", str(out), "--precision", "fp32"]) == 1
    (failed,) = read_json(out / "prediction_summary.json")["failed"]
    assert failed["reason"].startswith(f"{path}: ") and "non-finite probabilities (NaN/inf) at precision fp32" in failed["reason"]
    assert not list(out.glob("*_mask.nii.gz"))
    data = tmp_path / "data"  # evaluate.py: the same model fails each case instead of scoring Dice 0
    assert preprocess_isles_WITH_BBOX.main(["--isles-dir", str(synthetic_isles_b), "--output-dir", str(data), "--target-shape", *[str(ISLES_SHAPE)] * 3]) == 0
    cases = sorted(p.stem for p in data.glob("sub-*.npz"))[:2]
    argv = ["--dataset", "ISLES2022", "--data-dir", str(data), "--splits-file", str(_splits(tmp_path / "splits.json", "ISLES2022", cases)),
            "--run", f"m={run}", "--folds", "0", "--png", "none", "--bootstrap", "10", "--output-dir", str(tmp_path / "eval")]
    assert evaluate.main(argv) == 1
    failed = read_json(tmp_path / "eval" / "summary.json")["failed"]
    assert len(failed) == 2 and all("non-finite probabilities (NaN/inf)" in f["reason"] for f in failed)


def test_export_overwrite_replaces_the_whole_folder_and_predict_checks_it_against_its_card(synthetic_isles_b: Path, isles_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from strokeseg import export

    out = tmp_path / "exported"
    assert export.main([str(isles_run), str(out)]) == 0
    assert export.main([str(isles_run), str(out), "--folds", "1", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["fold_1", "model_card.json"]  # the earlier export's fold_0 is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # nothing left beside it
    card = read_json(out / "model_card.json")
    exported = out / "fold_1" / "best_model.pth"
    assert list(card["folds"]) == ["fold_1"] and card["folds"]["fold_1"]["weights_sha256"] == models.load_checkpoint(exported)[models.DIGEST_KEY]
    argv = [*_single_case(synthetic_isles_b), "--run", str(out), "--output-dir", str(tmp_path / "pred")]
    capsys.readouterr()
    assert predict.main(argv) == 0
    capsys.readouterr()
    shutil.copytree(isles_run / "fold_0", out / "fold_0")  # a fold the card does not list
    assert predict.main(argv) == 2
    assert f"ERROR {out / 'model_card.json'}: lists folds ['fold_1'] but the folder holds ['fold_0', 'fold_1']" in _error_lines(capsys)[0]
    shutil.rmtree(out / "fold_0")
    write_json(out / "model_card.json", {**card, "folds": {"fold_1": {**card["folds"]["fold_1"], "weights_sha256": "0" * 64}}})  # an edited card
    assert predict.main(argv) == 2
    assert _error_lines(capsys)[0].startswith(f"ERROR {exported}: weights digest differs from the one {out / 'model_card.json'} records")
    (out / "model_card.json").unlink()  # a deleted card: the exported checkpoints still say what they are
    assert predict.main(argv) == 2
    assert _error_lines(capsys)[0].startswith(f"ERROR {out / 'model_card.json'}: missing, but {out} holds exported checkpoints")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine\n")
    assert export.main([str(isles_run), str(tmp_path / "other"), "--overwrite"]) == 2  # not an export: never replaced
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine\n"


def test_model_card_says_what_the_model_is_for_and_holds_no_local_paths(isles_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from strokeseg import export

    raw = tmp_path / "raw"
    (raw / "ISLES2022").mkdir(parents=True)
    write_json(raw / "synthetic.json", {"seed": 0})  # the demo's record of the data it generated
    stage = tmp_path / "prep" / "run_args.json"  # the preprocessing stage's record of its input
    write_json(stage, {"args": {"isles_dir": str(raw / "ISLES2022"), "output_dir": str(stage.parent)}})
    settings = {"source": str(stage), "target_shape": [ISLES_SHAPE] * 3, "margin": 4}
    run = _run_dir(tmp_path / "run", "ISLES2022", ["dwi", "adc"], ISLES_SHAPE, settings)
    monkeypatch.chdir(tmp_path)
    assert export.main(["run", "shared/isles_model"]) == 0
    card = read_json(tmp_path / "shared" / "isles_model" / "model_card.json")
    assert card["usage"] == "python predict.py --input DATA --run shared/isles_model --output-dir OUT"
    assert card["training_data"] == {"dataset": "ISLES2022", "data": "synthetic (generated by strokeseg.datasets.synthetic)", "synthetic": True,
                                     "train_cases": 0, "val_cases": 2, "cases": 2}
    assert "Not a medical device" in card["intended_use"] and "never seen a real patient" in card["limitations"][0]

    def strings(value: object) -> list[str]:
        if isinstance(value, dict):
            return [s for item in value.values() for s in strings(item)]
        if isinstance(value, list):
            return [s for item in value for s in strings(item)]
        return [value] if isinstance(value, str) else []

    assert not [s for s in strings(card) if s.startswith("/") or str(tmp_path) in s]
    (raw / "synthetic.json").unlink()  # real data: named by its preprocessed folder
    assert export.main([str(run), str(tmp_path / "abs_model")]) == 0
    card = read_json(tmp_path / "abs_model" / "model_card.json")
    assert card["training_data"]["data"] == "prep" and not card["training_data"]["synthetic"]
    assert card["usage"] == "python predict.py --input DATA --run abs_model --output-dir OUT"


def test_scores_say_each_cases_role_and_the_mean_uses_unseen_cases_only(synthetic_isles_b: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = {"arch": "resnet18_unet", "variant": "shared", "width": 4, "in_channels": 2}
    settings = {"target_shape": [ISLES_SHAPE] * 3, "margin": 4}
    contract = DataContract("ISLES2022", ("dwi", "adc"), "mask", (ISLES_SHAPE,) * 3, 0.5, settings, 0,
                            ("sub-strokecase0002_ses-0001",), ("sub-strokecase0003_ses-0001",))
    run = tmp_path / "run"
    models.save_checkpoint(run / "fold_0" / "best_model.pth", models.build_model(config), config, config={"fold": 0}, data_contract=contract.as_dict())
    out = tmp_path / "out"
    for subject in ("sub-strokecase0002", "sub-strokecase0003", "sub-strokecase0004"):
        assert predict.main([*_single_case(synthetic_isles_b, subject, mask=True), "--run", str(run), "--output-dir", str(out)]) == 0
    rows = _csv(out / "scores.csv")
    assert [(row["case_id"], row["role"]) for row in rows] == [
        ("sub-strokecase0002_ses-0001", "train"), ("sub-strokecase0003_ses-0001", "val"), ("sub-strokecase0004_ses-0001", "unseen")]
    output = "\n".join(_error_lines(capsys))
    assert "WARNING 1 train, 1 val case(s) scored in" in output and "left out of the mean Dice" in output
    summary = read_json(out / "prediction_summary.json")
    assert summary["roles"] == {"train": 1, "val": 1, "unseen": 1} and summary["mean_dice"] == pytest.approx(float(rows[2]["dice"]))


def test_lesion_volume_comes_from_the_affine_with_a_warning_when_pixdim_disagrees(atlas_run: Path, synthetic_uoa: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image = nib.load(str(next(synthetic_uoa.rglob("*T1*.nii*"))))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = image.affine[:3, 3]
    lying = nib.Nifti1Image(np.asarray(image.dataobj), affine)
    lying.header.set_zooms((1.0, 1.0, 1.0))  # the header says 1 mm, the affine 2 mm
    path = tmp_path / "P001.nii.gz"
    lying.to_filename(str(path))
    out = tmp_path / "out"
    capsys.readouterr()
    assert predict.main(["--image", str(path), "--run", str(atlas_run), "--output-dir", str(out), "--folds", "0"]) == 0
    (row,) = _csv(out / "lesion_volumes.csv")
    voxels = int(_voxels(out / "P001_desc-lesion_mask.nii.gz").sum())
    assert voxels > 0 and float(row["lesion_volume_ml"]) == pytest.approx(voxels * 8 / 1000)
    assert sum(float(r["volume_ml"]) for r in _csv(out / "lesions.csv")) == pytest.approx(voxels * 8 / 1000)
    assert "WARNING P001: header pixdim gives 1 mm3 per voxel but the affine 8 mm3; volumes use the affine" in "\n".join(_error_lines(capsys))
    assert read_json(out / "prediction_summary.json")["qc_warnings"]["P001"].startswith("P001: header pixdim")


def test_run_level_write_error_is_one_error_line_and_exit_2(synthetic_isles_b: Path, isles_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from strokeseg.inference import tables

    def full_disk(path: Path, rows: object, columns: object) -> None:
        raise OSError(28, f"cannot write {path}: No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(tables, "write_csv", full_disk)
        out = tmp_path / "out"
        capsys.readouterr()
        assert predict.main([*_single_case(synthetic_isles_b), "--run", str(isles_run), "--output-dir", str(out)]) == 2
        assert [line for line in _error_lines(capsys) if line.startswith("ERROR")] == [f"ERROR [Errno 28] cannot write {out / 'lesion_volumes.csv'}: No space left on device"]
    (tmp_path / "file").write_text("")
    assert predict.main([*_single_case(synthetic_isles_b), "--run", str(isles_run), "--output-dir", str(tmp_path / "file" / "out")]) == 2
    (line,) = [line for line in _error_lines(capsys) if line.startswith("ERROR")]
    assert line.startswith(f"ERROR {tmp_path / 'file' / 'out'}: cannot create the output folder")


def test_the_same_run_given_twice_is_refused(synthetic_isles_b: Path, isles_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "link").symlink_to(isles_run)
    monkeypatch.chdir(isles_run.parent)
    for other in (isles_run, f"{isles_run}/", isles_run.name, tmp_path / "link"):
        capsys.readouterr()
        assert predict.main([*_single_case(synthetic_isles_b), "--run", str(isles_run), "--run", str(other), "--output-dir", str(tmp_path / "out")]) == 2
        (line,) = _error_lines(capsys)
        assert line.startswith(f"ERROR --run {Path(other)} and --run {isles_run} are the same folder"), line
    assert not (tmp_path / "out").exists()
