#!/usr/bin/env python
"""ISLES 2022 evaluation preprocessing: as ``preprocess_v2_isles.py`` plus native-space metadata.

Each ``<case>.npz`` also holds ``bbox`` (3, 2) [start, stop) voxels, ``original_shape``,
``cropped_shape``, ``original_affine`` (4, 4), ``original_mask`` (native grid, uint8) and
``spacing`` (mm), so ``evaluate.py`` maps predictions back to the native grid from the .npz alone.
It writes the same ``isles2022_splits_5fold.json`` as ``preprocess_v2_isles.py`` (same cases,
``--test-fraction`` and ``--seed``: the splits are stratified by the native lesion volume), so
``evaluate.py`` finds it beside the data; an existing file is kept.

    python preprocess_isles_WITH_BBOX.py --isles-dir /data/ISLES2022/derivatives \\
        --output-dir /data/preprocessed_isles_eval --target-shape 96 96 96
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
    settings = IslesSettings(tuple(args.target_shape), args.margin, with_bbox=True, test_fraction=args.test_fraction, seed=args.seed)
    stage = lambda: isles_stage(args.isles_dir, args.output_dir, settings)  # noqa: E731
    return run_stages([stage], vars(args), args.workers, args.overwrite, args.rebuild_splits)


if __name__ == "__main__":
    sys.exit(main())
