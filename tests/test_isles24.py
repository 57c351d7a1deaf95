"""ISLES 2024 end to end on synthetic data in the release layout: the generator
(strokeseg.datasets.synthetic_isles24), the reader and prepare (strokeseg.datasets.isles24), and
the ISLES stage scripts with --dataset ISLES2024 (preprocess, train shared/separate and the third
network, evaluate on the native NCCT grid with the isles24 preset, predict)."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import evaluate
import predict
import preprocess_isles_WITH_BBOX
import preprocess_v2_isles
import train_isles_resnet18
from strokeseg.core.case import LABEL, Case
from strokeseg.core.case_io import read_images
from strokeseg.core.io import CaseError, affines_match, load_npz, read_json, save_nifti
from strokeseg.datasets import synthetic_isles24
from strokeseg.datasets.isles24 import (
    INPUT_KEYS, ISLES2024, NCCT_WINDOW_HU, prepare_isles24, read_isles24_cases, window,
)
from strokeseg.datasets.registry import dataset_spec

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

SHAPE = (40, 40, 16)  # nominal NCCT grid of the synthetic cases (varied per case)
TARGET = ["32", "32", "32"]
IDS = [f"sub-stroke{i:04d}" for i in range(1, 9)]
MAPS = ("cbf", "cbv", "mtt", "tmax")
SETTINGS = {"target_shape": [24, 20, 16], "margin": 2}


def read(case: Case) -> Case:
    """A reader's case read at the door, as the preprocessing stage reads it."""
    return read_images(case, INPUT_KEYS)


def release_paths(root: Path, sub: str) -> dict[str, Path]:
    """The SPEC.md file names of one case, spelled out independently of the generator."""
    raw, acute, follow_up = root / "rawdata" / sub / "ses-01", root / "derivatives" / sub / "ses-01", root / "derivatives" / sub / "ses-02"
    paths = {"ncct": raw / f"{sub}_ses-01_ncct.nii.gz", "cta": raw / f"{sub}_ses-01_cta.nii.gz", "ctp": raw / f"{sub}_ses-01_ctp.nii.gz",
             "cta_ncct": acute / f"{sub}_ses-01_space-ncct_cta.nii.gz", "ctp_ncct": acute / f"{sub}_ses-01_space-ncct_ctp.nii.gz",
             "msk": follow_up / f"{sub}_ses-02_lesion-msk.nii.gz"}
    paths.update({name: acute / "perfusion-maps" / f"{sub}_ses-01_space-ncct_{name}.nii.gz" for name in MAPS})
    return paths


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 synthetic ISLES 2024 cases, the 4th with an empty label."""
    root = tmp_path_factory.mktemp("isles24") / "raw"
    assert synthetic_isles24.make_isles24(root, 8, seed=0, shape=SHAPE, empty_every=4) == IDS
    return root


# --------------------------------------------------------------------------- generator


def test_generator_writes_the_release_layout_units_and_a_learnable_signal(raw: Path) -> None:
    for sub in IDS:
        paths = release_paths(raw, sub)
        assert all(p.is_file() for p in paths.values()), sub
        assert sorted(raw.rglob(f"{sub}_*.nii.gz")) == sorted(paths.values())
    paths = release_paths(raw, "sub-stroke0001")
    ncct, tmax, cbf = (nib.load(str(paths[k])) for k in ("ncct", "tmax", "cbf"))
    label = np.asanyarray(nib.load(str(paths["msk"])).dataobj).astype(bool)
    assert ncct.get_data_dtype() == np.int16 and tmax.get_data_dtype() == np.float32
    assert nib.load(str(paths["ctp"])).shape[:3] == ncct.shape and len(nib.load(str(paths["ctp"])).shape) == 4
    hu = np.asanyarray(ncct.dataobj)
    assert hu.min() == -1024 and hu.max() > 500  # air and bone in Hounsfield units
    t, f = np.asanyarray(tmax.dataobj), np.asanyarray(cbf.dataobj)
    brain = t > 0
    assert label.any() and not (label & ~brain).any()
    assert t[label].mean() > 3 * t[brain & ~label].mean() and f[label].mean() < 0.5 * f[brain & ~label].mean()
    for name in ("ncct", "tmax", "msk"):
        assert affines_match(nib.load(str(paths[name])).affine, ncct.affine)
    assert not np.asanyarray(nib.load(str(release_paths(raw, "sub-stroke0004")["msk"])).dataobj).any()


def test_generator_case_depends_on_seed_and_index_only(tmp_path: Path) -> None:
    synthetic_isles24.make_isles24(tmp_path / "two", 2, seed=3, shape=(24, 24, 10))
    synthetic_isles24.make_isles24(tmp_path / "one", 1, seed=3, shape=(24, 24, 10))
    synthetic_isles24.make_isles24(tmp_path / "other", 1, seed=4, shape=(24, 24, 10))
    tmax_of = lambda root: np.asanyarray(nib.load(str(release_paths(root, "sub-stroke0001")["tmax"])).dataobj)  # noqa: E731
    assert np.array_equal(tmax_of(tmp_path / "two"), tmax_of(tmp_path / "one"))
    assert not np.array_equal(tmax_of(tmp_path / "one"), tmax_of(tmp_path / "other"))


# --------------------------------------------------------------------------- reader


def test_reader_finds_modalities_in_channel_order_and_the_ses02_label(raw: Path) -> None:
    for folder in (raw, raw / "derivatives"):
        cases = read_isles24_cases(folder)
        assert [c.case_id for c in cases] == IDS
    case = cases[0]
    paths = release_paths(raw, case.case_id)
    assert tuple(case.sources) == (*INPUT_KEYS, LABEL)
    assert {key: case.source(key) for key in INPUT_KEYS} == {key: paths[key] for key in INPUT_KEYS}
    assert case.source(LABEL) == paths["msk"] and not case.images and not case.problem
    native = read(case)
    assert native.keys == INPUT_KEYS
    for key in INPUT_KEYS:
        assert native.image(key).data.dtype == np.float32
        assert affines_match(native.image(key).affine, nib.load(str(paths["ncct"])).affine)
    assert native.label.data.dtype == np.uint8 and native.label.data.shape == native.shape
    assert np.array_equal(native.label.data, np.asanyarray(nib.load(str(paths["msk"])).dataobj))


def test_reader_reports_doubled_missing_and_off_grid_files(raw: Path, tmp_path: Path) -> None:
    root = tmp_path / "raw"
    shutil.copytree(raw, root)
    tmax = release_paths(root, "sub-stroke0001")["tmax"]
    shutil.copy(tmax, tmax.with_name(tmax.name.replace(".nii.gz", ".nii")))
    release_paths(root, "sub-stroke0002")["msk"].unlink()
    cbf = release_paths(root, "sub-stroke0003")["cbf"]
    image = nib.load(str(cbf))
    save_nifti(cbf, np.asanyarray(image.dataobj), image.affine + np.diag([0, 0, 0.5, 0]))
    cases = {c.case_id: c for c in read_isles24_cases(root)}
    assert "2 tmax files" in cases["sub-stroke0001"].problem
    with pytest.raises(CaseError, match="2 tmax files"):
        read(cases["sub-stroke0001"])
    assert cases["sub-stroke0002"].source(LABEL) is None
    with pytest.raises(CaseError, match="no label file"):
        read(cases["sub-stroke0002"])
    assert read_images(cases["sub-stroke0002"], INPUT_KEYS, require_label=False).label is None
    with pytest.raises(CaseError, match="affine differs from the ncct"):
        read(cases["sub-stroke0003"])
    with pytest.raises(CaseError, match="no ISLES 2024 files"):
        read_isles24_cases(tmp_path)


# --------------------------------------------------------------------------- prepare


def test_prepare_crops_resamples_and_normalises_inside_the_brain(raw: Path) -> None:
    native = read(read_isles24_cases(raw)[0])
    prepared = prepare_isles24(native, SETTINGS)
    bbox, meta = prepared.meta["bbox"], prepared.meta
    assert prepared.keys == INPUT_KEYS and prepared.shape == (24, 20, 16)
    assert meta["cropped_shape"] == tuple(bbox[:, 1] - bbox[:, 0])
    brain = np.any([native.image(k).data != 0 for k in MAPS], axis=0)
    hits = [np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    assert bbox.tolist() == [[max(h[0] - 2, 0), min(h[-1] + 3, n)] for h, n in zip(hits, native.shape)]
    for key in INPUT_KEYS:
        data = prepared.image(key).data
        inside = data[data != 0]
        assert data.dtype == np.float32 and abs(inside.mean()) < 1e-3 and abs(inside.std() - 1) < 1e-3
    assert prepared.label.data.dtype == np.uint8 and set(np.unique(prepared.label.data)) == {0, 1}
    assert meta["lesion_ml"] == pytest.approx(native.label.data.sum() * native.first.voxel_volume_ml)
    # the network grid's affine maps its corner voxel edges onto the crop's
    corner = native.affine @ np.array([*(bbox[:, 0] - 0.5), 1.0])
    assert np.allclose(prepared.affine @ np.array([-0.5, -0.5, -0.5, 1.0]), corner)
    with pytest.raises(ValueError, match="margin"):
        prepare_isles24(native, {"target_shape": [24, 20, 16], "margin": -1})


def test_window_clips_ncct_to_the_brain_window_and_maps_to_their_percentiles() -> None:
    ncct = np.array([-1024.0, -5.0, 30.0, 1000.0], dtype=np.float32).reshape(1, 2, 2)
    brain = np.ones((1, 2, 2), dtype=bool)
    assert window("ncct", ncct, brain).ravel().tolist() == [NCCT_WINDOW_HU[0], 0.0, 30.0, NCCT_WINDOW_HU[1]]
    tmax = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    clipped = window("tmax", tmax, np.ones_like(tmax, dtype=bool))
    assert clipped.min() == pytest.approx(np.percentile(tmax, 0.5)) and clipped.max() == pytest.approx(np.percentile(tmax, 99.5))


def test_spec_is_registered_with_native_scoring_and_the_isles24_preset() -> None:
    spec = dataset_spec("ISLES2024")
    assert spec is ISLES2024 and spec.input_keys == INPUT_KEYS and spec.preset == "isles24"
    assert spec.scoring_grid == "native" and spec.reader is read_isles24_cases and spec.prepare is prepare_isles24
    assert "ISLES2024" in preprocess_v2_isles.parse_args(["--isles-dir", ".", "--output-dir", ".", "--dataset", "ISLES2024"]).dataset


# --------------------------------------------------------------------------- the script chain


@pytest.fixture(scope="module")
def chain(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both ISLES preprocessing stages on the synthetic release (32³, margin 2)."""
    root = tmp_path_factory.mktemp("isles24_chain")
    for script, name in ((preprocess_v2_isles, "train"), (preprocess_isles_WITH_BBOX, "eval")):
        argv = ["--dataset", "ISLES2024", "--isles-dir", str(raw), "--output-dir", str(root / name), "--target-shape", *TARGET, "--margin", "2"]
        assert script.main(argv) == 0
    return root


def _train(chain: Path, name: str, modalities: str, *flags: str) -> Path:
    """One tiny fold-0 run (group norm: batch norm at batch size 2 and a 1-voxel bottleneck
    barely learns in 8 epochs)."""
    run = chain / name
    argv = ["--dataset", "ISLES2024", "--isles-dir", str(chain / "train"), "--output-dir", str(run), "--modalities", modalities,
            "--width", "4", "--norm", "group", "--patch-size", "32", "--epochs", "8", "--lr", "1e-2", "--augment", "off", "--batch-size", "2", "--workers", "0", "--fold", "0", *flags]
    assert train_isles_resnet18.main(argv) == 0
    return run


def _trivial_dice(chain: Path, case_ids: list[str]) -> float:
    """The better mean validation Dice of two trivial predictions: empty (1 on an empty
    reference, else 0) and every voxel lesion (0 on an empty reference)."""
    masks = [load_npz(chain / "train" / f"{case_id}.npz", keys=("mask",))["mask"].astype(bool) for case_id in case_ids]
    empty = np.mean([0.0 if m.any() else 1.0 for m in masks])
    everything = np.mean([2 * m.sum() / (m.sum() + m.size) for m in masks])
    return float(max(empty, everything))


def _assert_learned(chain: Path, run: Path) -> None:
    with open(run / "fold_0" / "history.csv") as f:
        dice = [float(row["val_dice"]) for row in csv.DictReader(f)]
    val = read_json(chain / "train" / "isles2024_splits_5fold.json")["fold_0"]["ISLES2024"]["val"]
    assert max(dice) > _trivial_dice(chain, val) and dice[-1] > dice[0], (dice, val)


def test_preprocessing_writes_the_isles_contract_for_isles2024(chain: Path) -> None:
    train = load_npz(chain / "train" / "sub-stroke0001.npz")
    assert sorted(train) == sorted((*INPUT_KEYS, "mask", "lesion_ml"))
    assert all(train[key].shape == (32, 32, 32) and train[key].dtype == np.float32 for key in INPUT_KEYS)
    evaluation = load_npz(chain / "eval" / "sub-stroke0001.npz")
    assert {"bbox", "original_shape", "cropped_shape", "original_affine", "original_mask", "spacing"} <= set(evaluation)
    assert evaluation["original_mask"].shape == tuple(evaluation["original_shape"])
    splits = read_json(chain / "train" / "isles2024_splits_5fold.json")
    fold = splits["fold_0"]["ISLES2024"]
    assert sorted(fold["train"] + fold["val"] + fold["test"]) == IDS
    assert read_json(chain / "train" / "preprocessing_summary.json")


@pytest.fixture(scope="module")
def shared_run(chain: Path) -> Path:
    return _train(chain, "shared", "all", "--strategy", "shared")


@pytest.mark.slow(27)
def test_train_shared_learns(chain: Path, shared_run: Path) -> None:
    _assert_learned(chain, shared_run)


@pytest.mark.slow(30)
def test_train_separate_and_the_third_network_learn(chain: Path) -> None:
    # two perfusion maps keep these runs small; separate infers with its first (Tmax) network
    _assert_learned(chain, _train(chain, "separate", "tmax,cbf", "--strategy", "separate"))
    _assert_learned(chain, _train(chain, "resenc", "tmax,cbf", "--strategy", "shared", "--arch", "resenc_unet"))


def test_evaluate_scores_on_the_native_ncct_grid_with_the_isles24_preset(chain: Path, shared_run: Path) -> None:
    out = chain / "evaluation"
    argv = ["--dataset", "ISLES2024", "--preset", "isles24", "--data-dir", str(chain / "eval"), "--splits-file",
            str(chain / "train" / "isles2024_splits_5fold.json"), "--run", f"shared={shared_run}", "--folds", "0",
            "--output-dir", str(out), "--device", "cpu", "--save-nifti"]
    assert evaluate.main(argv) == 0
    summary = read_json(out / "summary.json")
    assert summary["dataset"] == "ISLES2024" and summary["preset"]["name"] == "isles24"
    with open(out / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    test_ids = read_json(chain / "train" / "isles2024_splits_5fold.json")["fold_0"]["ISLES2024"]["test"]
    assert sorted(row["case_id"] for row in rows) == sorted(test_ids)
    for row in rows:
        reference = np.asanyarray(nib.load(str(release_paths(_raw_of(chain), row["case_id"])["msk"])).dataobj)
        assert int(row["ref_voxels"]) == int(reference.sum())  # scored against the native label


def _raw_of(chain: Path) -> Path:
    return Path(read_json(chain / "train" / "run_args.json")["args"]["isles_dir"])


@pytest.mark.slow(13)
def test_predict_reads_the_raw_release_and_writes_masks_on_the_ncct_grid(chain: Path, shared_run: Path) -> None:
    raw = _raw_of(chain)
    out = chain / "prediction"
    assert predict.main(["--input", str(raw), "--run", str(shared_run), "--output-dir", str(out), "--device", "cpu", "--precision", "fp32"]) == 0
    masks = sorted(out.rglob("*_desc-lesion_mask.nii.gz"))
    assert len(masks) == len(IDS)
    mask = nib.load(str(next(m for m in masks if m.name.startswith("sub-stroke0001"))))
    ncct = nib.load(str(release_paths(raw, "sub-stroke0001")["ncct"]))
    assert mask.shape == ncct.shape and affines_match(mask.affine, ncct.affine)
    with open(out / "scores.csv") as f:
        scores = {row["case_id"]: row for row in csv.DictReader(f)}
    assert set(scores) == set(IDS) and float(scores["sub-stroke0001"]["dice"]) > 0
