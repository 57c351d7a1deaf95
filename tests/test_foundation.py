"""ATLAS / UOA full-volume preprocessing: config, pairing, outputs, resampling, bad input, re-runs."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

import preprocess_stroke_foundation
from strokeseg.core import geometry
from strokeseg.core.geometry import brain_mask_from_image, spacing_to_shape
from strokeseg.core.io import load_npz, read_json
from strokeseg.datasets import foundation
from strokeseg.datasets.foundation import (
    FOUNDATION_KEYS,
    case_id_from_filename,
    load_config,
    parse_config,
)

REPO = Path(__file__).resolve().parents[1]
ATLAS_STEM = "space-MNI152NLin2009aSym"


def _config(tmp_path: Path, **preprocessing) -> Path:
    """The shipped config.json with overrides of its preprocessing block, written to tmp_path."""
    raw = json.loads((REPO / "config.json").read_text())
    raw["preprocessing"].update(preprocessing)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return path


def _run(config: Path, out: Path, extra: list[str] = (), **data_dirs: Path) -> int:
    argv = ["--config", str(config), "--output-base-dir", str(out)]
    for name, path in data_dirs.items():
        argv += ["--data-dir", f"{name}={path}"]
    return preprocess_stroke_foundation.main(argv + list(extra))


@pytest.fixture(scope="module")
def atlas_out(synthetic_atlas: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("foundation_atlas")
    assert _run(_config(tmp), tmp / "out", ["--datasets", "ATLAS"], ATLAS=synthetic_atlas) == 0
    return tmp / "out" / "ATLAS"


@pytest.fixture(scope="module")
def uoa_out(synthetic_uoa: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("foundation_uoa")
    # 4 cases are too few for a test set plus 5 folds: cases are written, the stage exits 1.
    assert _run(_config(tmp), tmp / "out", ["--datasets", "UOA_Private"], UOA_Private=synthetic_uoa) == 1
    return tmp / "out" / "UOA_Private"


# --------------------------------------------------------------------------- config


def test_shipped_config_is_the_papers_example() -> None:
    config = load_config(REPO / "config.json")
    assert str(config.output_base_dir) == "/path/to/preprocessed_stroke_foundation"
    assert config.preprocessing.target_spacing == (1.0, 1.0, 1.0)
    assert config.preprocessing.clip_percentile == 99.5 and config.preprocessing.use_gpu is True
    assert [(d.name, str(d.data_dir), d.image_pattern, d.mask_pattern) for d in config.datasets] == [
        ("ATLAS", "/path/to/ATLAS", "**/*_T1w.nii.gz", "**/*_label-L_desc-T1lesion_mask.nii.gz"),
        ("UOA_Private", "/path/to/UOA", "**/*_T1_FNIRT_MNI.nii.gz", "**/*_lesion.nii.gz"),
    ]


def test_config_problems_are_reported_together() -> None:
    raw = json.loads((REPO / "config.json").read_text())
    raw["preprocessing"]["clip_percentil"] = 99.0
    raw["preprocessing"]["use_gpu"] = "yes"
    raw["preprocessing"]["clip_percentile"] = True
    raw["preprocessing"]["target_spacing"] = [1.0, 1.0]
    del raw["datasets"][1]["mask_pattern"]
    raw["extra"] = 1
    with pytest.raises(ValueError) as err:
        parse_config(raw, "cfg.json")
    message = str(err.value)
    assert message.startswith("cfg.json: invalid config: ") and "\n" not in message
    for part in (
        "config: unknown key 'extra'",
        "preprocessing: unknown key 'clip_percentil'",
        "preprocessing.use_gpu must be a boolean, got 'yes'",
        "preprocessing.clip_percentile must be a number, got True",
        "target_spacing must be 3 positive numbers (mm) or null, got [1.0, 1.0]",
        "datasets[1]: missing key 'mask_pattern'",
    ):
        assert part in message, part


@pytest.mark.parametrize(
    "change, message",
    [
        ({"datasets": []}, "datasets must list at least one dataset"),
        ({"output_base_dir": None}, "config: missing key 'output_base_dir'"),
        ({"datasets": [{"name": "A", "data_dir": "x", "image_pattern": "*", "mask_pattern": "*"}] * 2}, "dataset name 'A' appears more than once"),
        ({"preprocessing": {"normalization_method": "minmax"}}, "normalization_method must be one of ['zscore'], got 'minmax'"),
        ({"preprocessing": {"clip_percentile": 30}}, "clip_percentile must be in (50, 100], got 30"),
    ],
)
def test_config_single_problems(change: dict, message: str) -> None:
    raw = json.loads((REPO / "config.json").read_text())
    raw.update(change)
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_config(raw)


def test_command_line_overrides(tmp_path: Path) -> None:
    config = load_config(REPO / "config.json", tmp_path / "o", {"UOA_Private": tmp_path / "u"})
    assert config.output_base_dir == tmp_path / "o"
    assert [d.data_dir for d in config.datasets] == [Path("/path/to/ATLAS"), tmp_path / "u"]
    with pytest.raises(ValueError, match=r"--data-dir names \['UOA'\] are not datasets"):
        load_config(REPO / "config.json", None, {"UOA": tmp_path})


@pytest.mark.parametrize(
    "name, case_id",
    [
        (f"sub-r001s001_ses-1_{ATLAS_STEM}_T1w.nii.gz", "sub-r001s001_ses-1"),
        (f"sub-r001s001_ses-1_{ATLAS_STEM}_label-L_desc-T1lesion_mask.nii.gz", "sub-r001s001_ses-1"),
        ("P001_T1_FNIRT_MNI.nii.gz", "P001"),
        ("P001_lesion.nii.gz", "P001"),
        ("P001_T1_lesion.nii", "P001"),
        ("plain.nii.gz", "plain"),
    ],
)
def test_case_id_from_filename(name: str, case_id: str) -> None:
    assert case_id_from_filename(name) == case_id


# --------------------------------------------------------------------------- outputs


def test_atlas_outputs_keys_dtypes_and_metadata(atlas_out: Path, synthetic_atlas: Path) -> None:
    npzs = sorted(atlas_out.glob("*.npz"))
    assert len(npzs) == 6
    for path in npzs:
        case_id = path.stem
        data = load_npz(path)
        meta = read_json(atlas_out / f"{case_id}_metadata.json")
        image_path = next(synthetic_atlas.rglob(f"{case_id}_{ATLAS_STEM}_T1w.nii.gz"))
        header = nib.load(str(image_path))
        mask_native = np.asarray(nib.load(meta["mask_path"]).dataobj)
        assert set(data) == set(FOUNDATION_KEYS)
        assert data["image"].dtype == np.float32 and data["image"].shape == header.shape == (48, 56, 44)
        for key in ("lesion_mask", "brain_mask"):
            assert data[key].dtype == np.uint8 and set(np.unique(data[key])) <= {0, 1}
        np.testing.assert_array_equal(data["lesion_mask"], mask_native)  # 1 mm input: untouched
        brain = data["brain_mask"].astype(bool)
        inside = data["image"][brain].astype(np.float64)
        assert abs(inside.mean()) < 1e-4 and abs(inside.std() - 1.0) < 1e-4
        assert not data["image"][~brain].any()
        # The clip happened: the top 0.5 % of brain voxels share the maximum value.
        assert (inside == inside.max()).mean() >= 0.004
        assert meta["case_id"] == case_id and meta["dataset"] == "ATLAS" and meta["image_path"] == str(image_path)
        np.testing.assert_allclose(meta["affine"], header.affine, atol=1e-6)
        assert meta["shape"] == meta["original_shape"] == [48, 56, 44] and meta["resampled"] is False
        assert meta["lesion_voxels"] == int(mask_native.sum()) and meta["has_lesion"] == bool(mask_native.any())
        assert meta["lesion_ml"] == pytest.approx(mask_native.sum() / 1000.0)
        assert meta["preprocessing"]["clip_percentile"] == 99.5 and meta["preprocessing"]["device"] == "cpu"
    assert read_json(atlas_out / "sub-r002s002_ses-1_metadata.json")["has_lesion"] is False


def test_atlas_summary_and_splits(atlas_out: Path) -> None:
    summary = read_json(atlas_out / "ATLAS_summary.json")
    assert summary["n_done"] == 6 and summary["n_failed"] == 0 and summary["dataset"] == "ATLAS"
    splits = read_json(atlas_out / "ATLAS_splits_5fold.json")
    cases = {p.stem for p in atlas_out.glob("*.npz")}
    test = set(splits["fold_0"]["ATLAS"]["test"])
    assert len(test) == 1  # round(0.15 * 6)
    vals = [c for k in range(5) for c in splits[f"fold_{k}"]["ATLAS"]["val"]]
    assert sorted(vals) == sorted(cases - test)  # the lesion-free case is kept, validated once
    assert (atlas_out / "run_args.json").exists()


def test_uoa_resampled_case_keeps_world_geometry_and_lesion_volume(uoa_out: Path, synthetic_uoa: Path) -> None:
    meta = read_json(uoa_out / "UOA004_metadata.json")
    native = nib.load(str(synthetic_uoa / "UOA004" / "UOA004_T1_FNIRT_MNI.nii.gz"))
    native_mask = np.asarray(nib.load(str(synthetic_uoa / "UOA004" / "UOA004_lesion.nii.gz")).dataobj)
    zooms = native.header.get_zooms()[:3]
    data = load_npz(uoa_out / "UOA004.npz")
    shape = spacing_to_shape(native.shape, zooms, (1.0, 1.0, 1.0))
    assert meta["resampled"] is True and meta["shape"] == list(shape) == list(data["image"].shape)
    assert meta["original_shape"] == list(native.shape) and meta["original_spacing"] == pytest.approx(zooms)
    np.testing.assert_allclose(meta["spacing"], np.array(zooms) * native.shape / np.array(shape))
    np.testing.assert_allclose(meta["original_affine"], native.affine, atol=1e-6)
    affine, old, new = np.array(meta["affine"]), np.array(native.shape), np.array(shape)
    world = lambda a, ijk: (a @ np.append(ijk, 1.0))[:3]  # noqa: E731
    for ijk_old, ijk_new in ((-0.5 * np.ones(3), -0.5 * np.ones(3)), (old - 0.5, new - 0.5), ((old - 1) / 2, (new - 1) / 2)):
        np.testing.assert_allclose(world(affine, ijk_new), world(native.affine, ijk_old), atol=1e-6)
    lesion = data["lesion_mask"]
    assert lesion.dtype == np.uint8 and set(np.unique(lesion)) <= {0, 1}
    native_mm3 = native_mask.sum() * np.prod(zooms)
    assert meta["lesion_ml"] * 1000 == pytest.approx(native_mm3, rel=0.1)
    assert meta["original_lesion_ml"] * 1000 == pytest.approx(native_mm3)
    assert read_json(uoa_out / "UOA001_metadata.json")["resampled"] is False


def test_uoa_too_few_for_splits_still_writes_cases(uoa_out: Path) -> None:
    assert len(list(uoa_out.glob("*.npz"))) == 4
    assert not (uoa_out / "UOA_Private_splits_5fold.json").exists()


def test_use_gpu_without_cuda_is_logged_once(synthetic_uoa: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _run(_config(tmp_path, use_gpu=True), tmp_path / "out", ["--datasets", "UOA_Private"], UOA_Private=synthetic_uoa)
    out = capsys.readouterr().out
    assert out.count("use_gpu requested but CUDA unavailable; running on CPU") == 1


@pytest.mark.parametrize("sparse_limit", [0.02, 0.0])  # 0.0: always the labelling fallback
def test_hole_filling_equals_scipy_on_random_volumes(sparse_limit: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(geometry, "_SPARSE_HOLES_MAX_FRACTION", sparse_limit)
    rng = np.random.default_rng(5)
    for trial in range(200):
        shape = tuple(int(n) for n in rng.integers(1, 13, 3))
        volume = rng.random(shape) < rng.uniform(0.3, 0.95)
        if trial % 2:
            volume = ndimage.binary_dilation(volume)  # larger, nested holes
        np.testing.assert_array_equal(geometry._fill_holes(volume), ndimage.binary_fill_holes(volume), err_msg=str(shape))


def test_normalisation_of_a_fortran_ordered_volume_equals_the_c_ordered_one() -> None:
    """nibabel's Fortran order is processed as its C-ordered transpose; results match exactly."""
    rng = np.random.default_rng(6)
    image = (ndimage.gaussian_filter(rng.normal(size=(21, 26, 18)), 2) * 40 + 3).astype(np.float32)
    image[rng.random(image.shape) < 0.03] = 0.0
    settings = foundation.PreprocessingConfig()
    fortran = np.asfortranarray(image)
    out_c = foundation.normalise_in_brain(image, settings, None, Path("c.nii"))
    out_f = foundation.normalise_in_brain(fortran, settings, None, Path("f.nii"))
    for a, b in zip(out_c[:2], out_f[:2]):
        np.testing.assert_array_equal(a, b)
    assert out_c[2] == out_f[2] and out_f[0].flags.f_contiguous and out_f[1].flags.f_contiguous
    np.testing.assert_array_equal(out_c[1], ndimage.binary_fill_holes(image > 0).astype(np.uint8))


def test_brain_mask_equals_binary_fill_holes() -> None:
    rng = np.random.default_rng(4)
    image = ndimage.gaussian_filter(rng.normal(size=(30, 34, 26)), 2) + 0.02
    image[:3] = 0
    image[rng.random(image.shape) < 0.05] = -1.0  # speckle holes inside the foreground
    expected = ndimage.binary_fill_holes(image > 0)
    mask = brain_mask_from_image(image, 0.0)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, expected.astype(np.uint8))
    assert not brain_mask_from_image(np.zeros((4, 4, 4))).any()


# --------------------------------------------------------------------------- bad input and re-runs


def _bad_dataset(source: Path, root: Path) -> dict[str, str]:
    """UOA-layout variants built from one good case; case id -> reason pattern ('' = good)."""
    image = nib.load(str(source / "UOA001" / "UOA001_T1_FNIRT_MNI.nii.gz"))
    data, affine = image.get_fdata(dtype=np.float32), image.affine
    mask = np.asarray(nib.load(str(source / "UOA001" / "UOA001_lesion.nii.gz")).dataobj).astype(np.float32)
    nan_image = data.copy()
    nan_image[5, 5, 5] = np.nan
    shifted = affine.copy()
    shifted[1, 3] += 3.0
    bad_labels = mask.copy()
    bad_labels[mask == 1] = 2
    variants = {
        "GOOD1": ((data, affine), (mask, affine), ""),
        "TRUNC": ("truncate", (mask, affine), "unreadable NIfTI"),
        "NOMASK": ((data, affine), None, r"no mask matching '\*\*/\*_lesion.nii.gz'"),
        "NOIMAGE": (None, (mask, affine), r"no image matching"),
        "SHAPE": ((data, affine), (mask[:, :, :-1], affine), "shape .* differs from image"),
        "AFFINE": ((data, affine), (mask, shifted), "affine differs"),
        "NAN": ((nan_image, affine), (mask, affine), "NaN/Inf"),
        "LABELS": ((data, affine), (bad_labels, affine), "mask values must be 0/1"),
        "EMPTY": ((np.zeros_like(data), affine), (mask, affine), "constant image"),
        "GOOD2": ((data, affine), (mask, affine), ""),
    }
    for case_id, (img, msk, _) in variants.items():
        folder = root / case_id
        folder.mkdir(parents=True)
        if img == "truncate":
            (folder / f"{case_id}_T1_FNIRT_MNI.nii.gz").write_bytes((source / "UOA001" / "UOA001_T1_FNIRT_MNI.nii.gz").read_bytes()[:4000])
        elif img is not None:
            nib.save(nib.Nifti1Image(*img), str(folder / f"{case_id}_T1_FNIRT_MNI.nii.gz"))
        if msk is not None:
            nib.save(nib.Nifti1Image(*msk), str(folder / f"{case_id}_lesion.nii.gz"))
    return {case_id: reason for case_id, (_, _, reason) in variants.items()}


def test_every_bad_input_reported_and_good_cases_written(synthetic_uoa: Path, tmp_path: Path) -> None:
    expected = _bad_dataset(synthetic_uoa, tmp_path / "bad")
    out = tmp_path / "out"
    assert _run(_config(tmp_path), out, ["--datasets", "UOA_Private"], UOA_Private=tmp_path / "bad") == 1
    folder = out / "UOA_Private"
    summary = read_json(folder / "UOA_Private_summary.json")
    failed = {item["case_id"]: item["reason"] for item in summary["failed"]}
    for case_id, pattern in expected.items():
        if pattern:
            assert re.search(pattern, failed[case_id]), (case_id, failed.get(case_id))
            assert "\n" not in failed[case_id] and not (folder / f"{case_id}.npz").exists()
        else:
            assert (folder / f"{case_id}.npz").exists() and (folder / f"{case_id}_metadata.json").exists()
    assert summary["n_done"] == 2 and summary["n_failed"] == len(expected) - 2
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_missing_data_dir_fails_the_dataset_only(synthetic_atlas: Path, tmp_path: Path) -> None:
    status = _run(_config(tmp_path), tmp_path / "out", [], ATLAS=synthetic_atlas, UOA_Private=tmp_path / "nowhere")
    assert status == 1
    assert read_json(tmp_path / "out" / "ATLAS" / "ATLAS_summary.json")["n_done"] == 6


def test_rerun_skips_unless_overwrite(synthetic_atlas: Path, tmp_path: Path) -> None:
    data = tmp_path / "atlas"
    shutil.copytree(synthetic_atlas, data)
    config, out = _config(tmp_path), tmp_path / "out"
    assert _run(config, out, ["--datasets", "ATLAS"], ATLAS=data) == 0
    target = out / "ATLAS" / "sub-r001s001_ses-1.npz"
    stamp = target.stat().st_mtime_ns
    assert _run(config, out, ["--datasets", "ATLAS"], ATLAS=data) == 0
    summary = read_json(out / "ATLAS" / "ATLAS_summary.json")
    assert summary["n_skipped"] == 6 and target.stat().st_mtime_ns == stamp
    assert _run(config, out, ["--datasets", "ATLAS", "--overwrite"], ATLAS=data) == 0
    assert read_json(out / "ATLAS" / "ATLAS_summary.json")["n_done"] == 6 and target.stat().st_mtime_ns != stamp
