#!/usr/bin/env python
"""Train the ResNet-18 U-Net or UCTransNet3D on ATLAS v2.0 or UOA T1w (MNI, 1 mm), one fold.

Training samples mix the lesion-focused patches of extract_patches_96x96x96.py (folder
``<data-dir>/<DATASET>_patches_<P>``, P = the patch size) with random patches from anywhere in
the brain (``--random-patch-fraction``), so the network also sees lesion-free tissue.
Validation runs on whole volumes (sliding window, window = patch size), never on patches.
``--pretrain-ckpt`` starts from a BraTS checkpoint (transfer arm): by default, as in the paper's
code, the ResNet-18 encoder or the whole UCTransNet3D (``--transfer-scope encoder|all``); without
it the network trains from scratch.

    python train_stroke.py --dataset ATLAS --data-dir /data/preprocessed_stroke_foundation \\
        --arch uctransnet3d --pretrain-ckpt runs/brats_uctransnet3d/fold_0/best_model.pth \\
        --output-dir runs/atlas_uctransnet3d_transfer --fold 0

Patch size: the dataset's (a config.json entry's ``patch_size``), else 96 for resnet18, 64 for
uctransnet3d (override with --patch-size; the patch folder of that size must exist). A T1w cohort
listed in config.json (the repository's, or the one named by ``STROKESEG_CONFIG``) is a
``--dataset`` by its entry alone. Writes <output-dir>/fold_<k>/{best_model.pth,last.pth,history.csv,
curves.png,run_args.json}; exit status 75 after a preemption save (rerun with --resume).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from strokeseg.datasets.contract import build_data_contract
from strokeseg.core.io import CaseError
from strokeseg.core.runner import get_logger
from strokeseg.datasets.brats import BRATS2024
from strokeseg.datasets.registry import dataset_names, dataset_spec
from strokeseg.datasets.splits import load_split
from strokeseg.training.arguments import (
    add_fold_mismatch_argument, add_model_arguments, add_training_arguments, add_transfer_scope_argument, model_config_from_args, parse_training_arguments, resolve_transfer_scope,
)
from strokeseg.training.augment import augment_preset
from strokeseg.training.data import SampleMix, TrainingSet, find_case_files
from strokeseg.training.patch_stage import patch_dir_name
from strokeseg.training.engine import fit, run_guarded
from strokeseg.training.settings import InitSpec, TrainSettings

DEFAULTS = {"epochs": 100, "batch_size": 4, "lr": 1e-4, "augment": "flip"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    brain_masked = [name for name in dataset_names() if dataset_spec(name).brain_key is not None]
    parser.add_argument("--dataset", choices=brain_masked, required=True, help="a registered dataset with brain masks (the foundation stage's): its folder name under --data-dir")
    parser.add_argument("--data-dir", type=Path, required=True, help="preprocess_stroke_foundation.py output root holding <DATASET>/ and <DATASET>_patches_<P>/")
    parser.add_argument("--splits-file", type=Path, default=None, help="splits JSON (default <data-dir>/<DATASET>/<DATASET>_splits_5fold.json)")
    parser.add_argument("--patch-dir", type=Path, default=None, help="pre-extracted patches (default <data-dir>/<DATASET>_patches_<P>)")
    parser.add_argument("--patches-per-volume", type=int, default=10, help="samples per volume per epoch (default 10)")
    parser.add_argument("--random-patch-fraction", type=float, default=0.3, help="share of samples cut at random brain positions, the rest from the stored lesion patches (default 0.3)")
    parser.add_argument("--pretrain-ckpt", type=Path, default=None, help="BraTS checkpoint to start from (transfer; what is copied: --transfer-scope); a missing or mismatched file is an error")
    add_transfer_scope_argument(parser)
    add_fold_mismatch_argument(parser)
    add_model_arguments(parser, "resnet18")
    add_training_arguments(parser, DEFAULTS)
    chosen = dataset_spec(parser.parse_known_args(argv)[0].dataset)
    if chosen.patch_size is not None:  # the dataset's default patch (a config.json entry's patch_size) before the architecture's
        parser.set_defaults(patch_size=chosen.patch_size)
    args = parse_training_arguments(parser, argv)
    try:
        args.transfer_scope = resolve_transfer_scope(args.arch, args.transfer_scope, args.pretrain_ckpt is not None)
    except ValueError as err:
        parser.error(str(err))
    if args.splits_file is None:
        args.splits_file = args.data_dir / args.dataset / dataset_spec(args.dataset).splits_name
    if args.patch_dir is None:
        args.patch_dir = args.data_dir / patch_dir_name(args.dataset, args.patch_size)
    return args


def run(args: argparse.Namespace) -> int:
    if not args.patch_dir.is_dir():
        raise CaseError(f"{args.patch_dir}: patch folder not found; run extract_patches_96x96x96.py --patch_size {args.patch_size} first")
    spec = dataset_spec(args.dataset)
    split = load_split(args.splits_file, args.fold, spec.name)
    volume_dir = args.data_dir / spec.name
    keys = (spec.input_keys, spec.mask_key, spec.brain_key)
    train_cases = find_case_files(volume_dir, split.train, *keys, patch_dir=args.patch_dir)
    val_cases = find_case_files(volume_dir, split.val, *keys)
    init = InitSpec("transfer", args.pretrain_ckpt, args.transfer_scope, BRATS2024.name, tuple(split.test), args.fold, args.allow_fold_mismatch) if args.pretrain_ckpt else InitSpec()
    get_logger().info(f"{args.dataset} fold {args.fold}: {len(train_cases)} train / {len(val_cases)} val volumes, {args.arch}, {args.patch_size}^3 patches, init {init.label}")
    mix = SampleMix.from_fraction(args.patches_per_volume, 1.0 - args.random_patch_fraction, "stored")
    train_set = TrainingSet(train_cases, args.patch_size, mix, augment_preset(args.augment), args.seed, args.chunk_cases)
    model_config = model_config_from_args(args.arch, vars(args), len(spec.input_keys))
    contract = build_data_contract(spec.name, volume_dir, spec.input_keys, args.patch_size, args.fold, split.train, split.val)
    return fit(TrainSettings.from_args(vars(args)), model_config, train_set, val_cases, vars(args), init, contract)


def main(argv: list[str] | None = None) -> int:
    return run_guarded(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
