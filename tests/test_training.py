"""End-to-end tests of the training engine and the three training scripts (CPU, tiny networks).

Inputs come from the real stages: strokeseg.datasets.synthetic data preprocessed by
preprocess_v2_isles.py, preprocess_brats2024_t2flair.py, preprocess_stroke_foundation.py and
extract_patches_96x96x96.py. Resume, preemption and torchrun run in subprocesses.
"""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import extract_patches_96x96x96
import models
import predict
import preprocess_brats2024_t2flair
import preprocess_stroke_foundation
import preprocess_v2_isles
import train_brats_uctransnet3d
import train_isles_resnet18
import train_stroke
from strokeseg.core.io import read_json, write_json
from strokeseg.datasets import synthetic
from strokeseg.core.metrics import dice as dice_score
from strokeseg.training import engine, validation
from strokeseg.training.arguments import add_training_arguments
from strokeseg.training.data import find_case_files, load_case_volume
from strokeseg.training.distributed import weights_digest
from strokeseg.training.fold_folder import LOCK_NAME
from strokeseg.training.optimization import lr_at
from strokeseg.training.preemption import EXIT_PREEMPTED

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = ("best_model.pth", "last.pth", "history.csv", "curves.png", "run_args.json")
# Tiny ResNet-18 U-Net on 32³ ISLES volumes: 4 training cases x 6 samples = 12 steps per epoch.
TINY_ISLES = ["--width", "4", "--patch-size", "32", "--batch-size", "2", "--workers", "0", "--strategy", "dwi_only"]


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # and ONE_THREAD_ENV in the subprocesses
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ISLES (32³), BraTS (40³) and ATLAS (40x48x40, 32³ patches) from the real stage scripts."""
    root = tmp_path_factory.mktemp("training_data")
    synthetic.make_isles(root / "isles_raw", 8, layout="B", seed=0, shape=(40, 40, 24))
    assert preprocess_v2_isles.main(["--isles-dir", str(root / "isles_raw"), "--output-dir", str(root / "isles"), "--target-shape", "32", "32", "32"]) == 0
    synthetic.make_brats(root / "brats_raw", 7, seed=0, shape=(40, 40, 32), second_visit_every=0)
    assert preprocess_brats2024_t2flair.main(["--brats-dir", str(root / "brats_raw"), "--output-dir", str(root / "brats"), "--target-shape", "40", "40", "40"]) == 0
    synthetic.make_atlas(root / "atlas_raw", 8, seed=0, shape=(40, 48, 40), empty_every=8)
    config = {
        "output_base_dir": str(root / "foundation"),
        "preprocessing": {"target_spacing": [1.0, 1.0, 1.0], "normalization_method": "zscore", "clip_percentile": 99.5, "use_gpu": False},
        "datasets": [{"name": "ATLAS", "data_dir": str(root / "atlas_raw"), "image_pattern": "**/*_T1w.nii.gz", "mask_pattern": "**/*_label-L_desc-T1lesion_mask.nii.gz"}],
    }
    write_json(root / "config.json", config)
    assert preprocess_stroke_foundation.main(["--config", str(root / "config.json")]) == 0
    assert extract_patches_96x96x96.main(["--input_dir", str(root / "foundation"), "--output_dir", str(root / "foundation"), "--datasets", "ATLAS", "--patch_size", "32", "--max_patches", "4", "--min_lesion_overlap", "0.0001"]) == 0
    return root


@pytest.fixture(scope="module")
def easy_isles(tmp_path_factory: pytest.TempPathFactory, make_sphere_isles) -> Path:
    """An easy set in the ISLES training format: a bright sphere (radius 6-9) in noise, 32³."""
    return make_sphere_isles(tmp_path_factory.mktemp("easy_isles"), 10, 32)


def _history(fold_dir: Path) -> list[dict]:
    with open(fold_dir / "history.csv") as f:
        return list(csv.DictReader(f))


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} never appeared (exit status {process.poll()}): {process.communicate()[0]}")
        time.sleep(0.02)


# --------------------------------------------------------------------------- pure pieces


@pytest.mark.parametrize(
    "step, schedule, expected",
    [
        (0, "cosine", 0.25),  # warmup: (step + 1) / 4 of the peak
        (3, "cosine", 1.0),
        (4, "cosine", 1.0),  # first step after warmup: t = 0
        (9, "cosine", 0.5 * (1 + math.cos(math.pi * 5 / 10))),
        (14, "cosine", 0.0),  # t = 1 at total_steps
        (9, "poly", (1 - 5 / 10) ** 0.9),
        (9, "none", 1.0),
    ],
)
def test_lr_schedule(step, schedule, expected):
    assert lr_at(step, total_steps=14, base_lr=1.0, warmup_steps=4, schedule=schedule) == pytest.approx(expected)


def test_training_defaults_reject_unknown_keys():
    import argparse

    with pytest.raises(ValueError, match="learning_rate"):
        add_training_arguments(argparse.ArgumentParser(), {"learning_rate": 1.0})


# --------------------------------------------------------------------------- the three scripts


def test_isles_script_writes_every_output(data, tmp_path):
    """2-channel shared strategy, 'full' augmentation, 2 DataLoader workers (shared batch slots)."""
    out = tmp_path / "isles"
    argv = ["--isles-dir", str(data / "isles"), "--output-dir", str(out), "--epochs", "2", "--patches-per-volume", "2"]
    argv += ["--width", "4", "--patch-size", "32", "--batch-size", "2", "--workers", "2", "--strategy", "shared"]
    assert train_isles_resnet18.main(argv) == 0
    fold = out / "fold_0"
    assert all((fold / name).is_file() for name in OUTPUTS)
    rows = _history(fold)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert set(rows[0]) == {"epoch", "train_loss", "val_dice", "lr", "seconds"}
    run_args = read_json(fold / "run_args.json")["args"]
    assert run_args["init"]["label"] == "scratch" and run_args["model_config"]["variant"] == "shared"
    model, best = models.model_from_checkpoint(fold / "best_model.pth")
    assert best["model_config"]["in_channels"] == 2 and best["init"]["label"] == "scratch"
    assert best["best_score"] == max(float(r["val_dice"]) for r in rows)
    last = models.load_checkpoint(fold / "last.pth")
    assert {"optimizer", "scheduler", "scaler", "rng", "progress", "history", "config", "settings"} <= set(last)
    assert last["progress"]["epoch"] == 2 and last["progress"]["step"] == 0
    assert last["config"]["strategy"] == "shared"


def _layout_shows(tensor: torch.Tensor) -> bool:
    """A 5-D tensor whose two layouts differ (more than one channel and one voxel)."""
    return tensor.ndim == 5 and tensor.shape[1] > 1 and tensor.shape[2:].numel() > 1


def test_memory_format_option_sets_the_layout_of_weights_and_optimizer_state(data, tmp_path):
    """Default channels-last (checkpoints keep the strides); --no-channels-last stays contiguous.
    Either checkpoint rebuilds a working contiguous model."""
    argv = ["--isles-dir", str(data / "isles"), "--epochs", "1", "--patches-per-volume", "1", *TINY_ISLES]
    for flag, channels_last in [([], True), (["--no-channels-last"], False)]:
        out = tmp_path / str(channels_last)
        assert train_isles_resnet18.main([*argv, "--output-dir", str(out), *flag]) == 0
        last = models.load_checkpoint(out / "fold_0" / "last.pth")
        kernels = [t for t in last["model"].values() if _layout_shows(t)]
        moments = [s["exp_avg"] for s in last["optimizer"]["state"].values() if _layout_shows(s["exp_avg"])]
        assert kernels and moments
        for tensor in kernels + moments:
            assert tensor.is_contiguous(memory_format=torch.channels_last_3d) == channels_last
            assert tensor.is_contiguous() != channels_last
        model, _ = models.model_from_checkpoint(out / "fold_0" / "best_model.pth")
        with torch.no_grad():
            assert models.foreground_probability(model.eval(), torch.zeros(1, 1, 32, 32, 32)).shape == (1, 1, 32, 32, 32)


@pytest.mark.slow(10)
def test_validation_dice_rises_on_an_easy_set(easy_isles, tmp_path):
    """A tiny DWI-only network learns the bright spheres: whole-volume validation Dice rises.
    The default --patch-size 96 covers the 32³ volumes, so training and validation see them
    whole (not zero-padded to 96³): best_score is the Dice of a direct forward pass."""
    out = tmp_path / "learn"
    argv = ["--isles-dir", str(easy_isles), "--output-dir", str(out), "--strategy", "dwi_only", "--width", "8"]
    argv += ["--batch-size", "2", "--workers", "0", "--epochs", "5", "--patches-per-volume", "2"]
    argv += ["--lr", "1e-2", "--loss", "dice_ce", "--warmup-epochs", "0", "--schedule", "none", "--augment", "off", "--seed", "1"]
    assert train_isles_resnet18.main(argv) == 0
    dice = [float(r["val_dice"]) for r in _history(out / "fold_0")]
    # seed 1 gives [0.13, 0.17, 0.62, 0.89, 0.90]; some other seeds start from dead ReLUs at width 8
    assert dice[-1] > 0.6 and dice[-1] > dice[0] + 0.4, dice
    model, best = models.model_from_checkpoint(out / "fold_0" / "best_model.pth")
    assert best["best_score"] == pytest.approx(max(dice), abs=1e-6)
    scores = []
    for case in find_case_files(easy_isles, best["val_cases"], ("dwi",), "mask"):
        image, mask = load_case_volume(case)
        with torch.no_grad():
            prob = models.foreground_probability(model.eval(), torch.from_numpy(image)[None])[0, 0].numpy()
        scores.append(dice_score(prob >= 0.5, mask))
    assert best["best_score"] == pytest.approx(float(np.mean(scores)), abs=1e-4)


def test_brats_script_and_finetuning(data, tmp_path, capsys):
    common = ["--brats-dir", str(data / "brats"), "--patch-size", "32", "--width", "4", "--layers", "1", "--heads", "1"]
    common += ["--batch-size", "2", "--workers", "0", "--patches-per-volume", "2", "--epochs", "1"]
    assert train_brats_uctransnet3d.main(common + ["--output-dir", str(tmp_path / "pre"), "--epochs", "2"]) == 0
    fold = tmp_path / "pre" / "fold_0"
    assert all((fold / name).is_file() for name in OUTPUTS)
    best = models.load_checkpoint(fold / "best_model.pth")
    assert best["model_config"]["arch"] == "uctransnet3d" and best["model_config"]["norm"] == "group"

    assert train_brats_uctransnet3d.main(common + ["--output-dir", str(tmp_path / "ft"), "--pretrain-ckpt", str(fold / "best_model.pth")]) == 0
    init = models.load_checkpoint(tmp_path / "ft" / "fold_0" / "last.pth")["init"]
    assert init["label"] == "finetune" and init["scope"] == "all" and "copied" in init["transfer"]
    assert init["source_fold"] == 0 and "fold 0" in init["transfer"]  # the BraTS fold it fine-tunes from, recorded
    assert read_json(tmp_path / "ft" / "fold_0" / "run_args.json")["args"]["init"]["source_fold"] == 0

    # the norm is part of a checkpoint's identity: a BatchNorm model cannot start from it
    assert train_brats_uctransnet3d.main(common + ["--output-dir", str(tmp_path / "bad"), "--norm", "batch", "--pretrain-ckpt", str(fold / "best_model.pth")]) == 2
    assert "norm" in capsys.readouterr().out


def test_stroke_script_transfer_and_errors(data, tmp_path, capsys):
    pretrained = tmp_path / "brats_resnet18.pth"
    config = {"arch": "resnet18", "variant": "single", "width": 4, "norm": "batch"}
    torch.manual_seed(0)
    models.save_checkpoint(pretrained, models.build_model(config), config, config={"brats_dir": "/data/brats"})  # a BraTS run's config
    common = ["--dataset", "ATLAS", "--data-dir", str(data / "foundation"), "--arch", "resnet18", "--width", "4", "--patch-size", "32"]
    common += ["--batch-size", "2", "--workers", "0", "--patches-per-volume", "3", "--epochs", "2"]
    assert train_stroke.main(common + ["--output-dir", str(tmp_path / "atlas"), "--pretrain-ckpt", str(pretrained)]) == 0
    fold = tmp_path / "atlas" / "fold_0"
    assert all((fold / name).is_file() for name in OUTPUTS)
    last = models.load_checkpoint(fold / "last.pth")
    assert last["init"]["label"] == "transfer" and last["init"]["scope"] == "encoder"  # ResNet-18's default, the paper's
    assert last["init"]["source_fold"] is None  # the source checkpoint records no fold
    model = models.build_model(last["model_config"])
    encoder = sum(p.numel() for k, p in model.named_parameters() if k.startswith(model.encoder_prefixes))
    total = sum(p.numel() for p in model.parameters())
    assert last["init"]["parameters_transferred"] == encoder < total and last["init"]["parameters_total"] == total
    assert f"{encoder:,} of {total:,} parameters" in last["init"]["transfer"]
    assert read_json(fold / "run_args.json")["args"]["init"]["parameters_transferred"] == encoder
    assert last["data"]["mix"] == [0, 2, 1]  # 3 per volume: 2 from the stored lesion patches, 1 random
    capsys.readouterr()

    assert train_stroke.main(common + ["--output-dir", str(tmp_path / "gn"), "--norm", "group", "--pretrain-ckpt", str(pretrained)]) == 2
    assert "norm 'batch' differs from target norm 'group'" in capsys.readouterr().out
    assert train_stroke.main(common + ["--output-dir", str(tmp_path / "p64"), "--patch-size", "64"]) == 2
    assert "run extract_patches_96x96x96.py --patch_size 64" in capsys.readouterr().out


def test_transfer_from_another_brats_fold_is_refused_unless_allowed(data, tmp_path, capsys):
    pretrained = tmp_path / "brats_fold1.pth"
    config = {"arch": "resnet18", "variant": "single", "width": 4, "norm": "batch"}
    torch.manual_seed(0)
    models.save_checkpoint(pretrained, models.build_model(config), config, config={"brats_dir": "/data/brats", "fold": 1})  # BraTS fold 1
    common = ["--dataset", "ATLAS", "--data-dir", str(data / "foundation"), "--arch", "resnet18", "--width", "4", "--patch-size", "32"]
    common += ["--batch-size", "2", "--workers", "0", "--patches-per-volume", "1", "--epochs", "1", "--pretrain-ckpt", str(pretrained), "--fold", "0"]
    assert train_stroke.main(common + ["--output-dir", str(tmp_path / "refused")]) == 2
    out = capsys.readouterr().out
    assert f"{pretrained}: trained on fold 1 (its run config), this run is fold 0" in out and "--allow-fold-mismatch" in out
    assert not (tmp_path / "refused" / "fold_0" / "last.pth").exists()
    assert train_stroke.main(common + ["--output-dir", str(tmp_path / "allowed"), "--allow-fold-mismatch"]) == 0
    assert models.load_checkpoint(tmp_path / "allowed" / "fold_0" / "last.pth")["init"]["source_fold"] == 1  # recorded
    isles = ["--isles-dir", str(data / "isles"), "--output-dir", str(tmp_path / "isles"), "--init", "brats", "--pretrain-ckpt", str(pretrained)]
    assert train_isles_resnet18.parse_args(isles + ["--allow-fold-mismatch"]).allow_fold_mismatch
    assert not train_isles_resnet18.parse_args(isles).allow_fold_mismatch


def test_uctransnet_transfer_takes_the_whole_network_by_default(data, tmp_path, capsys):
    config = {"arch": "uctransnet3d", "in_channels": 1, "width": 4, "norm": "group", "patch_size": 32, "layers": 1, "heads": 1}
    pretrained = tmp_path / "brats_uct.pth"
    torch.manual_seed(0)
    models.save_checkpoint(pretrained, models.build_model(config), config, config={"brats_dir": "/data/brats"})
    common = ["--dataset", "ATLAS", "--data-dir", str(data / "foundation"), "--arch", "uctransnet3d", "--width", "4", "--patch-size", "32",
              "--layers", "1", "--heads", "1", "--batch-size", "2", "--workers", "0", "--patches-per-volume", "1", "--epochs", "1"]
    assert train_stroke.main(common + ["--output-dir", str(tmp_path / "uct"), "--pretrain-ckpt", str(pretrained)]) == 0
    init = models.load_checkpoint(tmp_path / "uct" / "fold_0" / "last.pth")["init"]
    total = sum(p.numel() for p in models.build_model(config).parameters())
    assert init["scope"] == "all" and init["parameters_transferred"] == init["parameters_total"] == total  # the paper's
    assert f"{total:,} of {total:,} parameters (100.0%)" in capsys.readouterr().out  # logged
    args = train_stroke.parse_args(common + ["--output-dir", "x", "--pretrain-ckpt", str(pretrained), "--transfer-scope", "encoder"])
    assert args.transfer_scope == "encoder"
    assert train_stroke.parse_args(common + ["--output-dir", "x"]).transfer_scope is None  # scratch
    with pytest.raises(SystemExit) as exc:
        train_stroke.parse_args(common + ["--output-dir", "x", "--transfer-scope", "all"])
    assert exc.value.code == 2 and "--transfer-scope all needs a pretrained checkpoint" in capsys.readouterr().err
    isles = ["--isles-dir", str(data / "isles"), "--output-dir", "x", "--init", "brats", "--pretrain-ckpt", str(pretrained)]
    assert train_isles_resnet18.parse_args(isles).transfer_scope == "encoder"
    assert train_isles_resnet18.parse_args(isles + ["--transfer-scope", "all"]).transfer_scope == "all"


def test_val_every_validates_every_nth_and_the_last_epoch_and_writes_tensorboard(data, tmp_path):
    """--val-every 2 over 3 epochs validates epochs 2 and 3 only (history: empty val_dice for
    epoch 1), selects best_model.pth among them, and --tensorboard logs the same numbers."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    argv = ["--isles-dir", str(data / "isles"), "--output-dir", str(tmp_path), *TINY_ISLES, "--epochs", "3", "--val-every", "2", "--tensorboard"]
    assert train_isles_resnet18.main(argv) == 0
    rows = _history(tmp_path / "fold_0")
    assert [r["val_dice"] == "" for r in rows] == [True, False, False]
    best = models.load_checkpoint(tmp_path / "fold_0" / "best_model.pth")
    validated = {int(r["epoch"]): float(r["val_dice"]) for r in rows if r["val_dice"]}
    assert best["epoch"] in validated and best["best_score"] == pytest.approx(max(validated.values()), abs=1e-6)
    events = EventAccumulator(str(tmp_path / "fold_0" / "tensorboard"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3] and [step for step, _ in scalars["lr"]] == [1, 2, 3]
    assert scalars["val/dice"] == [(e, pytest.approx(v, abs=1e-6)) for e, v in validated.items()]
    assert [v for _, v in scalars["train/loss"]] == [pytest.approx(float(r["train_loss"]), abs=1e-5) for r in rows]


def test_tensorboard_without_the_package_is_a_one_line_error(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    argv = ["--isles-dir", str(data / "isles"), "--output-dir", str(tmp_path), *TINY_ISLES, "--epochs", "1", "--tensorboard"]
    assert train_isles_resnet18.main(argv) == 2
    assert "ERROR: --tensorboard needs the optional package tensorboard (pip install tensorboard)" in capsys.readouterr().out
    assert not (tmp_path / "fold_0" / "last.pth").exists()


# --------------------------------------------------------------------------- loud failures


def test_brats_init_needs_an_existing_checkpoint(data, tmp_path, capsys):
    base = ["--isles-dir", str(data / "isles"), "--output-dir", str(tmp_path / "x"), *TINY_ISLES]
    with pytest.raises(SystemExit) as exc:
        train_isles_resnet18.main(base + ["--init", "brats"])
    assert exc.value.code == 2
    assert "--init brats requires --pretrain-ckpt" in capsys.readouterr().err
    assert train_isles_resnet18.main(base + ["--init", "brats", "--pretrain-ckpt", str(tmp_path / "missing.pth")]) == 2
    assert "checkpoint not found" in capsys.readouterr().out
    assert not (tmp_path / "x" / "fold_0" / "last.pth").exists()  # no silent fallback to scratch


def test_bad_split_files_fail_clearly(data, tmp_path, capsys):
    splits = read_json(data / "isles" / "isles2022_splits_5fold.json")
    parts = splits["fold_0"]["ISLES2022"]
    overlapping = json.loads(json.dumps(splits))
    overlapping["fold_0"]["ISLES2022"]["val"].append(parts["train"][0])
    write_json(tmp_path / "overlap.json", overlapping)
    base = ["--isles-dir", str(data / "isles"), "--output-dir", str(tmp_path / "x"), *TINY_ISLES]
    assert train_isles_resnet18.main(base + ["--splits-file", str(tmp_path / "overlap.json")]) == 2
    assert "in both train and val" in capsys.readouterr().out
    assert train_isles_resnet18.main(base + ["--fold", "7"]) == 2
    assert "no fold_7" in capsys.readouterr().out


def test_resume_and_overwrite_rules(data, tmp_path, capsys):
    base = ["--isles-dir", str(data / "isles"), "--output-dir", str(tmp_path / "r"), *TINY_ISLES, "--epochs", "1"]
    assert train_isles_resnet18.main(base + ["--resume"]) == 2
    assert "last.pth not found" in capsys.readouterr().out
    assert train_isles_resnet18.main(base) == 0
    assert train_isles_resnet18.main(base) == 2
    assert "already holds a run" in capsys.readouterr().out
    assert train_isles_resnet18.main(base + ["--resume", "--lr", "1e-3"]) == 2
    out = capsys.readouterr().out
    assert "configured differently" in out and "'lr'" in out
    assert train_isles_resnet18.main(base + ["--resume"]) == 0  # complete: nothing left to do
    assert train_isles_resnet18.main(base + ["--overwrite"]) == 0


def test_overwrite_keeps_the_finished_run_until_every_input_is_checked(data, tmp_path, capsys):
    """A mistyped --pretrain-ckpt with --overwrite fails naming the file and leaves the finished
    run as it was; a good --overwrite replaces every file of it."""
    base = ["--isles-dir", str(data / "isles"), "--output-dir", str(tmp_path / "r"), *TINY_ISLES, "--epochs", "1"]
    assert train_isles_resnet18.main(base) == 0
    fold = tmp_path / "r" / "fold_0"
    before = {name: (fold / name).read_bytes() for name in OUTPUTS}
    mistyped = tmp_path / "brats" / "fold_0" / "best_modle.pth"
    capsys.readouterr()
    assert train_isles_resnet18.main(base + ["--overwrite", "--init", "brats", "--pretrain-ckpt", str(mistyped)]) == 2
    assert f"ERROR: checkpoint not found: {mistyped}" in capsys.readouterr().out
    assert {name: (fold / name).read_bytes() for name in OUTPUTS} == before
    assert train_isles_resnet18.main(base + ["--overwrite", "--seed", "7"]) == 0
    assert all((fold / name).read_bytes() != before[name] for name in OUTPUTS)
    assert read_json(fold / "run_args.json")["args"]["seed"] == 7
    assert models.load_checkpoint(fold / "best_model.pth")["config"]["seed"] == 7


def test_second_training_into_a_fold_folder_fails_naming_the_holder(data, tmp_path, capsys):
    """Two runs into one fold folder (an array job without --fold): the second fails at once,
    naming the folder, host and pid of the first; a killed holder leaves no lock behind."""
    argv = ["--isles-dir", str(data / "isles"), "--output-dir", str(tmp_path), *TINY_ISLES]
    first = subprocess.Popen([sys.executable, "train_isles_resnet18.py", *argv, "--epochs", "100"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ONE_THREAD_ENV)
    lock = tmp_path / "fold_0" / LOCK_NAME
    try:
        deadline = time.monotonic() + 120
        while not (lock.is_file() and f"pid {first.pid}" in lock.read_text()):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0] if first.poll() is not None else "no lock"
            time.sleep(0.02)
        capsys.readouterr()
        assert train_isles_resnet18.main(argv + ["--epochs", "100", "--resume-if-exists"]) == 2
        holder = f"host {socket.gethostname()} pid {first.pid}"
        assert f"ERROR: {tmp_path / 'fold_0'} is in use by another training ({holder})" in capsys.readouterr().out
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.communicate()
    assert train_isles_resnet18.main(argv + ["--epochs", "1", "--overwrite"]) == 0


# --------------------------------------------------------------------------- resume and preemption


@pytest.fixture(scope="module")
def resume_args(data, tmp_path_factory):
    """A 3-epoch BraTS run of a tiny UCTransNet3D (dropout: uses the torch generator every step;
    12 steps per epoch; tumour-centred and random patches; full augmentation) and its
    uninterrupted result."""
    out = tmp_path_factory.mktemp("uninterrupted")
    args = ["--brats-dir", str(data / "brats"), "--patch-size", "32", "--width", "4", "--layers", "1", "--heads", "1"]
    args += ["--batch-size", "2", "--workers", "0", "--patches-per-volume", "6", "--epochs", "3", "--augment", "full"]
    assert train_brats_uctransnet3d.main(args + ["--output-dir", str(out)]) == 0
    return args, models.load_checkpoint(out / "fold_0" / "last.pth")


def _start(args: list[str], out: Path, workers: int) -> subprocess.Popen:
    command = [sys.executable, "train_brats_uctransnet3d.py", *args, "--output-dir", str(out), "--workers", str(workers)]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ONE_THREAD_ENV)


def _assert_same_run(resumed: dict, reference: dict) -> None:
    assert _same_weights(resumed["model"], reference["model"])
    strip = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # noqa: E731
    assert strip(resumed["history"]) == strip(reference["history"])
    assert resumed["best_score"] == reference["best_score"]


@pytest.mark.slow(35)
def test_sigkill_then_resume_equals_uninterrupted_run(resume_args, tmp_path):
    """Killed hard after epoch 1 (with 2 loader workers), resumed in-process without workers:
    the same weights, bit for bit, and the same history (CPU)."""
    args, reference = resume_args
    process = _start(args, tmp_path, workers=2)
    _wait_for(tmp_path / "fold_0" / "last.pth", process)
    process.kill()
    process.communicate()
    assert models.load_checkpoint(tmp_path / "fold_0" / "last.pth")["progress"]["epoch"] < 3
    assert train_brats_uctransnet3d.main(args + ["--output-dir", str(tmp_path), "--resume"]) == 0
    _assert_same_run(models.load_checkpoint(tmp_path / "fold_0" / "last.pth"), reference)


@pytest.mark.slow(25)
def test_sigterm_saves_mid_epoch_exits_75_and_resumes_exactly(resume_args, tmp_path):
    args, reference = resume_args
    process = _start(args, tmp_path, workers=0)
    _wait_for(tmp_path / "fold_0" / "last.pth", process)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == EXIT_PREEMPTED, output
    saved = models.load_checkpoint(tmp_path / "fold_0" / "last.pth")
    assert saved["progress"]["step"] >= 1 and saved["progress"]["epoch"] < 3  # mid-epoch state
    assert "SIGTERM: saved" in output
    assert train_brats_uctransnet3d.main(args + ["--output-dir", str(tmp_path), "--resume"]) == 0
    _assert_same_run(models.load_checkpoint(tmp_path / "fold_0" / "last.pth"), reference)


def _group_sigterm_when(argv: list[str], ready, log: Path) -> subprocess.CompletedProcess:
    """Run train_isles_resnet18.py in its own process group and send SIGTERM to the whole group
    (what SLURM's time limit and scancel do) as soon as ``ready()`` holds."""
    with open(log, "w") as sink:
        process = subprocess.Popen([sys.executable, "train_isles_resnet18.py", *argv], cwd=REPO, stdout=sink,
                                   stderr=subprocess.STDOUT, env=ONE_THREAD_ENV, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not ready():
            assert process.poll() is None and time.monotonic() < deadline, f"no signal point (status {process.poll()}): {log.read_text()}"
            time.sleep(0.005)
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return subprocess.CompletedProcess(argv, process.returncode, log.read_text())


def _logged_start(log: Path):
    return lambda: "training cases x" in log.read_text()  # noqa: E731


def _end_of_epoch_1(fold: Path):
    return lambda: (fold / "last.pth").exists() or any(fold.glob(".*.partial"))  # noqa: E731


def _into_epoch_2(fold: Path):
    return lambda: (fold / "curves.png").exists()  # noqa: E731


@pytest.mark.slow(16)
@pytest.mark.parametrize("point", [_logged_start, _end_of_epoch_1, _into_epoch_2], ids=lambda f: f.__name__.strip("_"))
def test_group_sigterm_with_workers_saves_exits_75_and_resumes(data, tmp_path, point):
    """SIGTERM to the process group with 2 DataLoader workers: the workers ignore it, the main
    process saves a resumable last.pth and exits 75, wherever the signal lands."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    argv = ["--isles-dir", str(data / "isles"), "--output-dir", str(out), *TINY_ISLES, "--epochs", "4", "--patches-per-volume", "2"]
    watched = log if point is _logged_start else out / "fold_0"
    result = _group_sigterm_when([*argv, "--workers", "2"], point(watched), log)
    assert result.returncode == EXIT_PREEMPTED, result.stdout
    assert "SIGTERM: saved" in result.stdout and "killed by signal" not in result.stdout
    assert models.load_checkpoint(out / "fold_0" / "last.pth")["progress"]["epoch"] < 4
    assert train_isles_resnet18.main(argv + ["--resume"]) == 0
    assert [int(r["epoch"]) for r in _history(out / "fold_0")] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "module, where, epoch, step",
    [(engine, "make_optimizer", 0, 0), (validation, "load_case_volume", 0, None), (engine, "plot_curves", 1, 1)],
    ids=["start", "validation", "plotting"],
)
def test_sigterm_during_start_validation_or_plotting_saves_and_resumes(data, tmp_path, monkeypatch, capsys, module, where, epoch, step):
    """The signal arrives while the run is set up, validates or draws curves.png: last.pth holds
    the state reached (validation: every step of epoch 1 done, None below; plotting: the step
    after it), exit 75, --resume completes."""
    original = getattr(module, where)
    sent = []

    def signalling(*args, **kwargs):
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, where, signalling)
    argv = ["--isles-dir", str(data / "isles"), "--output-dir", str(tmp_path), *TINY_ISLES, "--epochs", "2"]
    assert train_isles_resnet18.main(argv) == EXIT_PREEMPTED
    assert "SIGTERM: saved" in capsys.readouterr().out
    monkeypatch.undo()
    saved = models.load_checkpoint(tmp_path / "fold_0" / "last.pth")
    steps = saved["scheduler"]["total_steps"] // 2
    assert (saved["progress"]["epoch"], saved["progress"]["step"]) == (epoch, steps if step is None else step)
    assert train_isles_resnet18.main(argv + ["--resume"]) == 0
    assert [int(r["epoch"]) for r in _history(tmp_path / "fold_0")] == [1, 2]


@pytest.mark.slow(22)
def test_torchrun_two_ranks_agree(data, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train_isles_resnet18.py"]
    command += ["--isles-dir", str(data / "isles"), "--output-dir", str(tmp_path), *TINY_ISLES, "--strategy", "shared", "--epochs", "2"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=ONE_THREAD_ENV, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(l for l in result.stdout.splitlines() if "final weights identical on all 2 ranks" in l)
    digest = line.rsplit(" ", 1)[1].rstrip(")")
    model, checkpoint = models.model_from_checkpoint(tmp_path / "fold_0" / "last.pth")
    assert weights_digest(model) == digest  # rank 0 saved the weights and BatchNorm statistics every rank holds
    assert checkpoint["world_size"] == 2
    assert result.stdout.count("epoch 2/2") == 1  # only rank 0 logs


def test_requeue_wrapper_forwards_the_warning_and_requeues(tmp_path):
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'called'}\n")
    (stub / "scontrol").chmod(0o755)
    child = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(75)); print('ready', flush=True); time.sleep(60)"
    env = {**os.environ, "PATH": f"{stub}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    process = subprocess.Popen(["bash", str(REPO / "slurm" / "requeue.sh"), sys.executable, "-c", child], env=env, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGUSR1)
    process.communicate(timeout=30)
    assert process.returncode == 0
    assert (tmp_path / "called").read_text().strip() == "requeue 4242"


@pytest.mark.slow(18)
def test_third_network_pretrains_on_brats_and_transfers_to_stroke_and_isles_strategy(data, tmp_path):
    """resenc_unet through all three scripts: BraTS pretraining, the stroke transfer and scratch
    arms, and an ISLES strategy started from the BraTS encoder (one branch into both)."""
    tiny = ["--arch", "resenc_unet", "--width", "4", "--stages", "3", "--patch-size", "32", "--batch-size", "2", "--workers", "0", "--epochs", "1"]
    assert train_brats_uctransnet3d.main(["--brats-dir", str(data / "brats"), "--output-dir", str(tmp_path / "brats"), "--patches-per-volume", "1", *tiny]) == 0
    brats = tmp_path / "brats" / "fold_0" / "best_model.pth"
    assert models.load_checkpoint(brats)["model_config"]["arch"] == "resenc_unet"
    stroke = ["--dataset", "ATLAS", "--data-dir", str(data / "foundation"), "--patches-per-volume", "1", *tiny]
    assert train_stroke.main(stroke + ["--output-dir", str(tmp_path / "scratch")]) == 0
    assert train_stroke.main(stroke + ["--output-dir", str(tmp_path / "transfer"), "--pretrain-ckpt", str(brats)]) == 0
    init = models.load_checkpoint(tmp_path / "transfer" / "fold_0" / "last.pth")["init"]
    assert init["label"] == "transfer" and init["scope"] == "encoder" and 0 < init["parameters_transferred"] < init["parameters_total"]
    isles = ["--isles-dir", str(data / "isles"), "--output-dir", str(tmp_path / "isles"), "--strategy", "separate", "--init", "brats"]
    assert train_isles_resnet18.main(isles + ["--pretrain-ckpt", str(brats), "--patches-per-volume", "1", *tiny]) == 0
    model, last = models.model_from_checkpoint(tmp_path / "isles" / "fold_0" / "last.pth")
    assert last["model_config"]["variant"] == "separate" and "copied" in last["init"]["transfer"]
    assert last["data_contract"]["input_keys"] == ["dwi", "adc"] and len(model.encoders) == 2
    with torch.no_grad():
        assert models.foreground_probability(model.eval(), torch.zeros(1, 2, 32, 32, 32)).shape == (1, 1, 32, 32, 32)
    # it evaluates and predicts like the other networks (nothing there names an architecture)
    scores = tmp_path / "scores"
    assert evaluate.main(["--dataset", "ATLAS", "--data-dir", str(data / "foundation"), "--split", "val", "--run", f"resenc={tmp_path / 'transfer'}",
                          "--output-dir", str(scores)]) == 0
    assert any(scores.rglob("*.csv"))
    predicted = tmp_path / "predicted"
    assert predict.main(["--input", str(data / "isles_raw"), "--run", str(tmp_path / "isles"), "--output-dir", str(predicted)]) == 0
    assert any(predicted.rglob("*_desc-lesion_mask.nii.gz"))
