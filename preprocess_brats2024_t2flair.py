#!/usr/bin/env python
"""BraTS 2024 (GLI) preprocessing for pretraining: T2-FLAIR and a merged binary tumour mask.

Per case ``<case>.npz``: ``image`` float32 (T2-FLAIR resampled trilinearly to ``--target-shape``,
z-scored over its non-zero voxels) and ``mask`` uint8 {0,1} (seg labels 1-4 merged, resampled
with nearest neighbour). Also writes, into ``--output-dir``, ``brats2024_t2flair_splits_5fold.json``:
a fixed held-out test set plus 5 disjoint CV folds, stratified by tumour volume and grouped by
the 5-digit patient id (visits -100/-101 of one patient stay on one side), dataset key "BraTS2024".

    python preprocess_brats2024_t2flair.py --brats-dir /path/to/BraTS2024/training_data \\
        --output-dir /path/to/preprocessed_brats2024_t2flair
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from strokeseg.brats import BRATS2024, BRATS_KEYS, discover_brats_cases, preprocess_brats_case
from strokeseg.io import CaseError, load_npz
from strokeseg.runner import CaseResult, add_run_arguments, finish, get_logger, run_cases, write_run_args
from strokeseg.splits import write_stage_splits


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--brats-dir", type=Path, required=True, help="BraTS 2024 training data folder holding BraTS-GLI-PPPPP-VVV/ case folders")
    parser.add_argument("--output-dir", type=Path, required=True, help="folder for <case>.npz, the splits JSON, summary and run_args.json")
    parser.add_argument("--target-shape", type=int, nargs=3, default=(197, 233, 189), metavar=("X", "Y", "Z"), help="resampled shape in voxels (default 197 233 189, the paper's: the ATLAS MNI grid)")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="share of patients held out as the fixed test set (default 0.1; the paper does not state it)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the splits (default 42)")
    add_run_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = get_logger()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_run_args(args.output_dir, args)
    try:
        cases = {case.case_id: case for case in discover_brats_cases(args.brats_dir)}
    except CaseError as err:
        log.info(f"ERROR {err}")
        return 1
    n_patients = len({c.patient_id for c in cases.values()})
    log.info(f"{len(cases)} BraTS visits of {n_patients} patients under {args.brats_dir}; target shape {tuple(args.target_shape)}")
    process = functools.partial(
        preprocess_brats_case, output_dir=args.output_dir, target_shape=tuple(args.target_shape), overwrite=args.overwrite
    )
    report = run_cases(cases, process, workers=args.workers, desc="BraTS")
    status = finish(args.output_dir / "preprocessing_summary.json", report, {"dataset": BRATS2024.name, "keys": list(BRATS_KEYS)})

    # Tumour volume on the common output grid orders the cases for stratification.
    def volume(result: CaseResult) -> float:
        if "lesion_voxels" in result.info:
            return result.info["lesion_voxels"]
        return load_npz(args.output_dir / f"{result.case_id}.npz", keys=("mask",))["mask"].sum()

    groups = {case_id: case.patient_id for case_id, case in cases.items()}
    splits = write_stage_splits(args.output_dir / BRATS2024.splits_name, report, volume, BRATS2024.name, args.test_fraction, args.seed, args.overwrite, groups)
    return max(status, splits)


if __name__ == "__main__":
    sys.exit(main())
