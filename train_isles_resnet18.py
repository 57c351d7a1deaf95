#!/usr/bin/env python
"""Train the ResNet-18 U-Net (or another encoder-decoder, ``--arch``) on preprocessed ISLES 2022
DWI (+ ADC), one fold.

Strategies (models.strategies, over any network whose config has a ``variant``): ``separate``
(one network per modality, summed loss, DWI head at inference), ``shared`` (one encoder on the
stacked modalities, one decoder per modality, heads averaged at inference), ``dwi_only`` (one
network on one modality). ``--modalities`` picks the inputs: dwi_only (the DWI alone), dwi_adc
(DWI and ADC), all (every input of the dataset) or a comma-separated list of input keys; default
the strategy's (the first input, the DWI, for dwi_only; every input of the dataset
otherwise: DWI and ADC for ISLES 2022). ``--init brats`` copies the encoder of
a BraTS checkpoint of the same network (train_brats_uctransnet3d.py --arch resnet18;
``--transfer-scope all``: every tensor) and requires ``--pretrain-ckpt``; both init arms
use the same hyper-parameters (the flag changes nothing else). The volumes are already 96³: a
sample is the whole augmented volume, or a patch when ``--patch-size`` is smaller.

    python train_isles_resnet18.py --isles-dir /data/preprocessed_isles_train \\
        --output-dir runs/isles_shared_brats --strategy shared --init brats \\
        --pretrain-ckpt runs/brats_resnet18/fold_0/best_model.pth --fold 0

    # the third network, both modalities, one network per modality:
    python train_isles_resnet18.py --arch resenc_unet --strategy separate --modalities dwi_adc ...

    # ISLES 2024 (preprocess_v2_isles.py --dataset ISLES2024): NCCT and the four perfusion maps
    python train_isles_resnet18.py --dataset ISLES2024 --isles-dir /data/isles24_train \
        --output-dir runs/isles24_shared --strategy shared --modalities all --fold 0

Writes <output-dir>/fold_<k>/{best_model.pth,last.pth,history.csv,curves.png,run_args.json};
exit status 75 after a preemption save (rerun with --resume).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

import models

from strokeseg.datasets.contract import build_data_contract
from strokeseg.core.runner import get_logger
from strokeseg.datasets.brats import BRATS2024
from strokeseg.datasets.isles import isles_datasets
from strokeseg.datasets.registry import dataset_spec
from strokeseg.datasets.splits import load_split
from strokeseg.training.arguments import (
    add_fold_mismatch_argument, add_model_arguments, add_training_arguments, add_transfer_scope_argument, model_config_from_args, parse_training_arguments, resolve_transfer_scope,
)
from strokeseg.training.augment import augment_preset
from strokeseg.training.data import SampleMix, TrainingSet, find_case_files
from strokeseg.training.engine import fit, run_guarded
from strokeseg.training.settings import InitSpec, TrainSettings

DEFAULTS = {"epochs": 100, "batch_size": 4, "lr": 1e-4, "augment": "full"}
DATASET = "ISLES2022"
MODALITIES = {"dwi_only": 1, "dwi_adc": 2}  # --modalities name -> leading input keys; also 'all' or KEY,KEY,...


def strategy_archs() -> tuple[str, ...]:
    """Registered architectures that offer the ISLES strategies (their config has a ``variant``)."""
    return tuple(name for name in models.arch_names() if "variant" in {f.name for f in fields(models.arch_spec(name).config_cls)})


def select_modalities(choice: str | None, strategy: str, input_keys: tuple[str, ...]) -> tuple[str, ...]:
    """The input keys read for ``--modalities choice`` (None: the strategy's default) from the
    dataset's ``input_keys``; ValueError for an unknown key or a count the strategy cannot take
    (dwi_only: one modality; separate, shared: two or more)."""
    if choice is None:
        keys = input_keys[:1] if strategy == "dwi_only" else input_keys
    elif choice in MODALITIES:
        keys = input_keys[: MODALITIES[choice]]
    else:
        keys = input_keys if choice == "all" else tuple(key.strip() for key in choice.split(","))
    unknown = [key for key in keys if key not in input_keys]
    if unknown or len(set(keys)) != len(keys):
        raise ValueError(f"--modalities {choice}: give {', '.join(MODALITIES)}, all or distinct input keys of {list(input_keys)}")
    if (strategy == "dwi_only") != (len(keys) == 1):
        raise ValueError(f"--strategy {strategy} cannot read {len(keys)} modalities {list(keys)} (dwi_only: one; separate, shared: two or more)")
    return keys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=isles_datasets(), default=DATASET, help=f"the ISLES release preprocessed in --isles-dir (default {DATASET}; ISLES2024: NCCT, CBF, CBV, MTT, Tmax)")
    parser.add_argument("--isles-dir", "--data-dir", dest="isles_dir", type=Path, required=True, help="preprocess_v2_isles.py output: <case>.npz with the dataset's inputs (ISLES 2022: dwi, adc) and mask")
    parser.add_argument("--splits-file", type=Path, default=None, help="splits JSON (default <isles-dir>/isles2022_splits_5fold.json, ISLES2024: isles2024_splits_5fold.json)")
    parser.add_argument("--strategy", choices=models.ISLES_STRATEGIES, default="shared", help="separate | shared | dwi_only (default shared)")
    parser.add_argument("--modalities", default=None, help="inputs: dwi_only, dwi_adc, all or KEY,KEY,... (default: the first input, the DWI, for --strategy dwi_only; every input of the dataset otherwise: DWI and ADC for ISLES 2022)")
    parser.add_argument("--init", choices=("scratch", "brats"), default="scratch", help="scratch, or brats: the network's encoder from --pretrain-ckpt (default scratch)")
    parser.add_argument("--pretrain-ckpt", type=Path, default=None, help="BraTS checkpoint for --init brats (required there; a missing file is an error)")
    add_transfer_scope_argument(parser)
    add_fold_mismatch_argument(parser)
    parser.add_argument("--patches-per-volume", type=int, default=1, help="samples per volume per epoch (default 1)")
    parser.add_argument("--lesion-patch-fraction", type=float, default=0.67, help="share of lesion-centred samples when --patch-size < volume (default 0.67; rest random)")
    add_model_arguments(parser, "resnet18", strategy_archs())
    add_training_arguments(parser, DEFAULTS)
    args = parse_training_arguments(parser, argv)
    if args.init == "brats" and args.pretrain_ckpt is None:
        parser.error("--init brats requires --pretrain-ckpt (there is no silent fallback to scratch)")
    if args.init == "scratch" and args.pretrain_ckpt is not None:
        parser.error("--pretrain-ckpt given with --init scratch; use --init brats to load it")
    try:
        args.transfer_scope = resolve_transfer_scope(args.arch, args.transfer_scope, args.pretrain_ckpt is not None)
    except ValueError as err:
        parser.error(str(err))
    try:
        select_modalities(args.modalities, args.strategy, dataset_spec(args.dataset).input_keys)
    except ValueError as err:
        parser.error(str(err))
    if args.splits_file is None:
        args.splits_file = args.isles_dir / dataset_spec(args.dataset).splits_name
    return args


def run(args: argparse.Namespace) -> int:
    spec = dataset_spec(args.dataset)
    split = load_split(args.splits_file, args.fold, spec.name)
    keys = select_modalities(args.modalities, args.strategy, spec.input_keys)
    train_cases = find_case_files(args.isles_dir, split.train, keys, spec.mask_key)
    val_cases = find_case_files(args.isles_dir, split.val, keys, spec.mask_key)
    get_logger().info(f"{spec.display_name} fold {args.fold}: {len(train_cases)} train / {len(val_cases)} val cases, {args.arch} {args.strategy} on {', '.join(keys)}, init {args.init}")
    mix = SampleMix.from_fraction(args.patches_per_volume, args.lesion_patch_fraction, "lesion")
    train_set = TrainingSet(train_cases, args.patch_size, mix, augment_preset(args.augment), args.seed, args.chunk_cases)
    model_config = model_config_from_args(args.arch, vars(args), len(keys), {"variant": args.strategy})
    init = InitSpec(args.init, args.pretrain_ckpt, args.transfer_scope, BRATS2024.name, tuple(split.test), args.fold, args.allow_fold_mismatch) if args.pretrain_ckpt else InitSpec(args.init)
    contract = build_data_contract(spec.name, args.isles_dir, keys, args.patch_size, args.fold, split.train, split.val)
    return fit(TrainSettings.from_args(vars(args)), model_config, train_set, val_cases, vars(args), init, contract)


def main(argv: list[str] | None = None) -> int:
    return run_guarded(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
