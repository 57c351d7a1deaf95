"""BraTS 2024 T2-FLAIR preprocessing: discovery, outputs, patient-grouped splits, bad input, re-runs."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import preprocess_brats2024_t2flair
from strokeseg.core.geometry import resample_to_shape
from strokeseg.core.io import CaseError, load_npz, read_json
from strokeseg.datasets.brats import discover_brats_cases, preprocess_brats_case

SHAPE = ("37", "41", "29")  # odd sizes, finer than the 32x32x24 input


@pytest.fixture(scope="module")
def brats_out(brats_seven: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("brats_out")
    assert preprocess_brats2024_t2flair.main(["--brats-dir", str(brats_seven), "--output-dir", str(out), "--target-shape", *SHAPE]) == 0
    return out


def test_discovery_groups_visits_by_patient(synthetic_brats: Path) -> None:
    cases = discover_brats_cases(synthetic_brats)
    assert [c.case_id for c in cases] == [
        "BraTS-GLI-00005-100", "BraTS-GLI-00007-100", "BraTS-GLI-00007-101",
        "BraTS-GLI-00009-100", "BraTS-GLI-00011-100", "BraTS-GLI-00011-101",
    ]
    assert [c.meta["patient_id"] for c in cases] == ["00005", "00007", "00007", "00009", "00011", "00011"]
    assert all(c.source("image").name.endswith("-t2f.nii.gz") and c.source("label").name.endswith("-seg.nii.gz") for c in cases)


def test_discovery_is_case_insensitive_and_nested(synthetic_brats: Path, tmp_path: Path) -> None:
    source = synthetic_brats / "BraTS-GLI-00005-100"
    target = tmp_path / "release" / "part1" / "brats-gli-00005-100"
    target.mkdir(parents=True)
    for kind in ("t2f", "seg"):
        shutil.copy(source / f"BraTS-GLI-00005-100-{kind}.nii.gz", target / f"BRATS-GLI-00005-100-{kind.upper()}.NII.GZ")
    (case,) = discover_brats_cases(tmp_path / "release")
    assert case.case_id == "brats-gli-00005-100" and case.meta["patient_id"] == "00005"
    assert case.source("image").name == "BRATS-GLI-00005-100-T2F.NII.GZ" and case.source("label") is not None
    with pytest.raises(CaseError, match="no BraTS-GLI-PPPPP-VVV case folders"):
        discover_brats_cases(tmp_path / "release" / "part1" / "brats-gli-00005-100")


def test_outputs_keys_dtypes_nearest_mask_and_zscore(brats_out: Path, brats_seven: Path) -> None:
    target = tuple(int(s) for s in SHAPE)
    npzs = sorted(brats_out.glob("*.npz"))
    assert len(npzs) == 10
    volumes = []
    for path in npzs:
        data = load_npz(path)
        assert set(data) == {"image", "mask"}
        assert data["image"].dtype == np.float32 and data["image"].shape == target
        assert data["mask"].dtype == np.uint8 and set(np.unique(data["mask"])) <= {0, 1}
        seg_img = nib.load(str(brats_seven / path.stem / f"{path.stem}-seg.nii.gz"))
        tumour = (np.asarray(seg_img.dataobj) > 0).astype(np.uint8)
        # Labels 1-4 merged, then nearest neighbour: exactly the nearest resampling of the union.
        np.testing.assert_array_equal(data["mask"], resample_to_shape(tumour, target, is_label=True))
        out_voxel_mm3 = np.prod(np.array(seg_img.shape) / np.array(target))
        volumes.append((data["mask"].sum() * out_voxel_mm3, tumour.sum()))
        nonzero = data["image"][data["image"] != 0].astype(np.float64)
        assert abs(nonzero.mean()) < 1e-4 and abs(nonzero.std() - 1.0) < 1e-4
    # Nearest neighbour keeps tumour volume (mm^3): per case up to sampling noise of these tiny
    # blobs (46-455 voxels), in total within 3 %; trilinear + "> 0" would inflate every case.
    resampled, native = np.array(volumes).T
    assert np.all(np.abs(resampled / native - 1.0) < 0.25)
    assert resampled.sum() == pytest.approx(native.sum(), rel=0.03)
    summary = read_json(brats_out / "preprocessing_summary.json")
    assert summary["n_done"] == 10 and summary["dataset"] == "BraTS2024" and summary["keys"] == ["image", "mask"]


def test_labels_one_to_four_merged_on_a_hand_made_case(tmp_path: Path) -> None:
    case_id = "BraTS-GLI-00001-100"
    folder = tmp_path / case_id
    folder.mkdir()
    seg = np.zeros((12, 10, 8), dtype=np.uint8)
    for label in (1, 2, 3, 4):
        seg[2 * label : 2 * label + 2, 2:6, 2:5] = label
    flair = np.where(seg > 0, 3.0, 1.0).astype(np.float32)
    flair[0] = 0.0
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(flair, affine), str(folder / f"{case_id}-t2f.nii.gz"))
    nib.save(nib.Nifti1Image(seg, affine), str(folder / f"{case_id}-seg.nii.gz"))
    (case,) = discover_brats_cases(tmp_path)
    result = preprocess_brats_case(case, tmp_path / "out", (12, 10, 8), overwrite=False)
    assert result.status == "done" and result.info["lesion_voxels"] == 4 * 2 * 4 * 3
    data = load_npz(tmp_path / "out" / f"{case_id}.npz")
    np.testing.assert_array_equal(data["mask"], (seg > 0).astype(np.uint8))  # label 4 (cavity) included
    assert not data["image"][0].any()  # zero background stays 0 after the z-score
    values = flair[flair != 0]
    np.testing.assert_allclose(data["image"][1:], ((flair[1:] - values.mean()) / values.std()), atol=1e-5)


def test_splits_in_output_dir_grouped_by_patient(brats_seven: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"
    args = ["--brats-dir", str(brats_seven), "--output-dir", str(out), "--target-shape", "12", "12", "10", "--seed", "5"]
    assert preprocess_brats2024_t2flair.main(args) == 0
    assert not list(cwd.iterdir()), "nothing may be written to the current directory"
    splits = read_json(out / "brats2024_t2flair_splits_5fold.json")
    assert sorted(splits) == [f"fold_{k}" for k in range(5)]
    patient = lambda case: case.split("-")[2]  # noqa: E731
    cases = {p.stem for p in out.glob("*.npz")}
    test = set(splits["fold_0"]["BraTS2024"]["test"])
    assert len({patient(c) for c in test}) == 1  # round(0.1 * 7) patients
    vals = []
    for fold in splits.values():
        parts = fold["BraTS2024"]
        sides = [{patient(c) for c in parts[k]} for k in ("train", "val", "test")]
        assert not sides[0] & sides[1] and not sides[0] & sides[2] and not sides[1] & sides[2]
        assert set(parts["train"]) | set(parts["val"]) | set(parts["test"]) == cases
        vals += parts["val"]
    assert sorted(vals) == sorted(cases - test)


def _bad_dataset(source: Path, root: Path) -> dict[str, str]:
    """Variants of one good visit; case id -> reason pattern ('' = good)."""
    case = "BraTS-GLI-00005-100"
    flair_img = nib.load(str(source / case / f"{case}-t2f.nii.gz"))
    flair, affine = flair_img.get_fdata(dtype=np.float32), flair_img.affine
    seg = np.asarray(nib.load(str(source / case / f"{case}-seg.nii.gz")).dataobj).astype(np.uint8)
    nan = flair.copy()
    nan[3, 3, 3] = np.nan
    bad_seg = seg.copy()
    bad_seg[seg == 2] = 5
    shifted = affine.copy()
    shifted[2, 3] += 2.0
    variants = {
        "00100": ((flair, affine), (seg, affine), ""),
        "00101": ("truncate", (seg, affine), "unreadable NIfTI"),
        "00102": (None, (seg, affine), r"no T2-FLAIR file \(BraTS-GLI-00102-100-t2f.nii.gz\)"),
        "00103": ((flair, affine), None, r"no segmentation file"),
        "00104": ((flair, affine), (bad_seg, affine), r"mask values must be 0/1/2/3/4; found other value\(s\) \{5\}"),
        "00105": ((flair, affine), (seg[:-1], affine), "shape .* differs from T2-FLAIR"),
        "00106": ((flair, affine), (seg, shifted), "affine differs"),
        "00107": ((nan, affine), (seg, affine), "NaN/Inf"),
        "00108": ((flair, affine), (seg, affine), ""),
    }
    expected = {}
    for patient, (image, label, reason) in variants.items():
        case_id = f"BraTS-GLI-{patient}-100"
        folder = root / case_id
        folder.mkdir(parents=True)
        if image == "truncate":
            (folder / f"{case_id}-t2f.nii.gz").write_bytes((source / case / f"{case}-t2f.nii.gz").read_bytes()[:3000])
        elif image is not None:
            nib.save(nib.Nifti1Image(*image), str(folder / f"{case_id}-t2f.nii.gz"))
        if label is not None:
            nib.save(nib.Nifti1Image(*label), str(folder / f"{case_id}-seg.nii.gz"))
        expected[case_id] = reason
    return expected


def test_every_bad_input_reported_and_good_cases_written(synthetic_brats: Path, tmp_path: Path) -> None:
    expected = _bad_dataset(synthetic_brats, tmp_path / "bad")
    out = tmp_path / "out"
    assert preprocess_brats2024_t2flair.main(["--brats-dir", str(tmp_path / "bad"), "--output-dir", str(out), "--target-shape", *SHAPE]) == 1
    summary = read_json(out / "preprocessing_summary.json")
    failed = {item["case_id"]: item["reason"] for item in summary["failed"]}
    for case_id, pattern in expected.items():
        if pattern:
            assert re.search(pattern, failed[case_id]), (case_id, failed.get(case_id))
            assert "\n" not in failed[case_id] and not (out / f"{case_id}.npz").exists()
        else:
            assert (out / f"{case_id}.npz").exists()
    assert summary["n_done"] == 2 and summary["n_failed"] == len(expected) - 2
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_rerun_skips_unless_overwrite(synthetic_brats: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--brats-dir", str(synthetic_brats), "--output-dir", str(out), "--target-shape", "10", "11", "9"]
    # 4 patients are too few for a test set plus 5 folds: visits written, no splits, status 1.
    assert preprocess_brats2024_t2flair.main(args) == 1
    assert not (out / "brats2024_t2flair_splits_5fold.json").exists()
    target = out / "BraTS-GLI-00005-100.npz"
    stamp = target.stat().st_mtime_ns
    preprocess_brats2024_t2flair.main(args)
    assert read_json(out / "preprocessing_summary.json")["n_skipped"] == 6 and target.stat().st_mtime_ns == stamp
    preprocess_brats2024_t2flair.main(args + ["--overwrite"])
    assert read_json(out / "preprocessing_summary.json")["n_done"] == 6 and target.stat().st_mtime_ns != stamp
    assert read_json(out / "run_args.json")["args"]["overwrite"] is True
