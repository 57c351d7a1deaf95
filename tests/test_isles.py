"""ISLES 2022 preprocessing: both layouts on the real sample case, native-space mapping, bad input."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import preprocess_isles_WITH_BBOX
import preprocess_v2_isles
import strokeseg.datasets.splits
from strokeseg.core.geometry import uncrop_to_native
from strokeseg.core.io import CaseError, load_npz, read_json
from strokeseg.datasets.isles import BBOX_KEYS, discover_isles_cases

SUB = "sub-strokecase0009"


def _sample_files(sample_dir: Path) -> dict[str, Path]:
    ses = sample_dir / "rawdata" / SUB / "ses-0001"
    return {
        "dwi": ses / f"{SUB}_ses-0001_dwi.nii.gz",
        "adc": ses / f"{SUB}_ses-0001_adc.nii.gz",
        "flair": ses / f"{SUB}_ses-0001_flair.nii.gz",
        "msk": sample_dir / "derivatives" / SUB / "ses-0001" / f"{SUB}_ses-0001_msk.nii.gz",
    }


def _layout_a_copy(sample_dir: Path, root: Path) -> Path:
    """The Zenodo BIDS layout (A), with upper-case FLAIR, built from the layout-B sample."""
    files = _sample_files(sample_dir)
    ses = root / SUB / "ses-0001"
    for kind, sub_dir, name in (("dwi", "dwi", "dwi"), ("adc", "dwi", "adc"), ("flair", "anat", "FLAIR")):
        target = ses / sub_dir / f"{SUB}_ses-0001_{name}.nii.gz"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(files[kind], target)
    mask = root / "derivatives" / SUB / "ses-0001" / files["msk"].name
    mask.parent.mkdir(parents=True)
    shutil.copy(files["msk"], mask)
    return root


@pytest.fixture(scope="module")
def bbox_output(isles_sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("isles_bbox")
    assert preprocess_isles_WITH_BBOX.main(["--isles-dir", str(isles_sample_dir / "derivatives"), "--output-dir", str(out)]) == 0
    return out


def test_discovers_both_layouts_from_root_or_derivatives(isles_sample_dir: Path, tmp_path: Path) -> None:
    root_a = _layout_a_copy(isles_sample_dir, tmp_path / "A")
    for isles_dir in (isles_sample_dir, isles_sample_dir / "derivatives", root_a, root_a / "derivatives"):
        (case,) = discover_isles_cases(isles_dir)
        assert case.case_id == SUB
        assert case.source("dwi").name.endswith("_dwi.nii.gz") and case.source("adc").name.endswith("_adc.nii.gz")
        assert case.source("label").name.endswith("_msk.nii.gz")


def test_no_isles_files_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CaseError, match="no ISLES 2022 files"):
        discover_isles_cases(tmp_path)


def test_bbox_output_keys_dtypes_shapes(bbox_output: Path, isles_sample_dir: Path) -> None:
    data = load_npz(bbox_output / f"{SUB}.npz")
    assert set(data) == set(BBOX_KEYS)
    for key in ("dwi", "adc"):
        assert data[key].shape == (96, 96, 96) and data[key].dtype == np.float32
        nonzero = data[key][data[key] != 0]
        assert abs(nonzero.mean()) < 1e-4 and abs(nonzero.std() - 1.0) < 1e-4
    assert data["mask"].dtype == np.uint8 and set(np.unique(data["mask"])) == {0, 1}
    assert data["original_shape"].tolist() == [112, 112, 73]
    assert data["original_mask"].shape == (112, 112, 73) and data["original_mask"].dtype == np.uint8
    assert (data["bbox"][:, 1] - data["bbox"][:, 0]).tolist() == data["cropped_shape"].tolist()
    header = nib.load(str(_sample_files(isles_sample_dir)["dwi"]))
    np.testing.assert_allclose(data["original_affine"], header.affine, atol=1e-6)
    np.testing.assert_allclose(data["spacing"], header.header.get_zooms()[:3], atol=1e-6)
    # The lesion must survive the crop: the native mask is the real one.
    assert int(data["original_mask"].sum()) == 523


def test_native_mapping_of_stored_mask_matches_original(bbox_output: Path) -> None:
    data = load_npz(bbox_output / f"{SUB}.npz")
    back = uncrop_to_native(data["mask"].astype(np.float32), data["bbox"], data["cropped_shape"], data["original_shape"], is_label=False) >= 0.5
    ref = data["original_mask"].astype(bool)
    dice = 2 * (back & ref).sum() / (back.sum() + ref.sum())
    assert dice >= 0.9


def test_layout_a_and_b_give_identical_training_output(isles_sample_dir: Path, tmp_path: Path) -> None:
    root_a = _layout_a_copy(isles_sample_dir, tmp_path / "A")
    out_a, out_b = tmp_path / "out_a", tmp_path / "out_b"
    # One case is too few for splits: the case is still written and the stage exits non-zero.
    assert preprocess_v2_isles.main(["--isles-dir", str(root_a), "--output-dir", str(out_a)]) == 1
    assert preprocess_v2_isles.main(["--isles-dir", str(isles_sample_dir / "derivatives"), "--output-dir", str(out_b)]) == 1
    assert not (out_a / "isles2022_splits_5fold.json").exists()
    a, b = load_npz(out_a / f"{SUB}.npz"), load_npz(out_b / f"{SUB}.npz")
    assert set(a) == {"dwi", "adc", "mask", "lesion_ml"}
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    msk = nib.load(str(_sample_files(isles_sample_dir)["msk"]))
    native_ml = float(np.asarray(msk.dataobj).sum()) * float(np.prod(msk.header.get_zooms()[:3])) / 1000.0
    assert a["lesion_ml"].dtype == np.float64 and float(a["lesion_ml"]) == pytest.approx(native_ml, rel=1e-6)


def _native_ml(root: Path) -> dict[str, float]:
    """Case id -> lesion ml of the layout-B masks, from the NIfTI files themselves."""
    out = {}
    for path in sorted((root / "derivatives").rglob("*_msk.nii.gz")):
        img = nib.load(str(path))
        out[path.name.split("_")[0]] = float(np.asarray(img.dataobj).sum()) * float(np.prod(img.header.get_zooms()[:3])) / 1000.0
    return out


def test_splits_file_from_synthetic_cases(synthetic_isles_b: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    stratified_on = {}
    real = strokeseg.datasets.splits.write_splits_once
    monkeypatch.setattr(strokeseg.datasets.splits, "write_splits_once", lambda path, volumes, **kw: stratified_on.update(volumes) or real(path, volumes, **kw))
    assert preprocess_v2_isles.main(["--isles-dir", str(synthetic_isles_b), "--output-dir", str(out), "--target-shape", "24", "24", "16", "--workers", "2"]) == 0
    # Issue 13.4: the stratification keys are native lesion volumes in ml, not voxels of the 24x24x16 grid
    expected = _native_ml(synthetic_isles_b)
    assert stratified_on.keys() == expected.keys() and len(expected) == 6
    for case, ml in expected.items():
        assert stratified_on[case] == pytest.approx(ml, rel=1e-6), case  # header zooms are float32
    grid_voxels = {c: float(load_npz(out / f"{c}.npz", keys=("mask",))["mask"].sum()) for c in expected}
    assert any(abs(grid_voxels[c] - ml) > 1 for c, ml in expected.items())  # the two keys differ here
    splits = read_json(out / "isles2022_splits_5fold.json")
    cases = sorted(p.stem for p in out.glob("*.npz"))
    assert sorted(splits) == [f"fold_{i}" for i in range(5)]
    test = set(splits["fold_0"]["ISLES2022"]["test"])
    val_union: list[str] = []
    for fold in splits.values():
        parts = fold["ISLES2022"]
        assert set(parts["test"]) == test
        assert set(parts["train"]) | set(parts["val"]) | test == set(cases)
        assert not set(parts["train"]) & set(parts["val"])
        val_union += parts["val"]
    assert sorted(val_union) == sorted(set(cases) - test)  # every CV case validated exactly once
    data = load_npz(out / f"{cases[0]}.npz")
    assert data["dwi"].shape == (24, 24, 16)


# --- bad input -------------------------------------------------------------------------------

def _write(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def _bad_dataset(sample_dir: Path, root: Path) -> dict[str, str]:
    """Layout-B tree of real-data variants; returns case id -> expected reason pattern ('' = good)."""
    files = _sample_files(sample_dir)
    dwi_img, adc_img, msk_img = (nib.load(str(files[k])) for k in ("dwi", "adc", "msk"))
    dwi, adc = dwi_img.get_fdata(dtype=np.float32), adc_img.get_fdata(dtype=np.float32)
    msk, affine = np.asarray(msk_img.dataobj).astype(np.uint16), dwi_img.affine
    nan_dwi = dwi.copy()
    nan_dwi[50, 50, 30] = np.nan
    bad_mask = msk.copy()
    bad_mask[bad_mask == 1] = 2
    shifted = affine.copy()
    shifted[0, 3] += 5.0
    variants = {
        "good1": ({}, ""),
        "trunc": ({"dwi": "truncate"}, "unreadable NIfTI"),
        "noadc": ({"adc": None}, "no ADC file"),
        "nomask": ({"msk": None}, "no mask file"),
        "shape": ({"adc": (adc[:, :, :-1], affine)}, "shape .* differs"),
        "affine": ({"adc": (adc, shifted)}, "affine differs"),
        "nan": ({"dwi": (nan_dwi, affine)}, "NaN/Inf"),
        "fourd": ({"dwi": (np.stack([dwi, dwi], axis=-1), affine)}, "expected a 3-D volume"),
        "labels": ({"msk": (bad_mask, affine)}, "mask values must be 0/1"),
        "empty": ({"dwi": (np.zeros_like(dwi), affine)}, "constant image"),
        "good2": ({}, ""),
    }
    expected = {}
    for name, (changes, reason) in variants.items():
        sub = f"sub-strokecase{name}"
        ses = root / "rawdata" / sub / "ses-0001"
        targets = {
            "dwi": ses / f"{sub}_ses-0001_dwi.nii.gz",
            "adc": ses / f"{sub}_ses-0001_adc.nii.gz",
            "msk": root / "derivatives" / sub / "ses-0001" / f"{sub}_ses-0001_msk.nii.gz",
        }
        defaults = {"dwi": (dwi, affine), "adc": (adc, affine), "msk": (msk, affine)}
        for kind, target in targets.items():
            change = changes.get(kind, defaults[kind])
            if change is None:
                continue
            if change == "truncate":
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(files["dwi"].read_bytes()[:5000])
                continue
            _write(target, *change)
        expected[sub] = reason
    return expected


def test_every_bad_input_reported_and_good_cases_written(isles_sample_dir: Path, tmp_path: Path) -> None:
    expected = _bad_dataset(isles_sample_dir, tmp_path / "bad")
    out = tmp_path / "out"
    status = preprocess_isles_WITH_BBOX.main(["--isles-dir", str(tmp_path / "bad"), "--output-dir", str(out)])
    assert status == 1
    summary = read_json(out / "preprocessing_summary.json")
    failed = {item["case_id"]: item["reason"] for item in summary["failed"]}
    for case_id, pattern in expected.items():
        if pattern:
            assert case_id in failed, case_id
            assert re.search(pattern, failed[case_id]), (case_id, failed[case_id])
            assert "\n" not in failed[case_id]
            assert not (out / f"{case_id}.npz").exists()
        else:
            assert (out / f"{case_id}.npz").exists()
    assert summary["n_done"] == 2 and summary["n_failed"] == len(expected) - 2
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_rerun_skips_finished_cases_unless_overwrite(isles_sample_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--isles-dir", str(isles_sample_dir), "--output-dir", str(out), "--target-shape", "32", "32", "24"]
    assert preprocess_isles_WITH_BBOX.main(args) == 0
    stamp = (out / f"{SUB}.npz").stat().st_mtime_ns
    assert preprocess_isles_WITH_BBOX.main(args) == 0
    assert read_json(out / "preprocessing_summary.json")["n_skipped"] == 1
    assert (out / f"{SUB}.npz").stat().st_mtime_ns == stamp
    assert preprocess_isles_WITH_BBOX.main(args + ["--overwrite"]) == 0
    assert read_json(out / "preprocessing_summary.json")["n_done"] == 1
    assert read_json(out / "run_args.json")["args"]["overwrite"] is True
