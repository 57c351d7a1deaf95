"""Datasets are data (issue 22): a native-space T1w cohort (ISLES 2026 / ATLAS v3 style) is a
config.json entry and nothing else. No package edit and no registration call: the entry alone
makes "ISLES2026" a dataset of every stage, run here end to end on cases of different shapes.
"""
from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import evaluate
import extract_patches_96x96x96
import predict
import preprocess_stroke_foundation
import train_stroke
from strokeseg.core.case import LABEL, Case, Image
from strokeseg.core.io import load_npz, read_json, save_nifti, write_json
from strokeseg.datasets import registry
from strokeseg.datasets.registry import CONFIG_ENV, dataset_names, dataset_spec

NAME = "ISLES2026"
PATCH = 32
SPACING = 1.2  # mm: native voxels, resampled to the config's 1 mm
SHAPES = [(30, 34, 28), (34, 30, 32), (28, 32, 30), (32, 36, 29), (36, 30, 33), (30, 29, 35), (33, 33, 28), (31, 28, 32)]


def _case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A head-like ellipsoid (T1w about 100, background 0) with one dark spherical lesion."""
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij"), axis=-1)
    centre, radii = (np.array(shape) - 1) / 2, np.array(shape) * 0.42
    head = (((grid - centre) / radii) ** 2).sum(-1) <= 1.0
    lesion_centre = centre + rng.uniform(-0.25, 0.25, 3) * np.array(shape)
    lesion = ((grid - lesion_centre) ** 2).sum(-1) <= rng.uniform(5.0, 6.5) ** 2
    image = np.where(head, 100.0 + rng.normal(0.0, 4.0, shape), 0.0).astype(np.float32)
    image[lesion & head] = 30.0 + rng.normal(0.0, 4.0, int((lesion & head).sum()))
    return image, (lesion & head).astype(np.uint8)


def _write_cohort(root: Path) -> dict[str, tuple[int, int, int]]:
    """ISLES 2026-like native-space files: ``sub-NNN/ses-1/anat/sub-NNN_ses-1_T1w.nii.gz`` and
    ``..._label-L_desc-T1lesion_mask.nii.gz``, a different shape per case."""
    rng = np.random.default_rng(7)
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    shapes = {}
    for index, shape in enumerate(SHAPES):
        case_id = f"sub-{index + 1:03d}_ses-1"
        anat = root / f"sub-{index + 1:03d}" / "ses-1" / "anat"
        image, lesion = _case(rng, shape)
        save_nifti(anat / f"{case_id}_T1w.nii.gz", image, affine)
        save_nifti(anat / f"{case_id}_label-L_desc-T1lesion_mask.nii.gz", lesion, affine)
        shapes[case_id] = shape
    return shapes


@pytest.fixture
def cohort(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, dict]:
    """The raw cohort and a config.json listing it; the registry reads that config (the
    environment variable) and starts from its built-ins only, for this test."""
    shapes = _write_cohort(tmp_path / "raw")
    config = tmp_path / "config.json"
    write_json(config, {
        "output_base_dir": str(tmp_path / "foundation"),
        "preprocessing": {"target_spacing": [1.0, 1.0, 1.0], "use_gpu": False},
        "datasets": [{
            "name": NAME, "data_dir": str(tmp_path / "raw"), "display_name": "ISLES 2026",
            "image_pattern": "**/*_T1w.nii.gz", "mask_pattern": "**/*_label-L_desc-T1lesion_mask.nii.gz",
            "id_markers": ["_T1w", "_label-"], "preset": "isles22", "patch_size": PATCH,
        }],
    })
    dataset_names()  # built-ins registered before the registry is copied
    monkeypatch.setattr(registry, "_DATASETS", {name: spec for name, spec in registry._DATASETS.items() if name != NAME})
    monkeypatch.setattr(registry, "_configs_read", set())
    monkeypatch.setenv(CONFIG_ENV, str(config))
    return tmp_path, config, shapes


def test_a_config_entry_is_a_dataset(cohort: tuple[Path, Path, dict]) -> None:
    _, _, shapes = cohort
    spec = dataset_spec(NAME)
    assert (spec.display_name, spec.preset, spec.patch_size, spec.scoring_grid) == ("ISLES 2026", "isles22", PATCH, "preprocessed")
    assert spec.input_keys == ("image",) and spec.label_pattern == "**/*_label-L_desc-T1lesion_mask.nii.gz"
    cases = spec.reader(Path(read_json(Path(str(cohort[1])))["datasets"][0]["data_dir"]))
    assert [case.case_id for case in cases] == sorted(shapes)
    assert all(case.source("image").name.endswith("_T1w.nii.gz") and case.source(LABEL) is not None for case in cases)


def test_prepare_maps_a_native_case_onto_the_network_grid() -> None:
    spec = dataset_spec("ATLAS")
    rng = np.random.default_rng(1)
    image, lesion = _case(rng, (20, 24, 18))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    native = Case("c1", {"image": Image(image, affine)}, Image(lesion, affine))
    prepared = spec.prepare(native, {"target_spacing": [1.0, 1.0, 1.0]})
    assert prepared.image("image").shape == (40, 48, 36) and prepared.label.shape == (40, 48, 36)
    assert prepared.image("image").zooms == (1.0, 1.0, 1.0) and prepared.meta["cropped_shape"] == (20, 24, 18)
    assert prepared.image("image").data.dtype == np.float32 and set(np.unique(prepared.image("brain_mask").data)) == {0, 1}
    np.testing.assert_array_equal(prepared.meta["bbox"], [[0, 20], [0, 24], [0, 18]])


def _dice_rows(path: Path) -> list[float]:
    with open(path, newline="") as f:
        return [float(row["val_dice"]) for row in csv.DictReader(f) if row["val_dice"]]


def _whole_brain_dice(folder: Path, case_ids: list[str]) -> float:
    """Mean validation Dice of predicting the whole brain as lesion (what an untrained network
    that says "lesion" everywhere scores); an empty prediction scores 0."""
    scores = []
    for case_id in case_ids:
        data = load_npz(folder / f"{case_id}.npz", keys=("lesion_mask", "brain_mask"))
        lesion, brain = int(data["lesion_mask"].sum()), int(data["brain_mask"].sum())
        scores.append(2 * lesion / (lesion + brain))
    return float(np.mean(scores))


@pytest.mark.slow(13)
def test_isles2026_runs_every_stage_from_its_config_entry(cohort: tuple[Path, Path, dict]) -> None:
    root, config, shapes = cohort
    out = root / "foundation"
    assert preprocess_stroke_foundation.main(["--config", str(config)]) == 0
    preprocessed = {p.stem: load_npz(p, keys=("image",))["image"].shape for p in (out / NAME).glob("*.npz")}
    assert sorted(preprocessed) == sorted(shapes) and len(set(preprocessed.values())) == len(SHAPES)  # every case its own shape
    assert extract_patches_96x96x96.main(["--input_dir", str(out), "--output_dir", str(out), "--datasets", NAME, "--patch_size", str(PATCH),
                                          "--max_patches", "4", "--min_lesion_overlap", "0.0001"]) == 0
    run = root / "run"
    train = ["--dataset", NAME, "--data-dir", str(out), "--arch", "resnet18", "--width", "4", "--output-dir", str(run), "--fold", "0",
             "--epochs", "4", "--batch-size", "2", "--workers", "0", "--patches-per-volume", "4", "--lr", "3e-3"]
    assert train_stroke.main(train) == 0  # no --patch-size: the entry's
    contract = read_json(run / "fold_0" / "run_args.json")["args"]
    assert contract["patch_size"] == PATCH
    val_cases = read_json(out / NAME / f"{NAME}_splits_5fold.json")["fold_0"][NAME]["val"]
    assert max(_dice_rows(run / "fold_0" / "history.csv")) > 2 * _whole_brain_dice(out / NAME, val_cases)  # it learned: above empty (0) and "everywhere"
    scores = root / "scores"
    assert evaluate.main(["--dataset", NAME, "--data-dir", str(out), "--run", f"ours={run}", "--output-dir", str(scores),
                          "--png", "none", "--bootstrap", "20", "--sw-batch-size", "4"]) == 0
    assert read_json(scores / "summary.json")["preset"]["name"] == "isles22"
    masks = root / "masks"
    assert predict.main(["--input", str(root / "raw"), "--run", str(run), "--output-dir", str(masks), "--config", str(config), "--device", "cpu"]) == 0
    written = {p.name.split("_desc-")[0]: p for p in masks.rglob("*_desc-lesion_mask.nii.gz")}
    assert sorted(written) == sorted(shapes)
    for case_id, path in written.items():
        mask = nib.load(str(path))
        assert mask.shape == shapes[case_id] and np.allclose(mask.affine, np.diag([SPACING] * 3 + [1.0]))  # the native grid
