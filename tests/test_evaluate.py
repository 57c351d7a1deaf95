"""evaluate.py and strokeseg.evaluation.engine: native-space scoring on the real ISLES case, NIfTI
geometry, end-to-end runs on synthetic ISLES and ATLAS data with untrained tiny checkpoints,
and every bad input named in one line."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import scipy.stats

import evaluate
import models
import preprocess_isles_WITH_BBOX
import preprocess_stroke_foundation
from strokeseg.datasets.contract import DataContract
from strokeseg.core.io import load_npz, read_json, save_npz, write_json
from strokeseg.datasets.isles import load_isles_case
from strokeseg.inference import fold_models as fm
from strokeseg.inference.inferer import Inferer
from strokeseg.evaluation.engine import score_probability
from strokeseg.core.metrics import PRESETS
from strokeseg.core.metrics import dice as metrics_dice
from strokeseg.evaluation.statistics import holm

SUB = "sub-strokecase0009"
ISLES_SHAPE = 24  # preprocessed synthetic ISLES grid (voxels per axis)


def _checkpoint(path: Path, model_config: dict, run_config: dict | None, seed: int = 0, head_bias: tuple[float, float] | None = None, **extra: object) -> Path:
    """An untrained checkpoint laid out as the trainer writes it (config = its run arguments).
    head_bias: (background, lesion) logits added by the output layer, so the foreground
    probability leans (or, with head weights zeroed too, is fixed) as wanted."""
    torch.manual_seed(seed)
    model = models.build_model(model_config)
    if head_bias is not None:
        with torch.no_grad():
            model.decoders[0].head.bias.copy_(torch.tensor(head_bias))
    models.save_checkpoint(path, model, model_config, **({"config": run_config} if run_config is not None else {}), **extra)
    return path


def _isles_run(root: Path, variant: str, folds: tuple[int, ...], seed: int, **overrides: object) -> Path:
    """A run folder of untrained width-4 ResNet U-Nets, one per fold."""
    for fold in folds:
        config = {"isles_dir": "/data/isles", "strategy": variant, "init": "scratch", "fold": fold, "patch_size": ISLES_SHAPE, **overrides}
        _checkpoint(root / f"fold_{fold}" / "best_model.pth", {"arch": "resnet18", "variant": variant, "width": 4}, config, seed + fold)
    return root


def _splits(path: Path, dataset: str, test: list[str], n_folds: int = 2) -> Path:
    # Train/val ids need not exist: evaluation only reads the test cases.
    write_json(path, {f"fold_{k}": {dataset: {"train": [f"train{k}"], "val": [f"val{k}"], "test": test}} for k in range(n_folds)})
    return path


def _isles_setup(data: Path, tmp_path: Path, n_cases: int, runs: list[tuple[str, str, int]], *extra: str) -> tuple[list[str], Path, list[str]]:
    """The first ``n_cases`` test cases, a two-fold run folder per (label, variant, seed) and the
    evaluate.py arguments scoring them: (cases, output folder, argv)."""
    cases = sorted(p.stem for p in data.glob("*.npz"))[:n_cases]
    splits = _splits(tmp_path / "splits.json", "ISLES2022", cases)
    run_args = [arg for i, (label, variant, seed) in enumerate(runs) for arg in ("--run", f"{label}={_isles_run(tmp_path / f'run{i}', variant, (0, 1), seed)}")]
    out = tmp_path / "out"
    return cases, out, ["--dataset", "ISLES2022", "--data-dir", str(data), "--splits-file", str(splits), *run_args, "--output-dir", str(out), *extra]


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sample_eval(isles_sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sample_eval")
    assert preprocess_isles_WITH_BBOX.main(["--isles-dir", str(isles_sample_dir), "--output-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def isles_eval(synthetic_isles_a: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("isles_eval")
    shape = [str(ISLES_SHAPE)] * 3
    assert preprocess_isles_WITH_BBOX.main(["--isles-dir", str(synthetic_isles_a), "--output-dir", str(out), "--target-shape", *shape]) == 0
    return out


@pytest.fixture(scope="module")
def atlas_base(synthetic_atlas: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("foundation")
    config = {
        "output_base_dir": str(base),
        "preprocessing": {"target_spacing": [1.0, 1.0, 1.0], "use_gpu": False},
        "datasets": [{"name": "ATLAS", "data_dir": str(synthetic_atlas), "image_pattern": "**/*_T1w.nii.gz",
                      "mask_pattern": "**/*_label-L_desc-T1lesion_mask.nii.gz"}],
    }
    write_json(base / "config.json", config)
    assert preprocess_stroke_foundation.main(["--config", str(base / "config.json")]) == 0
    return base


# --------------------------------------------------------------------------- real ISLES case


def test_perfect_crop_prediction_scores_high_on_native_grid(sample_eval: Path) -> None:
    case = load_isles_case(sample_eval, SUB, ("dwi", "adc"))
    perfect = load_npz(sample_eval / f"{SUB}.npz", keys=("mask",))["mask"].astype(np.float32)
    assert perfect.shape == (96, 96, 96)
    prediction, metrics = score_probability(perfect, case, "isles22")
    assert prediction.shape == (112, 112, 73) and prediction.dtype == bool
    assert metrics["dice"] >= 0.9
    assert metrics["connectivity"] == 26 and metrics["ref_voxels"] == 523
    assert metrics["abs_volume_diff_ml"] == pytest.approx(metrics["abs_volume_diff_voxels"] * case.label.voxel_volume_ml)
    _, empty = score_probability(np.zeros_like(perfect), case, "isles22")
    assert empty["dice"] == 0.0 and empty["pred_voxels"] == 0


def test_saved_nifti_has_the_source_grid(sample_eval: Path, isles_sample_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _checkpoint(run / "fold_0" / "best_model.pth", {"arch": "resnet18", "variant": "dwi_only", "width": 4}, {"dataset": "ISLES2022", "fold": 0})
    splits = _splits(tmp_path / "splits.json", "ISLES2022", [SUB], n_folds=1)
    out = tmp_path / "out"
    argv = ["--dataset", "ISLES2022", "--data-dir", str(sample_eval), "--splits-file", str(splits), "--run", f"dwi={run}",
            "--output-dir", str(out), "--save-nifti", "--png", "none", "--bootstrap", "20"]
    assert evaluate.main(argv) == 0
    saved = nib.load(str(out / "predictions" / "dwi" / "fold_0" / f"{SUB}.nii.gz"))
    source = nib.load(str(isles_sample_dir / "rawdata" / SUB / "ses-0001" / f"{SUB}_ses-0001_dwi.nii.gz"))
    assert saved.shape == source.shape == (112, 112, 73)
    np.testing.assert_allclose(saved.affine, source.affine, atol=1e-5)
    assert saved.get_data_dtype() == np.uint8
    data = np.asarray(saved.dataobj)
    assert set(np.unique(data)) <= {0, 1}
    (row,) = _csv(out / "per_case.csv")
    assert int(row["pred_voxels"]) == int(data.sum())
    assert read_json(out / "summary.json")["runs"]["dwi"]["checkpoints"]["fold_0"]["window"] == [96, 96, 96]


# --------------------------------------------------------------------------- end to end


def test_isles_two_runs_two_folds_end_to_end(isles_eval: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cases, out, argv = _isles_setup(isles_eval, tmp_path, 6, [("shared", "shared", 0), ("dwi", "dwi_only", 10)],
                                    "--ensemble", "--compare", "shared", "dwi", "--bootstrap", "100")
    assert evaluate.main(argv) == 0
    stdout = capsys.readouterr().out
    rows = _csv(out / "per_case.csv")
    assert len(rows) == 2 * (2 + 1) * len(cases)  # runs x (folds + ensemble) x cases
    assert {r["fold"] for r in rows} == {"fold_0", "fold_1", "ensemble"}
    assert {r["connectivity"] for r in rows} == {"26"}
    summary = read_json(out / "summary.json")
    assert summary["preset"] == {"name": "isles22", "connectivity": 26, "volume_unit": "ml", "match_iou": None}
    assert summary["n_failed"] == 0 and summary["n_done"] == 2 * len(cases)
    for label in ("shared", "dwi"):
        run = summary["runs"][label]
        dice = run["fold_summary"]["metrics"]["dice"]
        fold_means = [np.mean([float(r["dice"]) for r in rows if r["run"] == label and r["fold"] == f"fold_{k}"]) for k in (0, 1)]
        np.testing.assert_allclose(dice["fold_means"], fold_means, atol=1e-12)
        assert dice["fold_std"] == pytest.approx(np.std(fold_means, ddof=1), abs=1e-12)
        assert dice["fold_mean"] == pytest.approx(np.mean(fold_means), abs=1e-12)
        ensemble = [float(r["dice"]) for r in rows if r["run"] == label and r["fold"] == "ensemble"]
        assert run["ensemble_summary"]["metrics"]["dice"]["case_std"] == pytest.approx(np.std(ensemble, ddof=1), abs=1e-12)
        # CI over the distinct cases (value: mean over the two fold models), recomputed directly
        per_case = np.array([np.mean([float(r["dice"]) for r in rows if r["run"] == label and r["case_id"] == c and r["fold"] != "ensemble"]) for c in cases])
        boot = per_case[np.random.default_rng(0).integers(0, len(cases), size=(100, len(cases)))].mean(axis=1)
        np.testing.assert_allclose(dice["ci95"], np.percentile(boot, [2.5, 97.5]), atol=1e-12)
        assert run["fold_summary"]["n_cases"] == len(cases) and run["fold_summary"]["n_rows"] == 2 * len(cases)
        assert set(run["checkpoints"]) == {"fold_0", "fold_1"}
        assert run["checkpoints"]["fold_0"]["model_config"]["width"] == 4
        assert run["per_case_source"] == "ensemble" and set(run["per_case"]["dice"]) == set(cases)
        assert run["volume_agreement"]["n"] == len(cases) and (out / "figures" / "bland_altman" / f"{label}.png").is_file()
    assert summary["runs"]["shared"]["strategy"] == "Shared encoder (DWI+ADC avg)"
    assert summary["runs"]["dwi"]["checkpoints"]["fold_0"]["channels"] == ["dwi"]
    (comparison,) = summary["compare"]
    assert (comparison["a"], comparison["b"]) == ("shared", "dwi") and tuple(comparison["metrics"]) == PRESETS["isles22"].table_metrics
    # p pinned to scipy on the ensembles' per-case Dice; Holm over the 4 metrics of the one comparison
    ens = {label: {r["case_id"]: float(r["dice"]) for r in rows if r["run"] == label and r["fold"] == "ensemble"} for label in ("shared", "dwi")}
    diff = np.array([ens["shared"][c] - ens["dwi"][c] for c in cases])
    test = comparison["metrics"]["dice"]
    assert test["n"] == len(cases) and test["mean_difference"] == pytest.approx(diff.mean(), abs=1e-12)
    assert test["p_value"] == pytest.approx(scipy.stats.wilcoxon(diff).pvalue, abs=1e-12)
    assert (test["p_value"] * 2 ** len(cases)) % 2 == pytest.approx(0.0, abs=1e-9)  # exact test: an even count / 2^n
    p_values = [t["p_value"] for t in comparison["metrics"].values() if t["p_value"] is not None]
    assert test["p_holm"] == pytest.approx(holm(p_values)[p_values.index(test["p_value"])])
    lesions = _csv(out / "lesions.csv")
    assert {r["fold"] for r in lesions} == {"fold_0", "fold_1", "ensemble"}
    assert sum(1 for r in lesions if r["run"] == "dwi" and r["fold"] == "ensemble") == sum(int(r["n_ref_lesions"]) for r in rows if r["run"] == "dwi" and r["fold"] == "ensemble")
    results = (out / "results.md").read_text()
    assert "| Strategy | Init | Mean DSC |" in results
    shared_dice = summary["runs"]["shared"]["fold_summary"]["metrics"]["dice"]
    expected_row = f"| Shared encoder (DWI+ADC avg) | Scratch | {shared_dice['fold_mean']:.4f} ± {shared_dice['fold_std']:.4f} |"
    assert expected_row in results and expected_row in stdout
    assert "26-connected" in results and "| shared − dwi | DSC (higher is better) | 6 |" in results
    assert "## Volume agreement" in results and "## Lesion detection" in results
    pngs = sorted((out / "figures" / "shared").glob("*.png"))
    assert 1 <= len(pngs) <= 3 and all(p.name.endswith("_ensemble.png") for p in pngs)
    assert (out / "run_args.json").is_file()


def test_atlas_whole_volume_end_to_end(atlas_base: Path, tmp_path: Path) -> None:
    splits = read_json(atlas_base / "ATLAS" / "ATLAS_splits_5fold.json")
    test_cases = splits["fold_0"]["ATLAS"]["test"]
    run = tmp_path / "run"
    for fold in (0, 1):
        _checkpoint(run / f"fold_{fold}" / "best_model.pth", {"arch": "resnet18", "width": 4},
                    {"dataset": "ATLAS", "fold": fold, "patch_size": 32}, seed=fold, init={"label": "transfer"},
                    val_cases=splits[f"fold_{fold}"]["ATLAS"]["val"])
    (run / "fold_1" / "last.pth").write_bytes(b"")  # other files in a fold folder are ignored
    out = tmp_path / "out"
    argv = ["--dataset", "ATLAS", "--data-dir", str(atlas_base), "--run", f"scratch={run}", "--output-dir", str(out),
            "--save-nifti", "--png", "all", "--bootstrap", "50", "--sw-batch-size", "2"]
    assert evaluate.main(argv) == 0
    rows = _csv(out / "per_case.csv")
    assert len(rows) == 2 * len(test_cases) and {r["connectivity"] for r in rows} == {"6"}
    summary = read_json(out / "summary.json")
    assert summary["preset"]["name"] == "atlas22" and summary["runs"]["scratch"]["folds"] == [0, 1]
    results = (out / "results.md").read_text()
    assert "| Dataset | Strategy | DSC ± std | Lesion F1 | Lesion Count Diff | Vol Diff (voxels) |" in results
    assert "| ATLAS | Transfer |" in results
    meta = read_json(atlas_base / "ATLAS" / f"{test_cases[0]}_metadata.json")
    saved = nib.load(str(out / "predictions" / "scratch" / "fold_0" / f"{test_cases[0]}.nii.gz"))
    assert list(saved.shape) == meta["shape"]  # the whole volume was predicted and scored
    np.testing.assert_allclose(saved.affine, meta["affine"], atol=1e-5)
    assert len(list((out / "figures" / "scratch").glob("*.png"))) == len(rows)


def test_val_split_scores_each_fold_on_its_own_cases(atlas_base: Path, tmp_path: Path) -> None:
    splits = read_json(atlas_base / "ATLAS" / "ATLAS_splits_5fold.json")
    run = tmp_path / "run"
    _checkpoint(run / "fold_3" / "best_model.pth", {"arch": "resnet18", "width": 4}, {"dataset": "atlas", "fold": 3, "patch_size": 32},
                val_cases=splits["fold_3"]["ATLAS"]["val"])
    out = tmp_path / "out"
    argv = ["--dataset", "ATLAS", "--data-dir", str(atlas_base / "ATLAS"), "--checkpoints", str(run / "fold_3" / "best_model.pth"),
            "--split", "val", "--output-dir", str(out), "--png", "none", "--bootstrap", "20"]
    assert evaluate.main(argv) == 0
    rows = _csv(out / "per_case.csv")
    assert sorted(r["case_id"] for r in rows) == sorted(splits["fold_3"]["ATLAS"]["val"])
    assert {(r["run"], r["fold"]) for r in rows} == {("model", "fold_3")}


def _padded_atlas(atlas_base: Path, out: Path, margin: int) -> Path:
    """A copy of the preprocessed ATLAS folder whose volumes have ``margin`` zero voxels added on
    every side: background outside the brain's box, as a skull-stripped T1w in its field of view."""
    shutil.copytree(atlas_base / "ATLAS", out)
    for npz in sorted(out.glob("*.npz")):
        arrays = {key: np.pad(value, margin) for key, value in load_npz(npz).items()}
        save_npz(npz, arrays)
        meta = read_json(npz.with_name(f"{npz.stem}_metadata.json"))
        write_json(npz.with_name(f"{npz.stem}_metadata.json"), {**meta, "shape": list(arrays["lesion_mask"].shape)})
    return out


def test_whole_volume_is_scored_by_default_and_the_brain_crop_is_opt_in(atlas_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _padded_atlas(atlas_base, tmp_path / "ATLAS", 32)
    splits = read_json(data / "ATLAS_splits_5fold.json")
    run = tmp_path / "run"
    _checkpoint(run / "fold_0" / "best_model.pth", {"arch": "resnet18", "width": 4}, {"dataset": "ATLAS", "fold": 0, "patch_size": 32},
                val_cases=splits["fold_0"]["ATLAS"]["val"])
    # a network that calls every voxel it is shown lesion
    monkeypatch.setattr("strokeseg.inference.inferer.sliding_window_inference", lambda region, *a, **k: np.ones(region.shape[1:], np.float32))
    base = ["--dataset", "ATLAS", "--data-dir", str(data), "--run", f"all={run}", "--png", "none", "--bootstrap", "20"]
    assert evaluate.main([*base, "--output-dir", str(tmp_path / "whole")]) == 0
    assert evaluate.main([*base, "--output-dir", str(tmp_path / "crop"), "--brain-crop"]) == 0
    whole, crop = (_csv(tmp_path / name / "per_case.csv") for name in ("whole", "crop"))
    assert whole and [row["case_id"] for row in whole] == [row["case_id"] for row in crop]
    for row, cropped in zip(whole, crop):
        mask = load_npz(data / f"{row['case_id']}.npz", keys=("lesion_mask",))["lesion_mask"]
        ref, size = int(np.count_nonzero(mask)), mask.size
        # every voxel predicted: the false positives outside the brain's box count (as in training's model selection)
        assert int(row["pred_voxels"]) == size and float(row["dice"]) == pytest.approx(2 * ref / (size + ref), abs=1e-12)
        assert int(cropped["pred_voxels"]) < size and (ref == 0 or float(cropped["dice"]) > float(row["dice"]))
    assert "Whole-volume scoring: the network ran over the whole volume" in (tmp_path / "whole" / "results.md").read_text()
    assert "Brain-box inference (--brain-crop)" in (tmp_path / "crop" / "results.md").read_text()
    assert read_json(tmp_path / "whole" / "summary.json")["scoring"]["inference_region"] == "whole volume"
    assert read_json(tmp_path / "crop" / "summary.json")["scoring"]["inference_region"] == "brain box"
    written = sorted((tmp_path / "whole").rglob("*.json"))
    # one fold: its std across folds is undefined (NaN in memory), written as null
    assert read_json(tmp_path / "whole" / "summary.json")["runs"]["all"]["fold_summary"]["metrics"]["dice"]["fold_std"] is None
    for path in written:  # strict JSON: no bare NaN/Infinity
        json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{path}: bare {name}"))
    # --no-brain-crop (old commands) is accepted and changes nothing: the finished evaluation is reused
    stamp = (tmp_path / "whole" / "summary.json").stat().st_mtime_ns
    assert evaluate.main([*base, "--output-dir", str(tmp_path / "whole"), "--no-brain-crop"]) == 0
    assert (tmp_path / "whole" / "summary.json").stat().st_mtime_ns == stamp


def test_a_comparison_that_cannot_be_computed_is_a_warning_not_a_failure(isles_eval: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, out, argv = _isles_setup(isles_eval, tmp_path, 2, [("a", "dwi_only", 0), ("b", "dwi_only", 10)],
                                "--compare", "a", "b", "--png", "none", "--bootstrap", "20")
    assert evaluate.main(argv) == 0  # every table was written; only the comparison needs 5 cases
    stdout = capsys.readouterr().out
    assert "WARNING compare a vs b: not computed (a paired comparison needs at least 5 cases present in both, got 2" in stdout
    assert "- WARNING a vs b: not computed (a paired comparison needs at least 5 cases" in (out / "results.md").read_text()
    assert "error" in read_json(out / "summary.json")["compare"][0]
    assert evaluate.main(argv) == 0 and "already holds this evaluation, finished" in capsys.readouterr().out  # not a failure to redo


def test_the_ensemble_thresholds_the_mean_of_the_fold_models_probabilities(atlas_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    splits = read_json(atlas_base / "ATLAS" / "ATLAS_splits_5fold.json")
    run = tmp_path / "run"
    for fold in (0, 1):  # the output bias tells the stand-in inference below which fold's network it runs
        _checkpoint(run / f"fold_{fold}" / "best_model.pth", {"arch": "resnet18", "width": 4}, {"dataset": "ATLAS", "fold": fold, "patch_size": 32},
                    head_bias=(0.0, float(fold)), val_cases=splits[f"fold_{fold}"]["ATLAS"]["val"])

    def ramp(shape: tuple[int, ...], axis: int) -> np.ndarray:
        """0 to 1 along ``axis``: fold 0's probability rises along X, fold 1's along Y."""
        line = np.linspace(0.0, 1.0, shape[axis], dtype=np.float32)
        return np.broadcast_to(np.expand_dims(line, [a for a in range(3) if a != axis]), shape).copy()

    def fold_output(region: np.ndarray, predictor: object, *args: object, **kwargs: object) -> np.ndarray:
        fold = int(predictor.args[0].decoders[0].head.bias[1].item())
        return ramp(region.shape[1:], fold)

    monkeypatch.setattr("strokeseg.inference.inferer.sliding_window_inference", fold_output)
    out = tmp_path / "out"
    argv = ["--dataset", "ATLAS", "--data-dir", str(atlas_base), "--run", f"r={run}", "--ensemble", "--save-nifti", "--png", "none",
            "--bootstrap", "20", "--output-dir", str(out)]
    assert evaluate.main(argv) == 0
    rows = {(r["fold"], r["case_id"]): r for r in _csv(out / "per_case.csv")}
    for case_id in splits["fold_0"]["ATLAS"]["test"]:
        ref = load_npz(atlas_base / "ATLAS" / f"{case_id}.npz", keys=("lesion_mask",))["lesion_mask"].astype(bool)
        folds = [ramp(ref.shape, 0), ramp(ref.shape, 1)]
        expected = (folds[0] + folds[1]) / 2 >= 0.5  # by hand: x + y >= 1 in ramp units
        assert not np.array_equal(expected, folds[0] >= 0.5) and not np.array_equal(expected, folds[1] >= 0.5)
        saved = np.asarray(nib.load(str(out / "predictions" / "r" / "ensemble" / f"{case_id}.nii.gz")).dataobj).astype(bool)
        np.testing.assert_array_equal(saved, expected)
        row = rows[("ensemble", case_id)]
        assert int(row["pred_voxels"]) == int(expected.sum())
        assert float(row["dice"]) == pytest.approx(metrics_dice(expected, ref), abs=1e-12)
        assert int(rows[("fold_0", case_id)]["pred_voxels"]) == int((folds[0] >= 0.5).sum())


# --------------------------------------------------------------------------- bad input


def _fails(argv: list[str], capsys: pytest.CaptureFixture, pattern: str) -> str:
    assert evaluate.main(argv) == 1
    out = capsys.readouterr().out
    errors = [line for line in out.splitlines() if "ERROR" in line]
    assert errors and pattern in errors[0], out
    return errors[0]


def test_resnet_sees_a_volume_its_window_covers_whole_and_uctransnet_keeps_its_size(tmp_path: Path) -> None:
    from strokeseg.inference.fold_models import load_fold_model

    resnet = _checkpoint(tmp_path / "r.pth", {"arch": "resnet18", "variant": "single", "width": 4}, {"dataset": "ATLAS", "fold": 0, "patch_size": 96})
    fold_model = load_fold_model(resnet, 0, "ATLAS", torch.device("cpu"), None)
    assert fold_model.window == (96, 96, 96)
    assert fold_model.window_for((32, 40, 24)) == (32, 40, 24)
    assert fold_model.window_for((197, 233, 189)) == (96, 96, 96)
    uct_config = {"arch": "uctransnet3d", "width": 4, "patch_size": 16, "layers": 1, "heads": 1}
    uct = _checkpoint(tmp_path / "u.pth", uct_config, {"dataset": "ATLAS", "fold": 0, "patch_size": 16})
    assert load_fold_model(uct, 0, "ATLAS", torch.device("cpu"), None).window_for((12, 12, 12)) == (16, 16, 16)


def test_bad_checkpoints_are_clear_one_line_errors(isles_eval: Path, atlas_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cases = sorted(p.stem for p in isles_eval.glob("*.npz"))
    splits = _splits(tmp_path / "splits.json", "ISLES2022", cases)
    common = ["--data-dir", str(isles_eval), "--splits-file", str(splits), "--output-dir", str(tmp_path / "out"), "--png", "none"]
    isles = ["--dataset", "ISLES2022", *common]
    run = _isles_run(tmp_path / "run", "dwi_only", (0, 1), seed=0)
    _fails([*isles, "--run", f"a={run}", "--folds", "0", "1", "2"], capsys, "checkpoint not found")
    _fails([*isles, "--run", f"a={tmp_path / 'nowhere'}"], capsys, "run folder not found")
    garbage = tmp_path / "garbage" / "fold_0" / "best_model.pth"
    garbage.parent.mkdir(parents=True)
    garbage.write_bytes(b"not a checkpoint")
    _fails([*isles, "--run", f"a={garbage.parents[1]}"], capsys, "not a readable checkpoint")
    other = _isles_run(tmp_path / "other", "dwi_only", (0,), seed=0, dataset="ATLAS")
    _fails([*isles, "--run", f"a={other}"], capsys, "trained on dataset 'ATLAS', not ISLES2022")
    moved = _isles_run(tmp_path / "moved", "dwi_only", (0,), seed=0, fold=3)
    _fails([*isles, "--run", f"a={moved}"], capsys, "found as fold 0 but its run config says fold 3")
    uct = tmp_path / "uct" / "fold_0" / "best_model.pth"
    _checkpoint(uct, {"arch": "uctransnet3d", "width": 4, "patch_size": 16}, {"dataset": "ISLES2022", "fold": 0})
    line = _fails([*isles, "--checkpoints", str(uct), "--window", "32"], capsys, "uctransnet3d runs only at its training size 16x16x16 (fixed input size)")
    assert "--window 32 32 32" in line
    two = tmp_path / "two" / "fold_0" / "best_model.pth"
    _checkpoint(two, {"arch": "resnet18", "variant": "single", "in_channels": 2, "width": 4}, {"dataset": "ATLAS", "fold": 0})
    _fails(["--dataset", "ATLAS", "--data-dir", str(atlas_base), "--checkpoints", str(two), "--output-dir", str(tmp_path / "o2")],
           capsys, "in_channels 2 does not match ATLAS, which provides 1 channel(s)")
    _fails([*isles, "--splits-file", str(tmp_path / "missing.json"), "--run", f"a={run}"], capsys, "splits file not found")
    leaked = tmp_path / "leaked" / "fold_0" / "best_model.pth"
    _checkpoint(leaked, {"arch": "resnet18", "variant": "dwi_only", "width": 4}, {"isles_dir": "x", "fold": 0}, val_cases=cases[:1])
    _fails([*isles, "--checkpoints", str(leaked)], capsys, f"test case(s) ['{cases[0]}'] are validation cases of")
    brats = tmp_path / "brats" / "fold_0" / "best_model.pth"
    _checkpoint(brats, {"arch": "resnet18", "width": 4}, {"brats_dir": "x", "fold": 0})
    _fails([*isles, "--checkpoints", str(brats)], capsys, "trained on dataset 'BraTS2024', not ISLES2022")
    assert not (tmp_path / "out" / "per_case.csv").exists()  # nothing was scored


def test_case_missing_from_data_folder_fails_alone(isles_eval: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cases = sorted(p.stem for p in isles_eval.glob("*.npz"))[:2]
    splits = _splits(tmp_path / "splits.json", "ISLES2022", [*cases, "sub-strokecase9999"])
    run = _isles_run(tmp_path / "run", "dwi_only", (0,), seed=0)
    out = tmp_path / "out"
    argv = ["--dataset", "ISLES2022", "--data-dir", str(isles_eval), "--splits-file", str(splits), "--run", f"a={run}",
            "--output-dir", str(out), "--png", "none", "--bootstrap", "20"]
    assert evaluate.main(argv) == 1
    summary = read_json(out / "summary.json")
    (failed,) = summary["failed"]
    assert failed["case_id"] == "a/sub-strokecase9999"
    assert "sub-strokecase9999.npz does not exist" in failed["reason"] and "\n" not in failed["reason"]
    assert sorted(r["case_id"] for r in _csv(out / "per_case.csv")) == cases
    assert summary["runs"]["a"]["fold_summary"]["n_cases"] == 2
    assert summary["runs"]["a"]["failed"] == [{"case_id": "a/sub-strokecase9999", "reason": failed["reason"]}]
    results = (out / "results.md").read_text()
    assert "| a | f0 | 2/3 |" in results and f"- a/sub-strokecase9999: {failed['reason']}" in results
    assert "FAILED a/sub-strokecase9999" in capsys.readouterr().out
    # A failed evaluation is not reused: once the splits file is fixed, a plain re-run evaluates again.
    _splits(splits, "ISLES2022", cases)
    assert evaluate.main(argv) == 0
    assert f"{out}: the evaluation there did not succeed (1 failed case(s)): evaluating again" in capsys.readouterr().out
    assert read_json(out / "summary.json")["n_failed"] == 0 and len(_csv(out / "per_case.csv")) == 2


def _finished_evaluation(isles_eval: Path, tmp_path: Path) -> tuple[Path, Path, Path, list[str]]:
    """An evaluation of run ``a`` (fold 0) on two cases, finished in ``tmp_path/out``; returns
    the run, another run of other weights, the output folder and the arguments."""
    cases = sorted(p.stem for p in isles_eval.glob("*.npz"))[:2]
    splits = _splits(tmp_path / "splits.json", "ISLES2022", cases)
    run, other = _isles_run(tmp_path / "run", "dwi_only", (0,), seed=0), _isles_run(tmp_path / "other", "dwi_only", (0,), seed=1)
    out = tmp_path / "out"
    argv = ["--dataset", "ISLES2022", "--data-dir", str(isles_eval), "--splits-file", str(splits), "--run", f"a={run}",
            "--output-dir", str(out), "--png", "none", "--bootstrap", "20"]
    assert evaluate.main(argv) == 0
    return run, other, out, argv


def test_finished_evaluation_is_reused_only_with_the_same_arguments(isles_eval: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run, other, out, argv = _finished_evaluation(isles_eval, tmp_path)
    finished = {name: (out / name).read_bytes() for name in ("summary.json", "results.md", "per_case.csv")}
    capsys.readouterr()
    # Settings that do not change results (device, windows per batch) reuse it: tables printed, nothing rewritten.
    assert evaluate.main([*argv, "--device", "cpu", "--sw-batch-size", "1"]) == 0
    assert "already holds this evaluation, finished" in capsys.readouterr().out
    # The same folders spelled otherwise (trailing slash, "..", a symbolic link) are the same evaluation.
    (tmp_path / "link").symlink_to(run, target_is_directory=True)
    respelled = [*argv[:3], f"{isles_eval}/", *argv[4:7], f"a={tmp_path / 'link' / 'fold_0' / '..'}", *argv[8:]]
    assert evaluate.main(respelled) == 0
    assert "already holds this evaluation, finished" in capsys.readouterr().out
    for changed, named in (([*argv, "--tta"], "--tta (was false, now true)"),
                           ([*argv[:7], f"a={other}", *argv[8:]], f"--run (was [\"a={run}\"], now [\"a={other}\"])"),
                           ([*argv, "--split", "val", "--data-dir", str(tmp_path)], "--data-dir (was"),
                           ([*argv, "--split", "val"], '--split (was "test", now "val")')):
        assert evaluate.main(changed) == 1
        (line,) = [line for line in capsys.readouterr().out.splitlines() if "ERROR" in line]
        assert f"ERROR {out}: holds an evaluation with other arguments: " in line and named in line and "--overwrite" in line
        assert {name: (out / name).read_bytes() for name in finished} == finished  # nothing touched
    assert evaluate.main([*argv, "--tta", "--overwrite"]) == 0
    assert read_json(out / "summary.json")["arguments"]["tta"] is True


def test_finished_evaluation_is_redone_when_a_fold_was_trained_again(isles_eval: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Same arguments, but the checkpoint (or the data) changed since: evaluated again, never the stale tables."""
    run, other, out, argv = _finished_evaluation(isles_eval, tmp_path)
    checkpoint = run / "fold_0" / "best_model.pth"
    first = read_json(out / "summary.json")
    assert first["inputs"][str(checkpoint)] == [checkpoint.stat().st_size, checkpoint.stat().st_mtime_ns]
    assert str(tmp_path / "splits.json") in first["inputs"] and len([p for p in first["inputs"] if p.endswith(".npz")]) == len(list(isles_eval.glob("*.npz")))
    shutil.copyfile(other / "fold_0" / "best_model.pth", checkpoint)  # fold 0 trained again into the same folder
    capsys.readouterr()
    assert evaluate.main(argv) == 0
    output = capsys.readouterr().out
    assert f"{out}: checkpoints or data changed since the evaluation there ({checkpoint}): evaluating again" in output
    assert "already holds this evaluation" not in output
    again = read_json(out / "summary.json")
    assert again["inputs"][str(checkpoint)] == [checkpoint.stat().st_size, checkpoint.stat().st_mtime_ns]


def test_fold_whose_training_stopped_early_is_marked_and_fails_unless_allowed(isles_eval: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cases = sorted(p.stem for p in isles_eval.glob("*.npz"))[:2]
    splits = _splits(tmp_path / "splits.json", "ISLES2022", cases)
    run = tmp_path / "run"
    net = {"arch": "resnet18_unet", "variant": "dwi_only", "width": 4}
    for fold, last_epoch in ((0, 50), (1, 1)):  # fold 1 was preempted after epoch 1 of 50, waiting for a requeue
        config = {"isles_dir": "/data/isles", "fold": fold, "patch_size": ISLES_SHAPE, "epochs": 50}
        _checkpoint(run / f"fold_{fold}" / "best_model.pth", net, config, seed=fold, epoch=1)  # best epoch 1 in both
        _checkpoint(run / f"fold_{fold}" / "last.pth", net, config, seed=fold, epoch=last_epoch)
    out = tmp_path / "out"
    argv = ["--dataset", "ISLES2022", "--data-dir", str(isles_eval), "--splits-file", str(splits), "--run", f"a={run}",
            "--output-dir", str(out), "--png", "none", "--bootstrap", "20"]
    assert evaluate.main(argv) == 1
    best = run / "fold_1" / "best_model.pth"
    assert f"ERROR run a fold_1 ({best}): training unfinished (epoch 1 of 50)" in capsys.readouterr().out
    summary = read_json(out / "summary.json")
    assert summary["runs"]["a"]["unfinished"] == {"fold_1": "unfinished (epoch 1 of 50)"}
    assert summary["runs"]["a"]["checkpoints"]["fold_0"]["unfinished"] is None
    assert "- run `a` fold_1: unfinished (epoch 1 of 50)" in (out / "results.md").read_text()
    assert {r["fold"] for r in _csv(out / "per_case.csv")} == {"fold_0", "fold_1"}  # scored all the same
    assert evaluate.main([*argv, "--allow-unfinished"]) == 0  # not reused (unfinished): evaluated again
    output = capsys.readouterr().out
    assert "did not succeed (run a fold_1: unfinished (epoch 1 of 50))" in output and f"NOTE run a fold_1 ({best})" in output
    assert "unfinished (epoch 1 of 50)" in (out / "results.md").read_text()
    (run / "fold_2").mkdir()  # a fold whose training has not written its best model: never skipped silently
    assert evaluate.main([*argv, "--overwrite"]) == 1
    assert f"fold folder(s) without best_model.pth: {run / 'fold_2'}" in capsys.readouterr().out
    assert evaluate.main([*argv, "--overwrite", "--allow-unfinished"]) == 0
    assert f"WARNING {run / 'fold_2'}: fold folder without best_model.pth; left out" in capsys.readouterr().out
    assert {r["fold"] for r in _csv(out / "per_case.csv")} == {"fold_0", "fold_1"}


def test_external_splits_file_needs_one_test_set_across_folds(isles_eval: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cases = sorted(p.stem for p in isles_eval.glob("*.npz"))
    splits = tmp_path / "original_repo_splits.json"  # the original repository's shape; fold_1 trains on fold_0's test case 0
    write_json(splits, {"fold_0": {"ISLES2022": {"train": cases[2:4], "val": [cases[4]], "test": cases[:2]}},
                        "fold_1": {"ISLES2022": {"train": [cases[0], cases[4]], "val": [cases[2]], "test": [cases[1], cases[3]]}}})
    out = tmp_path / "out"
    argv = ["--dataset", "ISLES2022", "--data-dir", str(isles_eval), "--splits-file", str(splits),
            "--run", f"a={_isles_run(tmp_path / 'run', 'dwi_only', (0,), 0)}", "--output-dir", str(out), "--png", "none"]
    line = _fails(argv, capsys, f"{splits}: fold_1/ISLES2022: test set differs from fold_0's in 2 case(s), e.g. {[cases[0], cases[3]]}")
    assert "every fold must share one held-out test set" in line
    assert not (out / "per_case.csv").exists() and not (out / "summary.json").exists()
    # A consistent file, but the checkpoint's data contract records test case 0 among its training cases.
    write_json(splits, {"fold_0": {"ISLES2022": {"train": cases[2:4], "val": [cases[4]], "test": cases[:2]}}})
    leaky = tmp_path / "leaky" / "fold_0" / "best_model.pth"
    contract = DataContract("ISLES2022", ("dwi",), "mask", (ISLES_SHAPE,) * 3, 0.5, {}, 0, (cases[0], *cases[2:4]), (cases[4],))
    _checkpoint(leaky, {"arch": "resnet18_unet", "variant": "dwi_only", "width": 4}, {"isles_dir": "x", "fold": 0}, data_contract=contract.as_dict())
    _fails([*argv[:6], "--run", f"a={leaky.parents[1]}", *argv[8:]], capsys, f"{splits}: test case(s) {[cases[0]]} are training cases of {leaky}")
    assert not (out / "per_case.csv").exists() and not (out / "summary.json").exists()


def test_nan_input_fails_its_case_instead_of_scoring_dice_0(isles_eval: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    shutil.copytree(isles_eval, data)
    cases = sorted(p.stem for p in data.glob("*.npz"))[:3]
    arrays = load_npz(data / f"{cases[1]}.npz")
    arrays["dwi"][3, 4, 5] = np.inf
    save_npz(data / f"{cases[1]}.npz", arrays)
    splits = _splits(tmp_path / "splits.json", "ISLES2022", cases)
    out = tmp_path / "out"
    argv = ["--dataset", "ISLES2022", "--data-dir", str(data), "--splits-file", str(splits), "--run", f"a={_isles_run(tmp_path / 'run', 'dwi_only', (0,), 0)}",
            "--output-dir", str(out), "--png", "none", "--bootstrap", "20"]
    assert evaluate.main(argv) == 1
    (failed,) = read_json(out / "summary.json")["failed"]
    assert failed == {"case_id": f"a/{cases[1]}", "reason": f"{data / cases[1]}.npz: member 'dwi' holds 1 NaN/Inf value(s)"}
    assert f"FAILED a/{cases[1]}" in capsys.readouterr().out
    assert sorted(r["case_id"] for r in _csv(out / "per_case.csv")) == [cases[0], cases[2]]  # the others were scored


def test_argument_errors(tmp_path: Path) -> None:
    base = ["--dataset", "ATLAS", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "o")]
    for extra in ([], ["--run", "a=x", "--checkpoints", "y"], ["--run", "a b=x"], ["--run", "a=x", "--compare", "a", "b"],
                  ["--run", "a=x", "--ensemble", "--split", "val"], ["--run", "a=x", "--window", "32", "32"],
                  ["--run", "a=x", "--run", "a=x"], ["--run", "a=x", "--preset", "brats"], ["--run", "a=x", "--brain-crop", "--no-brain-crop"]):
        with pytest.raises(SystemExit) as info:
            evaluate.parse_args(base + extra)
        assert info.value.code == 2, extra
    with pytest.raises(SystemExit):  # ISLES: the network input is the preprocessing crop already
        evaluate.parse_args(["--dataset", "ISLES2022", *base[2:], "--run", "a=x", "--brain-crop"])
    args = evaluate.parse_args(base + ["--run", "a=x", "--run", "b=y", "--compare", "a", "b"])
    assert args.runs == {"a": [Path("x")], "b": [Path("y")]} and json.dumps(args.compare) == '[["a", "b"]]'
    args = evaluate.parse_args(base + ["--run", "a=x", "--run", "b=y", "--run", "a=z", "--run", "c=w", "--compare", "b", "c", "--compare-all"])
    assert args.runs["a"] == [Path("x"), Path("z")]
    assert args.compare == [["b", "c"], ["a", "b"], ["a", "c"]]


def test_brain_crop_predicts_the_box_of_nonzero_voxels_on_the_network_grid_and_zero_outside() -> None:
    torch.manual_seed(0)
    config = {"arch": "resnet18_unet", "variant": "single", "width": 4, "in_channels": 1}
    contract = DataContract("ATLAS", ("image",), "lesion_mask", (16, 16, 16), 0.5, {}, 0, None, None)
    fold_model = fm.FoldModel(0, Path("m.pth"), models.build_model(config).eval(), models.resolve_model_config(config), {}, contract, (16, 16, 16))
    image = np.zeros((44, 42, 38), dtype=np.float32)
    image[12:37, 3:21, 5:35] = np.random.default_rng(0).standard_normal((25, 18, 30))
    cropped = fm.predict_probability({"image": image}, fold_model, Inferer(brain_crop=True))
    # window 16, step 8, the ResNet's grid 32: starts and distances from the end grow to multiples of 8
    box = (slice(8, 44), slice(0, 26), slice(0, 38))
    alone = fm.predict_probability({"image": image[box]}, fold_model, Inferer())
    np.testing.assert_array_equal(cropped[box], alone)
    cropped[box] = 0
    assert not cropped.any()
    whole = fm.predict_probability({"image": image}, fold_model, Inferer())
    assert whole[0, 0, 0] > 0  # without the crop the background is predicted too


def test_seeds_of_one_arm_and_the_isles24_preset(isles_eval: Path, tmp_path: Path) -> None:
    _, out, argv = _isles_setup(isles_eval, tmp_path, 2, [("arm", "dwi_only", 0), ("arm", "dwi_only", 20)],
                                "--png", "none", "--bootstrap", "20", "--preset", "isles24")
    assert evaluate.main(argv) == 0
    rows = _csv(out / "per_case.csv")
    assert sorted({(r["seed"], r["fold"]) for r in rows}) == [("0", "fold_0"), ("0", "fold_1"), ("1", "fold_0"), ("1", "fold_1")]
    assert {(r["preset"], r["match_iou"]) for r in rows} == {("isles24", "0.2")}  # the organisers' rule since 2025-12-16
    summary = read_json(out / "summary.json")
    assert summary["preset"]["match_iou"] == 0.2
    assert "matched one-to-one at IoU >= 0.2" in (out / "results.md").read_text()
    run = summary["runs"]["arm"]
    assert run["n_seeds"] == 2 and sorted(run["checkpoints"]) == ["seed_0/fold_0", "seed_0/fold_1", "seed_1/fold_0", "seed_1/fold_1"]
    dice = run["fold_summary"]["metrics"]["dice"]
    means = {(s, f): np.mean([float(r["dice"]) for r in rows if r["seed"] == s and r["fold"] == f]) for s in "01" for f in ("fold_0", "fold_1")}
    seed_means = [np.mean([means[(s, "fold_0")], means[(s, "fold_1")]]) for s in "01"]
    assert dice["seed_means"] == pytest.approx(seed_means) and dice["seed_std"] == pytest.approx(np.std(seed_means, ddof=1))
    pooled = np.sqrt(np.mean([np.var([means[(s, "fold_0")], means[(s, "fold_1")]], ddof=1) for s in "01"]))
    assert dice["fold_std"] == pytest.approx(pooled) and run["fold_summary"]["n_cases"] == 2
    assert "Seeds: mean ± std" in (out / "results.md").read_text()
