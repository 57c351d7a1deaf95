#!/usr/bin/env python
"""Full-volume preprocessing of MNI-space T1w stroke data (ATLAS v2.0, UOA), driven by config.json.

Per dataset, in ``<output_base_dir>/<name>/``: ``<case>.npz`` (``image`` float32 z-scored inside
the brain, ``lesion_mask`` and ``brain_mask`` uint8), ``<case>_metadata.json`` (paths, shape,
spacing, affine, lesion volume, settings), ``<name>_summary.json`` and ``<name>_splits_5fold.json``
(a fixed held-out test set, 15 % by default, plus 5 disjoint CV folds, stratified by lesion volume).

    python preprocess_stroke_foundation.py --config config.json \\
        --data-dir ATLAS=/data/ATLAS_2 --data-dir UOA_Private=/data/UOA --output-base-dir /data/foundation
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

from strokeseg.core.io import CaseError
from strokeseg.core.runner import add_run_arguments, get_logger
from strokeseg.core.stage import run_stages
from strokeseg.datasets.foundation import load_config
from strokeseg.datasets.splits import add_rebuild_splits_argument
from strokeseg.datasets.stages import foundation_stage


def _name_path(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="config.json in the paper's schema (output_base_dir, preprocessing, datasets)")
    parser.add_argument("--output-base-dir", type=Path, default=None, help="replaces the config's output_base_dir")
    parser.add_argument("--data-dir", type=_name_path, action="append", default=[], metavar="NAME=PATH", help="replaces data_dir of dataset NAME (repeatable)")
    parser.add_argument("--datasets", nargs="+", default=None, metavar="NAME", help="process only these datasets of the config (default: all)")
    parser.add_argument("--test-fraction", type=float, default=0.15, help="share of cases held out as the fixed test set (default 0.15)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the splits (default 42)")
    add_run_arguments(parser)
    add_rebuild_splits_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = get_logger()
    try:
        config = load_config(args.config, args.output_base_dir, dict(args.data_dir))
    except (ValueError, CaseError) as err:
        log.info(f"ERROR {err}")
        return 1
    names = [d.name for d in config.datasets]
    unknown = sorted(set(args.datasets or []) - set(names))
    if unknown:
        log.info(f"ERROR --datasets {unknown} are not in {args.config} ({names})")
        return 1
    if config.preprocessing.use_gpu and not torch.cuda.is_available():
        log.info("use_gpu requested but CUDA unavailable; running on CPU")
    chosen = [d for d in config.datasets if args.datasets is None or d.name in args.datasets]
    stages = [functools.partial(foundation_stage, dataset, config, args.test_fraction, args.seed) for dataset in chosen]
    run_args = {**vars(args), "resolved_config": config.as_dict()}
    return run_stages(stages, run_args, args.workers, args.overwrite, args.rebuild_splits)


if __name__ == "__main__":
    sys.exit(main())
