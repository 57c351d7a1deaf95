#!/usr/bin/env python
"""ISLES 2022 training preprocessing: crop to the DWI brain, resample, z-score DWI and ADC.

Writes ``<case>.npz`` (``dwi``, ``adc`` float32, ``mask`` uint8, all ``--target-shape``;
``lesion_ml`` the native lesion volume in ml) and
``isles2022_splits_5fold.json`` (fixed 20 % test set + 5 CV folds, stratified by lesion volume in ml).

    python preprocess_v2_isles.py --isles-dir /data/ISLES2022/derivatives \\
        --output-dir /data/preprocessed_isles_train --target-shape 96 96 96
"""
from __future__ import annotations

import argparse
import sys

from strokeseg.isles import add_isles_arguments, lesion_volumes_ml, preprocess_isles
from strokeseg.runner import get_logger
from strokeseg.splits import write_splits_once


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_isles_arguments(parser)
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of cases held out as the fixed test set (default 0.2: 50 of 250)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the splits (default 42)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report, status = preprocess_isles(args, with_bbox=False)
    written = [r.case_id for r in report.results if r.status in ("done", "skipped")]
    if not written:
        return 1
    try:
        write_splits_once(
            args.output_dir / "isles2022_splits_5fold.json",
            lesion_volumes_ml(args.output_dir, written),  # native ml, not voxels of the resampled grid
            dataset="ISLES2022",
            test_fraction=args.test_fraction,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except ValueError as err:  # includes CaseError
        get_logger().info(f"ERROR cannot write splits: {err}")
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
