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

from strokeseg.core.io import load_npz
from strokeseg.core.runner import add_run_arguments, check_settings, finish, get_logger, guard_stage, prepare_output_dir, run_cases, write_run_args
from strokeseg.datasets.brats import BRATS2024, BRATS_KEYS, discover_brats_cases, preprocess_brats_case
from strokeseg.datasets.splits import add_rebuild_splits_argument, cases_to_rebuild, write_stage_splits


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--brats-dir", type=Path, required=True, help="BraTS 2024 training data folder holding BraTS-GLI-PPPPP-VVV/ case folders")
    parser.add_argument("--output-dir", type=Path, required=True, help="folder for <case>.npz, the splits JSON, summary and run_args.json")
    parser.add_argument("--target-shape", type=int, nargs=3, default=(197, 233, 189), metavar=("X", "Y", "Z"), help="resampled shape in voxels (default 197 233 189, the paper's: the ATLAS MNI grid)")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="share of patients held out as the fixed test set (default 0.1; the paper does not state it)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the splits (default 42)")
    add_run_arguments(parser)
    add_rebuild_splits_argument(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """Preprocess every visit (unless ``--rebuild-splits``), then write or keep the splits; the exit status."""
    settings = {
        "brats_dir": str(args.brats_dir.resolve()), "target_shape": list(args.target_shape),
        "test_fraction": args.test_fraction, "seed": args.seed,
    }
    if args.rebuild_splits:
        case_ids, status, voxels = cases_to_rebuild(args.output_dir, settings), 0, {}
    else:
        cases = {case.case_id: case for case in discover_brats_cases(args.brats_dir)}
        prepare_output_dir(args.output_dir)
        check_settings(args.output_dir, settings, args.overwrite)
        write_run_args(args.output_dir, args)
        n_patients = len({c.meta["patient_id"] for c in cases.values()})
        get_logger().info(f"{len(cases)} BraTS visits of {n_patients} patients under {args.brats_dir}; target shape {tuple(args.target_shape)}")
        process = functools.partial(
            preprocess_brats_case, output_dir=args.output_dir, target_shape=tuple(args.target_shape), overwrite=args.overwrite
        )
        report = run_cases(cases, process, workers=args.workers, desc="BraTS")
        status = finish(args.output_dir / "preprocessing_summary.json", report, {"dataset": BRATS2024.name, "keys": list(BRATS_KEYS)})
        case_ids, voxels = report.with_output(), {r.case_id: r.info["lesion_voxels"] for r in report.results if "lesion_voxels" in r.info}

    # Tumour volume on the common output grid orders the cases for stratification.
    def volume(case_id: str) -> float:
        if case_id in voxels:
            return voxels[case_id]
        return load_npz(args.output_dir / f"{case_id}.npz", keys=("mask",))["mask"].sum()

    groups = {case_id: BRATS2024.split_group(case_id) for case_id in case_ids}
    splits_path = args.output_dir / BRATS2024.splits_name
    overwrite = args.overwrite or args.rebuild_splits
    return max(status, write_stage_splits(splits_path, case_ids, volume, BRATS2024.name, args.test_fraction, args.seed, overwrite, groups))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return guard_stage(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
