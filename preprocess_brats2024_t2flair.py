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
import sys
from pathlib import Path

from strokeseg.core.runner import add_run_arguments
from strokeseg.core.stage import run_stages
from strokeseg.datasets.splits import add_rebuild_splits_argument
from strokeseg.datasets.stages import brats_stage


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stage = lambda: brats_stage(args.brats_dir, args.output_dir, tuple(args.target_shape), args.test_fraction, args.seed)  # noqa: E731
    return run_stages([stage], vars(args), args.workers, args.overwrite, args.rebuild_splits)


if __name__ == "__main__":
    sys.exit(main())
