#!/usr/bin/env python
"""Pretrain UCTransNet3D (or the ResNet-18 U-Net) on BraTS 2024 T2-FLAIR tumour masks, one fold.

Patches are cut inside the training loop from the full-volume .npz files of
preprocess_brats2024_t2flair.py: per volume and epoch ``--patches-per-volume`` patches,
``--lesion-patch-fraction`` of them centred on the tumour and the rest anywhere in the volume.
Validation runs on whole volumes (sliding window, window = patch size). ``--pretrain-ckpt``
fine-tunes from a checkpoint (all weights; arch, norm and patch size must match).

    python train_brats_uctransnet3d.py --brats-dir /data/preprocessed_brats2024_t2flair \\
        --splits-file /data/preprocessed_brats2024_t2flair/brats2024_t2flair_splits_5fold.json \\
        --output-dir runs/brats_uctransnet3d --patch-size 64 --batch-size 8 \\
        --patches-per-volume 4 --fold 0 --epochs 100

    # ResNet-18 encoder for the ISLES / ATLAS / UOA transfer experiments:
    python train_brats_uctransnet3d.py --arch resnet18 --brats-dir ... --output-dir runs/brats_resnet18

Writes <output-dir>/fold_<k>/{best_model.pth,last.pth,history.csv,curves.png,run_args.json};
exit status 75 after a preemption save (rerun with --resume).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from strokeseg.datasets.contract import build_data_contract
from strokeseg.core.runner import get_logger
from strokeseg.datasets.registry import dataset_spec
from strokeseg.datasets.splits import load_split
from strokeseg.training.arguments import add_model_arguments, add_training_arguments, model_config_from_args, parse_training_arguments
from strokeseg.training.augment import augment_preset
from strokeseg.training.data import SampleMix, TrainingSet, find_case_files
from strokeseg.training.engine import fit, run_guarded
from strokeseg.training.settings import InitSpec, TrainSettings

DEFAULTS = {"epochs": 100, "batch_size": 4, "lr": 1e-4, "augment": "flip"}
DATASET = "BraTS2024"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--brats-dir", type=Path, required=True, help="preprocess_brats2024_t2flair.py output: <case>.npz with image, mask")
    parser.add_argument("--splits-file", type=Path, default=None, help="splits JSON (default <brats-dir>/brats2024_t2flair_splits_5fold.json)")
    parser.add_argument("--patches-per-volume", type=int, default=10, help="patches per volume per epoch (default 10)")
    parser.add_argument("--lesion-patch-fraction", type=float, default=0.67, help="share of tumour-centred patches (default 0.67; rest random)")
    parser.add_argument("--pretrain-ckpt", type=Path, default=None, help="checkpoint to fine-tune from (all weights; a missing or mismatched file is an error)")
    add_model_arguments(parser, "uctransnet3d")
    add_training_arguments(parser, DEFAULTS)
    args = parse_training_arguments(parser, argv)
    if args.splits_file is None:
        args.splits_file = args.brats_dir / dataset_spec(DATASET).splits_name
    return args


def run(args: argparse.Namespace) -> int:
    spec = dataset_spec(DATASET)
    split = load_split(args.splits_file, args.fold, spec.name)
    train_cases = find_case_files(args.brats_dir, split.train, spec.input_keys, spec.mask_key)
    val_cases = find_case_files(args.brats_dir, split.val, spec.input_keys, spec.mask_key)
    get_logger().info(f"BraTS 2024 fold {args.fold}: {len(train_cases)} train / {len(val_cases)} val volumes, {args.arch}, {args.patch_size}^3 patches")
    mix = SampleMix.from_fraction(args.patches_per_volume, args.lesion_patch_fraction, "lesion")
    train_set = TrainingSet(train_cases, args.patch_size, mix, augment_preset(args.augment), args.seed, args.chunk_cases)
    model_config = model_config_from_args(args.arch, vars(args), len(spec.input_keys))
    init = InitSpec("finetune", args.pretrain_ckpt, "all", None, tuple(split.test)) if args.pretrain_ckpt else InitSpec()
    contract = build_data_contract(spec.name, args.brats_dir, spec.input_keys, args.patch_size, args.fold, split.train, split.val)
    return fit(TrainSettings.from_args(vars(args)), model_config, train_set, val_cases, vars(args), init, contract)


def main(argv: list[str] | None = None) -> int:
    return run_guarded(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
