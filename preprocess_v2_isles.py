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

from strokeseg.core.stage import run_stages
from strokeseg.datasets.isles import IslesSettings, add_isles_arguments
from strokeseg.datasets.stages import isles_stage


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_isles_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = IslesSettings(tuple(args.target_shape), args.margin, with_bbox=False, test_fraction=args.test_fraction, seed=args.seed)
    stage = lambda: isles_stage(args.isles_dir, args.output_dir, settings)  # noqa: E731
    return run_stages([stage], vars(args), args.workers, args.overwrite, args.rebuild_splits)


if __name__ == "__main__":
    sys.exit(main())
