"""Issue 12 ("no silent wrong result"), the per-case stages and their messages: one test per item
(4, 5, 7, 8, 10, 11, 15, 16), each through a stage's ``main(argv)``, asserting the exit status,
that the message names the file or folder, and what is on disk afterwards."""
from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import _stage_faults
import models
import preprocess_stroke_foundation
import preprocess_v2_isles
import train_isles_resnet18
from strokeseg.core import runner
from strokeseg.core.io import load_npz, read_json, save_npz, write_json
from strokeseg.datasets import isles
from strokeseg.training import engine

GRID = ["16", "16", "16"]
SPLITS = "isles2022_splits_5fold.json"
CASES = [f"sub-strokecase000{i}" for i in range(1, 7)]
TRAIN_FLAGS = ["--width", "4", "--patch-size", "16", "--batch-size", "2", "--epochs", "1", "--strategy", "dwi_only"]


def _isles_argv(raw: Path, out: Path, *extra: str) -> list[str]:
    # --test-fraction 0: five good cases still make five folds when one case fails
    return ["--isles-dir", str(raw), "--output-dir", str(out), "--target-shape", *GRID, "--test-fraction", "0", *extra]


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


def _dwi(raw: Path, case: str) -> Path:
    return raw / "rawdata" / case / "ses-0001" / f"{case}_ses-0001_dwi.nii.gz"


def _failed(out: Path) -> dict[str, str]:
    return {item["case_id"]: item["reason"] for item in read_json(out / "preprocessing_summary.json")["failed"]}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _no_temporaries(folder: Path) -> None:
    assert not [p for p in folder.rglob(".*") if p.is_file()], "temporary files left behind"


def _foundation_argv(tmp: Path, atlas: Path, out: Path) -> list[str]:
    """preprocess_stroke_foundation.py on ``atlas`` with the shipped config on the CPU."""
    config = json.loads((Path(__file__).resolve().parents[1] / "config.json").read_text())
    config["preprocessing"]["use_gpu"] = False
    write_json(tmp / "config.json", config)
    return ["--config", str(tmp / "config.json"), "--output-base-dir", str(out), "--data-dir", f"ATLAS={atlas}", "--datasets", "ATLAS"]


@pytest.fixture(scope="module")
def isles_train(synthetic_isles_a: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("safety_isles_train")
    assert preprocess_v2_isles.main(["--isles-dir", str(synthetic_isles_a), "--output-dir", str(out), "--target-shape", *GRID]) == 0
    return out


# --------------------------------------------------------------------------- item 4


@pytest.mark.slow(19)
def test_item4_worker_killed_fails_its_case_and_the_others_finish(synthetic_isles_b: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """A worker process dying (SIGKILL) on one case: that case is failed by name, every other
    case is written, the summary and splits exist, exit status 1."""
    monkeypatch.setattr(isles, "preprocess_isles_case", _stage_faults.isles_case_killed_on_doomed)
    out = tmp_path / "out"
    assert preprocess_v2_isles.main(_isles_argv(synthetic_isles_b, out, "--workers", "2")) == 1
    failed = _failed(out)
    assert failed == {_stage_faults.DOOMED: runner.WORKER_DIED}
    assert f"FAILED {_stage_faults.DOOMED}: worker process died" in capsys.readouterr().out
    for case in CASES:
        assert (out / f"{case}.npz").is_file() == (case != _stage_faults.DOOMED)
    splits = read_json(out / SPLITS)["fold_0"]["ISLES2022"]
    assert sorted(splits["train"] + splits["val"]) == [c for c in CASES if c != _stage_faults.DOOMED]
    summary = read_json(out / "preprocessing_summary.json")
    # a case the other worker finished while the pool broke is written; the new pool skips it
    assert (summary["n_done"] + summary["n_skipped"], summary["n_failed"]) == (5, 1)


# --------------------------------------------------------------------------- item 5


def test_item5_rerun_with_other_settings_is_refused_naming_them(synthetic_isles_b: Path, tmp_path: Path, capsys) -> None:
    """A second run into the folder with another --target-shape and --margin fails before any
    case, naming the folder and both settings; nothing changes on disk. --overwrite redoes
    every case at the new shape."""
    out = tmp_path / "out"
    assert preprocess_v2_isles.main(_isles_argv(synthetic_isles_b, out)) == 0
    before = _snapshot(out)
    other = ["--isles-dir", str(synthetic_isles_b), "--output-dir", str(out), "--target-shape", "20", "20", "20", "--test-fraction", "0", "--margin", "2"]
    capsys.readouterr()
    assert preprocess_v2_isles.main(other) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"ERROR {out}: holds outputs made with other settings" in lines[0]
    assert "margin: 4 there, 2 now" in lines[0] and "target_shape: [16, 16, 16] there, [20, 20, 20] now" in lines[0]
    assert "--overwrite" in lines[0]
    assert _snapshot(out) == before  # run_args.json included: nothing rewritten
    assert preprocess_v2_isles.main(other + ["--overwrite"]) == 0
    assert {load_npz(out / f"{c}.npz", keys=("dwi",))["dwi"].shape for c in CASES} == {(20, 20, 20)}
    assert read_json(out / runner.SETTINGS_NAME)["target_shape"] == [20, 20, 20]
    assert preprocess_v2_isles.main(other + ["--workers", "1"]) == 0  # workers do not shape outputs


def test_item5_folder_without_a_usable_settings_record_is_refused(synthetic_isles_a: Path, isles_train: Path, tmp_path: Path, capsys) -> None:
    """A folder of an older version (run_args.json, no stage_settings.json) is never adopted by a
    rerun with other settings nor by --rebuild-splits; an empty folder gets no splits nor record;
    a hand-edited record that is not an object, or a --rebuild-splits --overwrite at another shape,
    is one line naming the file or folder and what to do. Nothing changes on disk."""
    out = _copy(isles_train, tmp_path / "old")
    (out / runner.SETTINGS_NAME).unlink()
    argv = ["--isles-dir", str(synthetic_isles_a), "--output-dir", str(out), "--target-shape", "20", "20", "20"]
    before = _snapshot(out)
    capsys.readouterr()
    for extra, message in (([], f"ERROR {out}: holds outputs of an older version (run_args.json, no stage_settings.json)"),
                           (["--rebuild-splits"], f"ERROR {out}: no stage_settings.json (not preprocessed by this version")):
        assert preprocess_v2_isles.main([*argv, *extra]) == 1
        (line,) = capsys.readouterr().out.strip().splitlines()
        assert line.split(" ", 1)[1].startswith(message) and "--overwrite" in line, line
        assert _snapshot(out) == before
    (tmp_path / "empty").mkdir()
    assert preprocess_v2_isles.main(_isles_argv(synthetic_isles_a, tmp_path / "empty", "--rebuild-splits")) == 1
    assert f"ERROR {tmp_path / 'empty'}: no stage_settings.json" in capsys.readouterr().out
    assert not list((tmp_path / "empty").iterdir())
    (out / runner.SETTINGS_NAME).write_text("[16, 16, 16]")
    assert preprocess_v2_isles.main(argv) == 1
    assert f"ERROR {out / runner.SETTINGS_NAME}: not a settings record (a JSON object expected, list found)" in capsys.readouterr().out
    assert preprocess_v2_isles.main([*argv, "--overwrite"]) == 0  # an older folder redone at the new shape
    assert read_json(out / runner.SETTINGS_NAME)["target_shape"] == [20, 20, 20]
    before = _snapshot(out)
    capsys.readouterr()
    assert preprocess_v2_isles.main([*argv[:-3], *GRID, "--rebuild-splits", "--overwrite"]) == 1
    line = capsys.readouterr().out.strip()
    assert f"ERROR {out}: holds outputs made with other settings (target_shape: [20, 20, 20] there, [16, 16, 16] now); --rebuild-splits keeps the cases" in line, line
    assert _snapshot(out) == before


def test_item5_foundation_npz_and_metadata_never_disagree(synthetic_atlas: Path, tmp_path: Path) -> None:
    """A rerun killed between the .npz and the _metadata.json of a case (simulated: a new .npz
    beside the old metadata) redoes that case instead of skipping it."""
    argv = _foundation_argv(tmp_path, synthetic_atlas, tmp_path / "out")
    assert preprocess_stroke_foundation.main(argv) == 0
    folder = tmp_path / "out" / "ATLAS"
    case = sorted(p.stem for p in folder.glob("*.npz"))[1]
    arrays = load_npz(folder / f"{case}.npz")
    good = (folder / f"{case}.npz").read_bytes()
    save_npz(folder / f"{case}.npz", {**arrays, "image": arrays["image"] + 1.0}, compress=False)
    assert preprocess_stroke_foundation.main(argv) == 0
    summary = read_json(folder / "ATLAS_summary.json")
    statuses = {item["case_id"]: item["status"] for item in summary["cases"]}
    assert statuses.pop(case) == "done" and set(statuses.values()) == {"skipped"}
    assert (folder / f"{case}.npz").read_bytes() == good


# --------------------------------------------------------------------------- item 7


def test_item7_fixed_case_is_added_to_the_folds_by_rebuild_splits(synthetic_isles_b: Path, tmp_path: Path, capsys) -> None:
    """A case that failed, once fixed, is preprocessed by the rerun but in no fold: the rerun
    says so by name and how to add it; --rebuild-splits adds it without preprocessing again."""
    raw = _copy(synthetic_isles_b, tmp_path / "raw")
    good = _dwi(raw, "sub-strokecase0002").read_bytes()
    _dwi(raw, "sub-strokecase0002").write_bytes(good[:3000])
    out = tmp_path / "out"
    assert preprocess_v2_isles.main(_isles_argv(raw, out)) == 1
    _dwi(raw, "sub-strokecase0002").write_bytes(good)
    capsys.readouterr()
    assert preprocess_v2_isles.main(_isles_argv(raw, out)) == 0
    log = capsys.readouterr().out
    assert re.search(rf"WARNING {re.escape(str(out / SPLITS))}: .*1 preprocessed case\(s\) are in no fold.*'sub-strokecase0002'.*--rebuild-splits", log), log
    listed = read_json(out / SPLITS)["fold_0"]["ISLES2022"]
    assert "sub-strokecase0002" not in listed["train"] + listed["val"]
    stamps = {c: (out / f"{c}.npz").stat().st_mtime_ns for c in CASES}
    assert preprocess_v2_isles.main(_isles_argv(raw, out, "--rebuild-splits")) == 0
    for fold in read_json(out / SPLITS).values():
        assert sorted(fold["ISLES2022"]["train"] + fold["ISLES2022"]["val"]) == CASES
    assert {c: (out / f"{c}.npz").stat().st_mtime_ns for c in CASES} == stamps  # nothing preprocessed again
    assert preprocess_v2_isles.main(_isles_argv(raw, out, "--rebuild-splits", "--margin", "1")) == 1  # other settings: refused
    capsys.readouterr()
    assert preprocess_v2_isles.main(_isles_argv(raw, tmp_path / "typo", "--rebuild-splits")) == 1
    assert f"ERROR {tmp_path / 'typo'}: no such folder; --rebuild-splits" in capsys.readouterr().out
    assert not (tmp_path / "typo").exists()  # nothing created


# --------------------------------------------------------------------------- item 8


def test_item8_symlinked_case_folders_are_followed_once(synthetic_isles_a: Path, synthetic_atlas: Path, tmp_path: Path) -> None:
    """ISLES and foundation discovery follow symbolic links to case folders; a link back to the
    dataset root (a loop) neither hangs nor duplicates a case."""
    raw = _copy(synthetic_isles_a, tmp_path / "isles")
    shutil.move(raw / "sub-strokecase0002", tmp_path / "elsewhere")
    (raw / "sub-strokecase0002").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (raw / "sub-strokecase0001" / "loop").symlink_to(raw, target_is_directory=True)
    out = tmp_path / "out"
    assert preprocess_v2_isles.main(_isles_argv(raw, out)) == 0
    assert sorted(p.stem for p in out.glob("*.npz")) == CASES

    atlas = _copy(synthetic_atlas, tmp_path / "atlas")
    case_dir = atlas / "Training" / "R001" / "sub-r001s002"
    shutil.move(case_dir, tmp_path / "atlas_elsewhere")
    case_dir.symlink_to(tmp_path / "atlas_elsewhere", target_is_directory=True)
    (atlas / "Training" / "loop").symlink_to(atlas / "Training", target_is_directory=True)
    argv = _foundation_argv(tmp_path, atlas, tmp_path / "found")
    assert preprocess_stroke_foundation.main(argv) == 0
    found = sorted(p.stem for p in (tmp_path / "found" / "ATLAS").glob("*.npz"))
    assert "sub-r001s002_ses-1" in found and len(found) == 6


# --------------------------------------------------------------------------- item 10


def _bad_content(kind: str, reference: np.ndarray) -> tuple[np.ndarray, str]:
    if kind == "constant_adc":
        return np.full(reference.shape, 7.0, dtype=np.float32), r"constant image \(every voxel is 7\)"
    if kind == "zero_adc":
        return np.zeros(reference.shape, dtype=np.float32), r"constant image \(every voxel is 0\)"
    if kind == "near_empty_dwi":
        near = np.zeros(reference.shape, dtype=np.float32)
        near[10, 10, 10] = near[11, 10, 10] = 5.0
        return near, r"near-empty image \(2 non-zero of \d+ voxels\)"
    if kind == "one_voxel_dwi":
        return np.ones((1, 1, 1), dtype=np.float32), r"shape \(1, 1, 1\) is not a volume"
    if kind == "complex_dwi":
        return reference.astype(np.complex64), r"complex voxel type complex64"
    rgb = np.zeros(reference.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    return rgb, r"RGB voxel type"


@pytest.mark.parametrize("kind", ["constant_adc", "zero_adc", "near_empty_dwi", "one_voxel_dwi", "complex_dwi", "rgb_dwi"])
def test_item10_images_without_content_fail_their_case(kind: str, synthetic_isles_b: Path, tmp_path: Path) -> None:
    raw = _copy(synthetic_isles_b, tmp_path / "raw")
    target = _dwi(raw, "sub-strokecase0004")
    if kind.endswith("_adc"):
        target = target.with_name(target.name.replace("_dwi", "_adc"))
    img = nib.load(str(target))
    data, pattern = _bad_content(kind, np.asarray(img.dataobj))
    nib.save(nib.Nifti1Image(data, img.affine), str(target))
    out = tmp_path / "out"
    assert preprocess_v2_isles.main(_isles_argv(raw, out)) == 1
    reason = _failed(out)["sub-strokecase0004"]
    assert re.fullmatch(re.escape(str(target)) + ": " + pattern + ".*", reason), reason
    assert sorted(p.stem for p in out.glob("*.npz")) == [c for c in CASES if c != "sub-strokecase0004"]


# --------------------------------------------------------------------------- item 11


def test_item11_duplicate_files_fail_one_case_and_letter_case_joins_one(synthetic_isles_b: Path, tmp_path: Path) -> None:
    """X_dwi.nii beside X_dwi.nii.gz fails that case only (both files named); a mask spelled in
    other letter case stays with its case."""
    raw = _copy(synthetic_isles_b, tmp_path / "raw")
    dwi = _dwi(raw, "sub-strokecase0002")
    plain = dwi.with_name(dwi.name[: -len(".gz")])
    nib.save(nib.load(str(dwi)), str(plain))
    mask = raw / "derivatives" / "sub-strokecase0003" / "ses-0001" / "sub-strokecase0003_ses-0001_msk.nii.gz"
    mask.rename(mask.with_name("SUB-StrokeCase0003_SES-0001_MSK.nii.gz"))
    out = tmp_path / "out"
    assert preprocess_v2_isles.main(_isles_argv(raw, out)) == 1
    failed = _failed(out)
    assert list(failed) == ["sub-strokecase0002"]
    assert failed["sub-strokecase0002"] == f"sub-strokecase0002: 2 DWI files: {plain}, {dwi}"
    assert sorted(p.stem for p in out.glob("*.npz")) == [c for c in CASES if c != "sub-strokecase0002"]


# --------------------------------------------------------------------------- item 15


def _one_error_line(capsys: pytest.CaptureFixture) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    errors = [line for line in (captured.out + captured.err).splitlines() if "ERROR" in line]
    assert len(errors) == 1, captured.out + captured.err
    return errors[0]


def test_item15_run_level_problems_are_one_line(synthetic_isles_b: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """Missing and empty --isles-dir, an output path that is a file, a read-only output folder:
    exit 1 and one ERROR line naming the path; nothing written."""
    out = tmp_path / "out"
    assert preprocess_v2_isles.main(_isles_argv(tmp_path / "missing", out)) == 1
    assert _one_error_line(capsys).endswith(f"ERROR {tmp_path / 'missing'}: ISLES folder not found")
    (tmp_path / "empty").mkdir()
    assert preprocess_v2_isles.main(_isles_argv(tmp_path / "empty", out)) == 1
    assert f"ERROR {tmp_path / 'empty'}: no ISLES 2022 files" in _one_error_line(capsys)
    assert not out.exists()

    out.write_text("a file")
    assert preprocess_v2_isles.main(_isles_argv(synthetic_isles_b, out)) == 1
    assert _one_error_line(capsys).endswith(f"ERROR {out}: output path exists and is not a folder")
    assert out.read_text() == "a file"

    read_only = tmp_path / "read_only"
    read_only.mkdir()

    def refuse(*args, dir=None, **kwargs):  # what a read-only mount answers (root ignores chmod)
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("strokeseg.core.io.tempfile.mkstemp", refuse)
    assert preprocess_v2_isles.main(_isles_argv(synthetic_isles_b, read_only)) == 1
    line = _one_error_line(capsys)
    assert f"cannot write {read_only / runner.SETTINGS_NAME}: Read-only file system" in line, line
    assert list(read_only.iterdir()) == []


def test_item15_full_disk_names_the_file_being_written(synthetic_isles_b: Path, tmp_path: Path, monkeypatch) -> None:
    """ENOSPC while writing one case's .npz: that case fails naming the .npz, no partial file
    stays, the other cases are written."""
    real_write = np.lib.format.write_array
    out = tmp_path / "out"
    full = []

    def write_array(*args, **kwargs):
        if not full and (out / "sub-strokecase0002.npz").exists():  # the cases run in order: the third case's first member
            full.append(True)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", write_array)
    assert preprocess_v2_isles.main(_isles_argv(synthetic_isles_b, out)) == 1
    assert _failed(out) == {"sub-strokecase0003": f"OSError: [Errno 28] cannot write {out / 'sub-strokecase0003.npz'}: No space left on device"}
    assert sorted(p.stem for p in out.glob("*.npz")) == [c for c in CASES if c != "sub-strokecase0003"]
    _no_temporaries(out)


def _train(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--isles-dir", str(data), "--output-dir", str(out), *TRAIN_FLAGS, *extra]


@pytest.mark.parametrize("workers", ["0", "1"])
def test_item15_bad_training_volume_is_one_line_naming_it(workers: str, isles_train: Path, tmp_path: Path, capsys) -> None:
    """A case without its DWI member, read inside a DataLoader worker (or the main process):
    exit 2 and one line naming the file, not the worker's traceback."""
    data = _copy(isles_train, tmp_path / "data")
    broken = data / "sub-strokecase0004.npz"
    arrays = load_npz(broken)
    save_npz(broken, {"adc": arrays["adc"], "mask": arrays["mask"]})
    capsys.readouterr()
    assert train_isles_resnet18.main(_train(data, tmp_path / "run", "--workers", workers)) == 2
    line = _one_error_line(capsys)
    assert re.search(rf"ERROR: {re.escape(str(broken))}: missing key", line), line
    assert ("(in DataLoader worker process 0)" in line) == (workers == "1"), line
    assert len(line) < 400
    assert not (tmp_path / "run" / "fold_0" / "best_model.pth").exists()


def test_item15_mixed_volume_shapes_name_both_files(isles_train: Path, tmp_path: Path, capsys) -> None:
    data = _copy(isles_train, tmp_path / "data")
    train = read_json(data / SPLITS)["fold_0"]["ISLES2022"]["train"]
    small, first = data / f"{train[-1]}.npz", data / f"{train[0]}.npz"  # a training case of fold 0
    arrays = load_npz(small)
    save_npz(small, {k: v[:12, :12, :12] if v.ndim == 3 else v for k, v in arrays.items()})
    capsys.readouterr()
    assert train_isles_resnet18.main(_train(data, tmp_path / "run", "--workers", "0")) == 2
    line = _one_error_line(capsys)
    assert f"{small}: volume shape (12, 12, 12) differs from (16, 16, 16) of {first}" in line, line
    assert not (tmp_path / "run" / "fold_0" / "last.pth").exists()


def test_item15_diverged_training_names_the_step_and_the_batch_cases(isles_train: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """A loss that is not finite (here from step 2 on) ends training with one line naming the
    step and the cases of that batch, which are training cases of the fold."""
    real_step, steps = engine.train_step, []

    def diverging_step(*args, **kwargs) -> torch.Tensor:
        steps.append(real_step(*args, **kwargs))
        return steps[-1] if len(steps) < 2 else torch.tensor(float("nan"))

    monkeypatch.setattr(engine, "train_step", diverging_step)
    capsys.readouterr()
    assert train_isles_resnet18.main(_train(isles_train, tmp_path / "run", "--workers", "0")) == 2
    line = _one_error_line(capsys)
    match = re.search(r"ERROR: training diverged: the loss became nan at step 2 of epoch 1 \(cases ([^;]+); inputs are finite\): lower --lr", line)
    assert match, line
    named = match.group(1).split(", ")
    assert 1 <= len(named) <= 2 and set(named) <= set(read_json(isles_train / SPLITS)["fold_0"]["ISLES2022"]["train"]), named
    assert len(steps) == 2 and not (tmp_path / "run" / "fold_0" / "best_model.pth").exists()


def _checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    config = {"arch": "resnet18_unet", "variant": "dwi_only", "width": 4}
    models.save_checkpoint(path, models.build_model(config), config)
    return path


def test_item15_truncated_checkpoint_is_one_line(isles_train: Path, tmp_path: Path, capsys) -> None:
    ckpt = _checkpoint(tmp_path / "brats.pth")
    ckpt.write_bytes(ckpt.read_bytes()[:5100])  # a cut that torch reports as "[Errno 22] Invalid argument"
    capsys.readouterr()
    assert train_isles_resnet18.main(_train(isles_train, tmp_path / "run", "--workers", "0", "--init", "brats", "--pretrain-ckpt", str(ckpt))) == 2
    line = _one_error_line(capsys)
    assert f"ERROR: {ckpt}: not a readable checkpoint, truncated or corrupt (5100 bytes" in line, line
    assert not (tmp_path / "run" / "fold_0" / "last.pth").exists()


def test_item15_missing_mask_says_where_it_looked(synthetic_isles_b: Path, tmp_path: Path) -> None:
    raw = _copy(synthetic_isles_b, tmp_path / "raw")
    (raw / "derivatives" / "sub-strokecase0005" / "ses-0001" / "sub-strokecase0005_ses-0001_msk.nii.gz").unlink()
    out = tmp_path / "out"
    assert preprocess_v2_isles.main(_isles_argv(raw, out)) == 1
    assert _failed(out) == {
        "sub-strokecase0005": f"sub-strokecase0005: no mask file found (looked for sub-strokecase0005_ses-0001_msk.nii[.gz] under {raw / 'derivatives'})"
    }
    assert not (out / "sub-strokecase0005.npz").exists() and (out / "sub-strokecase0004.npz").exists()


# --------------------------------------------------------------------------- item 16


class _Foreign:
    """A Python object that only an unsafe (pickle) load could rebuild."""


def test_item16_pickled_checkpoint_is_refused_without_unsafe_advice(isles_train: Path, tmp_path: Path, capsys) -> None:
    ckpt = tmp_path / "foreign.pth"
    torch.save({"model": {}, "payload": _Foreign()}, ckpt)
    capsys.readouterr()
    assert train_isles_resnet18.main(_train(isles_train, tmp_path / "run", "--workers", "0", "--init", "brats", "--pretrain-ckpt", str(ckpt))) == 2
    line = _one_error_line(capsys)
    assert f"ERROR: {ckpt}: not a checkpoint of this pipeline (it holds a Python object, test_stage_safety._Foreign," in line, line
    assert "untrusted source" in line
    assert "\x1b" not in line and "weights_only=False" not in line and "trust" not in line.replace("untrusted", "")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.pth"))
