"""Reliability of every stage script, end to end through ``main(argv)`` or a subprocess:

1. bad inputs of every stage in one table: non-zero exit, a one-line reason naming the file,
   the good cases still written;
2. ``kill -9`` in the middle of each per-case stage and of training leaves only complete,
   loadable outputs (no ``.partial`` leftover matches an output glob) and a re-run completes;
3. two identical seeded CPU runs write identical outputs (byte-identical .npz, equal splits,
   checkpoint tensors and history; summaries equal up to timings and paths).
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import pytest
import torch

import evaluate
import extract_patches_96x96x96
import models
import preprocess_brats2024_t2flair
import preprocess_isles_WITH_BBOX
import preprocess_stroke_foundation
import preprocess_v2_isles
import train_brats_uctransnet3d
import train_isles_resnet18
import train_stroke
from strokeseg.datasets.contract import DataContract
from strokeseg.core.io import load_npz, read_json, save_npz, write_json
from strokeseg.datasets.splits import load_split
from strokeseg.training.fold_folder import LOCK_NAME

REPO = Path(__file__).resolve().parents[1]
GRID = ["16", "16", "16"]  # preprocessed grid of the tiny ISLES / BraTS volumes (voxels)
TRAIN_FLAGS = ["--width", "4", "--patch-size", "16", "--batch-size", "2", "--workers", "0"]
VOLATILE = {"seconds", "started", "argv"}  # timings and the command line differ between runs
KILL_TIMEOUT_S = 120.0
TRAINING_OUTPUTS = {"best_model.pth", "last.pth", "history.csv", "curves.png", "run_args.json"}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # Two intra-op threads on a 2-core machine shared with other jobs can make tiny convolutions
    # 50x slower (threads spin-waiting for a busy core); one thread keeps the timings stable.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------- shared inputs


def _foundation_config(folder: Path, **preprocessing: Any) -> Path:
    """The shipped config.json on the CPU (use_gpu false), written into ``folder``."""
    raw = json.loads((REPO / "config.json").read_text())
    raw["preprocessing"].update({"use_gpu": False, **preprocessing})
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", raw)
    return folder / "config.json"


def _foundation_argv(config: Path, out: Path, name: str, data: Path) -> list[str]:
    return ["--config", str(config), "--output-base-dir", str(out), "--data-dir", f"{name}={data}", "--datasets", name]


def _patch_argv(found: Path, out: Path) -> list[str]:
    return ["--input_dir", str(found), "--output_dir", str(out), "--datasets", "ATLAS", "--patch_size", "16", "--max_patches", "8"]


@pytest.fixture(scope="module")
def isles_train(synthetic_isles_a: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """preprocess_v2_isles.py output of the 6 synthetic ISLES cases on 16^3, with splits."""
    out = tmp_path_factory.mktemp("rel_isles_train")
    assert preprocess_v2_isles.main(["--isles-dir", str(synthetic_isles_a), "--output-dir", str(out), "--target-shape", *GRID]) == 0
    return out


@pytest.fixture(scope="module")
def isles_eval(synthetic_isles_a: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rel_isles_eval")
    assert preprocess_isles_WITH_BBOX.main(["--isles-dir", str(synthetic_isles_a), "--output-dir", str(out), "--target-shape", *GRID]) == 0
    return out


@pytest.fixture(scope="module")
def brats_train(brats_seven: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rel_brats_train")
    assert preprocess_brats2024_t2flair.main(["--brats-dir", str(brats_seven), "--output-dir", str(out), "--target-shape", *GRID]) == 0
    return out


@pytest.fixture(scope="module")
def atlas_found(synthetic_atlas: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Foundation output root (holding ATLAS/) of the 6 synthetic ATLAS cases."""
    tmp = tmp_path_factory.mktemp("rel_found")
    assert preprocess_stroke_foundation.main(_foundation_argv(_foundation_config(tmp), tmp / "out", "ATLAS", synthetic_atlas)) == 0
    return tmp / "out"


@pytest.fixture(scope="module")
def atlas_train(atlas_found: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A train_stroke.py --data-dir: the foundation ATLAS/ folder plus ATLAS_patches_16/."""
    root = tmp_path_factory.mktemp("rel_atlas_train")
    (root / "ATLAS").symlink_to(atlas_found / "ATLAS", target_is_directory=True)
    assert extract_patches_96x96x96.main(_patch_argv(root, root)) == 0
    return root


# --------------------------------------------------------------------------- 1. bad inputs


@dataclass
class BadRun:
    """One stage run on a bad input and what must come of it.

    pattern: regex the one-line reason must match (it names the file); summary: the stage's
    summary JSON listing the failure, or None when the reason is only logged (run-level
    errors); written / absent: outputs that must / must not exist afterwards.
    """

    main: Callable[[list[str]], int]
    argv: list[str]
    pattern: str
    summary: Path | None = None
    written: list[Path] = field(default_factory=list)
    absent: list[Path] = field(default_factory=list)
    argument_error: bool = False


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def bad_isles_truncated_dwi(request: pytest.FixtureRequest, tmp: Path) -> BadRun:
    raw = _copy(request.getfixturevalue("synthetic_isles_b"), tmp / "raw")
    dwi = raw / "rawdata" / "sub-strokecase0002" / "ses-0001" / "sub-strokecase0002_ses-0001_dwi.nii.gz"
    dwi.write_bytes(dwi.read_bytes()[:3000])
    out = tmp / "out"
    good = [out / f"sub-strokecase000{i}.npz" for i in (1, 3, 4, 5, 6)]
    # --test-fraction 0: the 5 good cases still make 5 folds, so only the bad case fails the run.
    argv = ["--isles-dir", str(raw), "--output-dir", str(out), "--target-shape", *GRID, "--test-fraction", "0"]
    return BadRun(preprocess_v2_isles.main, argv, re.escape(str(dwi)) + ": unreadable NIfTI", out / "preprocessing_summary.json",
                  good + [out / "isles2022_splits_5fold.json"], [out / "sub-strokecase0002.npz"])


def bad_isles_missing_adc(request: pytest.FixtureRequest, tmp: Path) -> BadRun:
    raw = _copy(request.getfixturevalue("synthetic_isles_b"), tmp / "raw")
    (raw / "rawdata" / "sub-strokecase0004" / "ses-0001" / "sub-strokecase0004_ses-0001_adc.nii.gz").unlink()
    out = tmp / "out"
    return BadRun(preprocess_isles_WITH_BBOX.main, ["--isles-dir", str(raw / "derivatives"), "--output-dir", str(out), "--target-shape", *GRID],
                  "^sub-strokecase0004: no ADC file found " + re.escape(f"(looked for sub-strokecase0004_ses-0001_adc.nii[.gz] under {raw} outside derivatives/)") + "$",
                  out / "preprocessing_summary.json",
                  [out / "sub-strokecase0003.npz", out / "sub-strokecase0005.npz"], [out / "sub-strokecase0004.npz"])


def _brats_copy(request: pytest.FixtureRequest, tmp: Path) -> tuple[Path, Path, list[str]]:
    raw = _copy(request.getfixturevalue("synthetic_brats"), tmp / "raw")
    return raw, tmp / "out", sorted(p.name for p in raw.iterdir() if p.name.startswith("BraTS-GLI-"))


def bad_brats_seg_label_7(request: pytest.FixtureRequest, tmp: Path) -> BadRun:
    raw, out, cases = _brats_copy(request, tmp)
    seg_path = raw / cases[1] / f"{cases[1]}-seg.nii.gz"
    seg = nib.load(str(seg_path))
    labels = np.asarray(seg.dataobj).copy()
    labels[labels == 2] = 7
    nib.save(nib.Nifti1Image(labels, seg.affine), str(seg_path))
    pattern = re.escape(str(seg_path)) + r": mask values must be 0/1/2/3/4; found other value\(s\) \{7\}"
    return BadRun(preprocess_brats2024_t2flair.main, ["--brats-dir", str(raw), "--output-dir", str(out), "--target-shape", *GRID],
                  pattern, out / "preprocessing_summary.json", [out / f"{c}.npz" for c in cases if c != cases[1]], [out / f"{cases[1]}.npz"])


def bad_brats_missing_t2f(request: pytest.FixtureRequest, tmp: Path) -> BadRun:
    raw, out, cases = _brats_copy(request, tmp)
    (raw / cases[2] / f"{cases[2]}-t2f.nii.gz").unlink()
    pattern = rf"^{cases[2]}: no T2-FLAIR file \({cases[2]}-t2f\.nii\.gz\)$"
    return BadRun(preprocess_brats2024_t2flair.main, ["--brats-dir", str(raw), "--output-dir", str(out), "--target-shape", *GRID],
                  pattern, out / "preprocessing_summary.json", [out / f"{c}.npz" for c in cases if c != cases[2]], [out / f"{cases[2]}.npz"])


def bad_foundation_image_without_mask(request: pytest.FixtureRequest, tmp: Path) -> BadRun:
    raw = _copy(request.getfixturevalue("synthetic_uoa"), tmp / "raw")
    (raw / "UOA002" / "UOA002_lesion.nii.gz").unlink()
    image = raw / "UOA002" / "UOA002_T1_FNIRT_MNI.nii.gz"
    folder = tmp / "out" / "UOA_Private"
    return BadRun(preprocess_stroke_foundation.main, _foundation_argv(_foundation_config(tmp), tmp / "out", "UOA_Private", raw),
                  r"^UOA002: no mask matching '\*\*/\*_lesion\.nii\.gz' for " + re.escape(str(image)) + "$", folder / "UOA_Private_summary.json",
                  [folder / f"UOA00{i}{suffix}" for i in (1, 3, 4) for suffix in (".npz", "_metadata.json")], [folder / "UOA002.npz"])


def bad_foundation_config_unknown_key(request: pytest.FixtureRequest, tmp: Path) -> BadRun:
    config = _foundation_config(tmp, clip_percentil=99.0)
    return BadRun(preprocess_stroke_foundation.main, _foundation_argv(config, tmp / "out", "UOA_Private", request.getfixturevalue("synthetic_uoa")),
                  re.escape(str(config)) + r": invalid config: preprocessing: unknown key 'clip_percentil'", absent=[tmp / "out"])


def bad_patches_corrupt_npz(request: pytest.FixtureRequest, tmp: Path) -> BadRun:
    found = _copy(request.getfixturevalue("atlas_found") / "ATLAS", tmp / "in" / "ATLAS").parent
    cases = sorted(p.stem for p in (found / "ATLAS").glob("*.npz"))
    broken = found / "ATLAS" / f"{cases[2]}.npz"
    broken.write_bytes(broken.read_bytes()[:200])
    folder = tmp / "out" / "ATLAS_patches_16"
    return BadRun(extract_patches_96x96x96.main, _patch_argv(found, tmp / "out"), re.escape(str(broken)) + r": unreadable \.npz",
                  folder / "ATLAS_16_summary.json", [folder / f"{c}.npz" for c in cases if c != cases[2]], [folder / broken.name])


def _isles_training_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--isles-dir", str(data), "--output-dir", str(out), "--strategy", "dwi_only", *TRAIN_FLAGS, "--epochs", "1", *extra]


def bad_training_missing_pretrain_file(request: pytest.FixtureRequest, tmp: Path) -> BadRun:
    missing = tmp / "brats_run" / "fold_0" / "best_model.pth"
    argv = _isles_training_argv(request.getfixturevalue("isles_train"), tmp / "run", "--init", "brats", "--pretrain-ckpt", str(missing))
    return BadRun(train_isles_resnet18.main, argv, "ERROR: checkpoint not found: " + re.escape(str(missing)) + "$",
                  absent=[tmp / "run" / "fold_0" / "last.pth", tmp / "run" / "fold_0" / "best_model.pth"])


def bad_training_pretrain_flag_missing(request: pytest.FixtureRequest, tmp: Path) -> BadRun:
    argv = _isles_training_argv(request.getfixturevalue("isles_train"), tmp / "run", "--init", "brats")
    return BadRun(train_isles_resnet18.main, argv, r"error: --init brats requires --pretrain-ckpt", absent=[tmp / "run"], argument_error=True)


def bad_training_train_val_overlap(request: pytest.FixtureRequest, tmp: Path) -> BadRun:
    data = request.getfixturevalue("isles_train")
    cases = sorted(p.stem for p in data.glob("*.npz"))
    splits = tmp / "overlap.json"
    write_json(splits, {"fold_0": {"ISLES2022": {"train": cases[:4], "val": cases[3:5], "test": cases[5:]}}})
    argv = _isles_training_argv(data, tmp / "run", "--splits-file", str(splits))
    pattern = "ERROR: " + re.escape(f"{splits}: fold_0/ISLES2022: 1 id(s) in both train and val: ['{cases[3]}']")
    return BadRun(train_isles_resnet18.main, argv, pattern, absent=[tmp / "run"])


def bad_brats_training_splits_file_missing(request: pytest.FixtureRequest, tmp: Path) -> BadRun:
    (tmp / "brats").mkdir()
    argv = ["--brats-dir", str(tmp / "brats"), "--output-dir", str(tmp / "run"), "--arch", "resnet18", *TRAIN_FLAGS]
    return BadRun(train_brats_uctransnet3d.main, argv, "ERROR: " + re.escape(str(tmp / "brats" / "brats2024_t2flair_splits_5fold.json")) + ": file not found",
                  absent=[tmp / "run"])


def bad_stroke_training_no_patch_folder(request: pytest.FixtureRequest, tmp: Path) -> BadRun:
    argv = ["--dataset", "ATLAS", "--data-dir", str(tmp / "found"), "--output-dir", str(tmp / "run"), *TRAIN_FLAGS]
    return BadRun(train_stroke.main, argv, "ERROR: " + re.escape(str(tmp / "found" / "ATLAS_patches_16")) + ": patch folder not found",
                  absent=[tmp / "run"])


def bad_training_isles_checkpoint_as_brats_init(request: pytest.FixtureRequest, tmp: Path) -> BadRun:
    wrong = _untrained_checkpoint(tmp / "isles_run" / "fold_0" / "best_model.pth")  # an ISLES run's checkpoint (its run config)
    argv = _isles_training_argv(request.getfixturevalue("isles_train"), tmp / "run", "--init", "brats", "--pretrain-ckpt", str(wrong))
    pattern = "ERROR: " + re.escape(f"{wrong}: trained on ISLES2022 (its run config), not BraTS2024: refused as the 'brats' initialisation") + "$"
    return BadRun(train_isles_resnet18.main, argv, pattern, absent=[tmp / "run" / "fold_0" / "last.pth", tmp / "run" / "fold_0" / "best_model.pth"])


def bad_brats_finetune_from_a_checkpoint_that_saw_the_test_set(request: pytest.FixtureRequest, tmp: Path) -> BadRun:
    data = request.getfixturevalue("brats_train")
    split = load_split(data / "brats2024_t2flair_splits_5fold.json", 0, "BraTS2024")
    source, config = tmp / "source" / "best_model.pth", {"arch": "resnet18_unet", "width": 4}
    contract = DataContract("BraTS2024", ("image",), "mask", (16, 16, 16), 0.5, {}, 1, (*split.train, split.test[0]), tuple(split.val[:1]))
    models.save_checkpoint(source, models.build_model(config), config, config={"brats_dir": str(data), "fold": 1}, data_contract=contract.as_dict())
    argv = ["--brats-dir", str(data), "--output-dir", str(tmp / "run"), "--arch", "resnet18", *TRAIN_FLAGS, "--pretrain-ckpt", str(source)]
    pattern = "ERROR: " + re.escape(f"{source}: trained or validated on 1 of this fold's held-out case(s), e.g. {[split.test[0]]}: leakage")
    return BadRun(train_brats_uctransnet3d.main, argv, pattern, absent=[tmp / "run" / "fold_0" / "last.pth", tmp / "run" / "fold_0" / "best_model.pth"])


def _untrained_checkpoint(path: Path) -> Path:
    """A width-4 DWI-only ResNet U-Net checkpoint as train_isles_resnet18.py lays it out."""
    torch.manual_seed(0)
    config = {"arch": "resnet18", "variant": "dwi_only", "width": 4}
    models.save_checkpoint(path, models.build_model(config), config, config={"isles_dir": "x", "fold": 0, "patch_size": 16})
    return path


def _evaluate_argv(data: Path, splits: Path, checkpoint: Path, out: Path) -> list[str]:
    return ["--dataset", "ISLES2022", "--data-dir", str(data), "--splits-file", str(splits), "--checkpoints", str(checkpoint),
            "--output-dir", str(out), "--png", "none", "--bootstrap", "20"]


def _evaluate_splits(path: Path, test: list[str]) -> Path:
    write_json(path, {"fold_0": {"ISLES2022": {"train": ["t"], "val": ["v"], "test": test}}})
    return path


def bad_evaluate_missing_checkpoint(request: pytest.FixtureRequest, tmp: Path) -> BadRun:
    data = request.getfixturevalue("isles_eval")
    splits = _evaluate_splits(tmp / "splits.json", sorted(p.stem for p in data.glob("*.npz")))
    missing = tmp / "run" / "fold_0" / "best_model.pth"
    return BadRun(evaluate.main, _evaluate_argv(data, splits, missing, tmp / "out"), "ERROR checkpoint not found: " + re.escape(str(missing)) + "$",
                  absent=[tmp / "out" / "per_case.csv"])


def bad_evaluate_test_case_not_in_data(request: pytest.FixtureRequest, tmp: Path) -> BadRun:
    data = request.getfixturevalue("isles_eval")
    splits = _evaluate_splits(tmp / "splits.json", ["sub-strokecase0001", "sub-strokecase9999"])
    out = tmp / "out"
    pattern = r"^sub-strokecase9999: listed in the splits file but " + re.escape(str(data / "sub-strokecase9999.npz")) + " does not exist$"
    return BadRun(evaluate.main, _evaluate_argv(data, splits, _untrained_checkpoint(tmp / "run" / "fold_0" / "best_model.pth"), out),
                  pattern, out / "summary.json", [out / "per_case.csv", out / "results.md"])


BAD_INPUTS = [
    bad_isles_truncated_dwi,
    bad_isles_missing_adc,
    bad_brats_seg_label_7,
    bad_brats_missing_t2f,
    bad_foundation_image_without_mask,
    bad_foundation_config_unknown_key,
    bad_patches_corrupt_npz,
    bad_training_missing_pretrain_file,
    bad_training_pretrain_flag_missing,
    bad_training_train_val_overlap,
    bad_brats_training_splits_file_missing,
    bad_stroke_training_no_patch_folder,
    bad_training_isles_checkpoint_as_brats_init,
    bad_brats_finetune_from_a_checkpoint_that_saw_the_test_set,
    bad_evaluate_missing_checkpoint,
    bad_evaluate_test_case_not_in_data,
]


@pytest.mark.parametrize("build", BAD_INPUTS, ids=lambda build: build.__name__.removeprefix("bad_"))
def test_bad_input_fails_with_a_one_line_reason(build: Callable, request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = build(request, tmp_path)
    capsys.readouterr()
    if run.argument_error:
        with pytest.raises(SystemExit) as info:
            run.main(run.argv)
        assert info.value.code not in (0, None)
    else:
        assert run.main(run.argv) != 0
    captured = capsys.readouterr()
    if run.summary is not None:
        failed = read_json(run.summary)["failed"]
        reasons = [item["reason"] for item in failed]
        assert all("\n" not in reason for reason in reasons), reasons
        assert len(failed) == 1, failed  # only the bad case failed
        assert f"FAILED {failed[0]['case_id']}: {reasons[0]}" in captured.out  # and the log says why
    else:
        reasons = (captured.out + captured.err).splitlines()
    assert any(re.search(run.pattern, reason) for reason in reasons), f"no reason matches {run.pattern!r} in {reasons}"
    for path in run.written:
        assert path.is_file(), f"good output {path} was not written"
    for path in run.absent:
        assert not path.exists(), f"{path} should not exist after the failure"


# --------------------------------------------------------------------------- 2. kill -9


def _tail(log: Path, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else "(no output)"


def _kill_when(argv: list[str], ready: Callable[[], bool], log: Path) -> None:
    """Run a stage script (cwd = repository root) and SIGKILL its process group as soon as
    ``ready()`` holds; fail with the script's output when it ends first or never gets ready."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"{argv[0]} exited with {proc.returncode} before the kill point:\n{_tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"{argv[0]}: kill point not reached within {KILL_TIMEOUT_S:.0f} s:\n{_tail(log)}")
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:  # still running (a failed poll): never leave it behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"{argv[0]} finished (status {proc.returncode}) before it was killed:\n{_tail(log)}"


def _mid_write(folder: Path, pattern: str) -> Callable[[], bool]:
    """Kill point: a second output exists, or one exists and another is being written."""
    def ready() -> bool:
        done = len(list(folder.glob(pattern)))
        return done >= 2 or (done == 1 and any(folder.glob(".*.partial")))

    return ready


_PNG_END = b"IEND\xaeB`\x82"


def _assert_outputs_complete(folder: Path) -> list[str]:
    """Every visible file under ``folder`` loads completely (no pickle); hidden files may only be
    ``.partial`` leftovers or a training's fold lock, and no output glob picks one up. Returns
    the visible relative paths."""
    visible = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name.startswith("."):
            assert path.name.endswith(".partial") or path.name == LOCK_NAME, f"unexpected hidden file {path}"
            continue
        visible.append(str(path.relative_to(folder)))
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                assert data.files, path
                for key in data.files:
                    data[key]  # decompresses the member: a truncated file raises here
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".pth":
            assert "model" in torch.load(path, map_location="cpu", weights_only=True), path
        elif path.suffix == ".csv":
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            assert rows and all(len(row) == len(rows[0]) for row in rows), path
        elif path.suffix == ".png":
            assert path.read_bytes().endswith(_PNG_END), f"{path} is truncated"
        else:
            pytest.fail(f"unexpected output {path}")
    for pattern in ("*.npz", "*.json", "*.pth", "*.csv", "*.png"):
        leftovers = [p for p in folder.rglob(pattern) if p.name.startswith(".") or "partial" in p.name]
        assert not leftovers, f"glob {pattern!r} picks up temporary files {leftovers}"
    return visible


def _last_epoch(fold_dir: Path) -> int:
    return int(torch.load(fold_dir / "last.pth", map_location="cpu", weights_only=True)["epoch"])


@dataclass
class KillCase:
    """A stage run to interrupt: the script and its argv (run as a subprocess), ``main`` for the
    re-run with the same argv plus ``rerun_flags`` (in-process), the folder it writes, the kill
    point and the outputs a complete run leaves there."""

    main: Callable[[list[str]], int]
    argv: list[str]
    folder: Path
    ready: Callable[[], bool]
    expected: set[str]
    rerun_flags: list[str] = field(default_factory=list)
    epochs: int = 0  # training: the run's epochs (0 for per-case stages)


def kill_isles(request: pytest.FixtureRequest, tmp: Path) -> KillCase:
    raw = request.getfixturevalue("synthetic_isles_a")
    out = tmp / "out"
    argv = ["preprocess_v2_isles.py", "--isles-dir", str(raw), "--output-dir", str(out), "--target-shape", "64", "64", "64"]
    cases = {f"sub-strokecase000{i}.npz" for i in range(1, 7)}
    return KillCase(preprocess_v2_isles.main, argv, out, _mid_write(out, "*.npz"), cases | {"isles2022_splits_5fold.json"})


def kill_brats(request: pytest.FixtureRequest, tmp: Path) -> KillCase:
    raw = request.getfixturevalue("brats_seven")
    out = tmp / "out"
    argv = ["preprocess_brats2024_t2flair.py", "--brats-dir", str(raw), "--output-dir", str(out), "--target-shape", "64", "64", "64"]
    cases = {f"{p.name}.npz" for p in raw.iterdir() if p.is_dir()}
    return KillCase(preprocess_brats2024_t2flair.main, argv, out, _mid_write(out, "*.npz"), cases | {"brats2024_t2flair_splits_5fold.json"})


def kill_foundation(request: pytest.FixtureRequest, tmp: Path) -> KillCase:
    out = tmp / "out"
    argv = ["preprocess_stroke_foundation.py", *_foundation_argv(_foundation_config(tmp), out, "ATLAS", request.getfixturevalue("synthetic_atlas"))]
    cases = {p.name for p in (request.getfixturevalue("atlas_found") / "ATLAS").glob("*.npz")}
    metadata = {name.replace(".npz", "_metadata.json") for name in cases}
    return KillCase(preprocess_stroke_foundation.main, argv, out / "ATLAS", _mid_write(out / "ATLAS", "*.npz"),
                    cases | metadata | {"ATLAS_splits_5fold.json"})


def kill_patches(request: pytest.FixtureRequest, tmp: Path) -> KillCase:
    found = request.getfixturevalue("atlas_found")
    folder = tmp / "out" / "ATLAS_patches_16"
    argv = ["extract_patches_96x96x96.py", *_patch_argv(found, tmp / "out")]
    return KillCase(extract_patches_96x96x96.main, argv, folder, _mid_write(folder, "*.npz"), {p.name for p in (found / "ATLAS").glob("*.npz")})


def kill_training(request: pytest.FixtureRequest, tmp: Path) -> KillCase:
    fold = tmp / "run" / "fold_0"
    argv = ["train_isles_resnet18.py", "--isles-dir", str(request.getfixturevalue("isles_train")), "--output-dir", str(tmp / "run"),
            "--strategy", "dwi_only", *TRAIN_FLAGS, "--epochs", "5"]
    # Killed once epoch 1's last.pth is saved, preferably while history.csv or curves.png is
    # being written after it: --resume continues from epoch 2.
    def ready() -> bool:
        return (fold / "last.pth").is_file() and (any(fold.glob(".*.partial")) or (fold / "curves.png").is_file())

    return KillCase(train_isles_resnet18.main, argv, fold, ready, TRAINING_OUTPUTS, ["--resume"], epochs=5)


def kill_training_between_checkpoints(request: pytest.FixtureRequest, tmp: Path) -> KillCase:
    case = kill_training(request, tmp)
    fold = case.folder
    # Killed after the first of epoch 1's two checkpoints was written, before the other: the
    # requeue flag --resume-if-exists must then continue (or restart) the run.
    case.ready = lambda: (fold / "best_model.pth").is_file() != (fold / "last.pth").is_file()
    case.rerun_flags = ["--resume-if-exists"]
    return case


@pytest.mark.parametrize(
    "build",
    [kill_isles, kill_brats, kill_foundation, kill_patches, kill_training,
     kill_training_between_checkpoints],
    ids=lambda b: b.__name__.removeprefix("kill_"),
)
def test_kill_9_mid_run_leaves_complete_outputs_and_rerun_completes(build: Callable, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    case = build(request, tmp_path)
    _kill_when(case.argv, case.ready, tmp_path / "killed.log")
    before = set(_assert_outputs_complete(case.folder))
    if case.epochs:
        assert "last.pth" not in before or _last_epoch(case.folder) < case.epochs, "training finished before it was killed"
    else:
        assert not case.expected <= before, f"every output already existed at the kill: {sorted(before)}"
    assert case.main(case.argv[1:] + case.rerun_flags) == 0
    after = set(_assert_outputs_complete(case.folder))
    assert case.expected <= after, f"missing after the re-run: {sorted(case.expected - after)}"
    if case.epochs:
        assert _last_epoch(case.folder) == case.epochs
        with open(case.folder / "history.csv", newline="") as f:
            assert [int(row["epoch"]) for row in csv.DictReader(f)] == list(range(1, case.epochs + 1))


# --------------------------------------------------------------------------- 3. reproducibility


def _canonical(value: Any, root: Path) -> Any:
    """``value`` with volatile keys (timings, start time, command line) dropped, the run's
    output folder in strings replaced by "<out>" and tensors as (dtype, shape, bytes)."""
    if isinstance(value, dict):
        return {k: _canonical(v, root) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, (list, tuple)):
        return [_canonical(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(str(root), "<out>")
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), tuple(value.shape), value.detach().cpu().contiguous().numpy().tobytes())
    return value


def _read_canonical(path: Path, root: Path) -> Any:
    if path.suffix == ".json":
        return _canonical(read_json(path), root)
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return _canonical(list(csv.DictReader(f)), root)
    return _canonical(torch.load(path, map_location="cpu", weights_only=True), root)


def _assert_same_outputs(a: Path, b: Path) -> None:
    """Same file sets; .npz and .png byte-identical; JSON, CSV and checkpoints equal after
    :func:`_canonical` (checkpoint tensors compared bit for bit). A training's fold lock (host
    and pid of the last holder) is left out."""
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file() and p.name != LOCK_NAME)
    assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file() and p.name != LOCK_NAME)
    for rel in files:
        if rel.endswith((".npz", ".png")):
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs between the two runs"
        elif rel.endswith(".pth"):
            x, y = _read_canonical(a / rel, a), _read_canonical(b / rel, b)
            for key in x["model"]:
                assert x["model"][key] == y["model"][key], f"{rel}: tensor {key} differs"
            assert x == y, f"{rel} differs between the two runs"
        else:
            assert _read_canonical(a / rel, a) == _read_canonical(b / rel, b), f"{rel} differs between the two runs"


def _repro_isles(request: pytest.FixtureRequest, tmp: Path) -> tuple[Callable, Callable[[Path], list[str]]]:
    raw = request.getfixturevalue("synthetic_isles_a")
    return preprocess_v2_isles.main, lambda out: ["--isles-dir", str(raw), "--output-dir", str(out), "--target-shape", *GRID]


def _repro_isles_bbox(request: pytest.FixtureRequest, tmp: Path) -> tuple[Callable, Callable[[Path], list[str]]]:
    raw = request.getfixturevalue("synthetic_isles_b")
    return preprocess_isles_WITH_BBOX.main, lambda out: ["--isles-dir", str(raw), "--output-dir", str(out), "--target-shape", "20", "18", "16"]


def _repro_brats(request: pytest.FixtureRequest, tmp: Path) -> tuple[Callable, Callable[[Path], list[str]]]:
    raw = request.getfixturevalue("brats_seven")
    return preprocess_brats2024_t2flair.main, lambda out: ["--brats-dir", str(raw), "--output-dir", str(out), "--target-shape", *GRID]


def _repro_foundation(request: pytest.FixtureRequest, tmp: Path) -> tuple[Callable, Callable[[Path], list[str]]]:
    raw, config = request.getfixturevalue("synthetic_atlas"), _foundation_config(tmp / "cfg")
    return preprocess_stroke_foundation.main, lambda out: _foundation_argv(config, out, "ATLAS", raw)


def _repro_patches(request: pytest.FixtureRequest, tmp: Path) -> tuple[Callable, Callable[[Path], list[str]]]:
    found = request.getfixturevalue("atlas_found")
    return extract_patches_96x96x96.main, lambda out: _patch_argv(found, out)


def _repro_training(request: pytest.FixtureRequest, tmp: Path) -> tuple[Callable, Callable[[Path], list[str]]]:
    data = request.getfixturevalue("isles_train")
    # Defaults: the shared strategy (two heads) with full augmentation (rotation, zoom, intensity).
    return train_isles_resnet18.main, lambda out: ["--isles-dir", str(data), "--output-dir", str(out), *TRAIN_FLAGS, "--epochs", "2"]


def _repro_brats_training(request: pytest.FixtureRequest, tmp: Path) -> tuple[Callable, Callable[[Path], list[str]]]:
    data = request.getfixturevalue("brats_train")
    # UCTransNet3D: attention and transformer dropout on top of the convolutional path.
    flags = [*TRAIN_FLAGS, "--layers", "1", "--heads", "2", "--epochs", "2", "--patches-per-volume", "2"]
    return train_brats_uctransnet3d.main, lambda out: ["--brats-dir", str(data), "--output-dir", str(out), *flags]


def _repro_stroke_training(request: pytest.FixtureRequest, tmp: Path) -> tuple[Callable, Callable[[Path], list[str]]]:
    data = request.getfixturevalue("atlas_train")
    # Stored lesion patches mixed with random brain patches; whole-volume validation.
    flags = [*TRAIN_FLAGS, "--epochs", "1", "--patches-per-volume", "4", "--sw-batch-size", "8"]
    return train_stroke.main, lambda out: ["--dataset", "ATLAS", "--data-dir", str(data), "--output-dir", str(out), *flags]


@pytest.mark.parametrize(
    "build",
    [_repro_isles, _repro_isles_bbox, _repro_brats, _repro_foundation, _repro_patches, _repro_training, _repro_brats_training,
     _repro_stroke_training],
    ids=lambda b: b.__name__.removeprefix("_repro_"),
)
def test_two_seeded_cpu_runs_write_identical_outputs(build: Callable, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    main, argv = build(request, tmp_path)
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(argv(first)) == 0
    assert main(argv(second)) == 0
    assert any(first.rglob("*.npz")) or any(first.rglob("*.pth"))
    _assert_same_outputs(first, second)


# --------------------------------------------------------------------------- 4. .npz damaged between stages


def _flip_byte(path: Path, member: str) -> None:
    """Flip one bit in the middle of ``member``'s data, in place (bit rot: the zip still opens)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{member}.npy")
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x04
    path.write_bytes(bytes(raw))


def _put_nan(path: Path, member: str) -> None:
    """Rewrite ``path`` with one NaN voxel in ``member``, keeping its storage (compressed or not)."""
    with zipfile.ZipFile(path) as archive:
        compressed = archive.getinfo(f"{member}.npy").compress_type != zipfile.ZIP_STORED
    arrays = load_npz(path)
    arrays[member].flat[arrays[member].size // 2] = np.nan
    save_npz(path, arrays, compress=compressed)


def test_bit_rot_in_a_memory_mapped_training_volume_stops_training(brats_train: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = _copy(brats_train, tmp_path / "brats")
    case = load_split(data / "brats2024_t2flair_splits_5fold.json", 0, "BraTS2024").train[0]
    _flip_byte(data / f"{case}.npz", "image")
    out = tmp_path / "run"
    argv = ["--brats-dir", str(data), "--output-dir", str(out), "--arch", "resnet18", *TRAIN_FLAGS, "--epochs", "1"]
    assert train_brats_uctransnet3d.main(argv) == 2
    line = re.escape(str(data / f"{case}.npz")) + r": member 'image' is corrupt \(CRC-32 [0-9a-f]{8}, the archive records [0-9a-f]{8}\)"
    assert re.search("ERROR: " + line, capsys.readouterr().out)
    assert not (out / "fold_0" / "last.pth").exists() and not (out / "fold_0" / "best_model.pth").exists()


def test_nan_in_a_validation_volume_stops_training(isles_train: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = _copy(isles_train, tmp_path / "isles")
    case = load_split(data / "isles2022_splits_5fold.json", 0, "ISLES2022").val[0]
    _put_nan(data / f"{case}.npz", "dwi")  # compressed: decoded, then checked
    out = tmp_path / "run"
    assert train_isles_resnet18.main(_isles_training_argv(data, out)) == 2
    assert f"ERROR: {data / f'{case}.npz'}: member 'dwi' holds 1 NaN/Inf value(s)" in capsys.readouterr().out
    assert not (out / "fold_0" / "last.pth").exists() and not (out / "fold_0" / "best_model.pth").exists()
