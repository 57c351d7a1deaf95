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

from strokeseg.core.io import CaseError, read_json
from strokeseg.core.runner import add_run_arguments, check_settings, finish, get_logger, guard_stage, prepare_output_dir, run_cases, write_run_args
from strokeseg.datasets.foundation import (
    FOUNDATION_KEYS,
    DatasetConfig,
    FoundationConfig,
    discover_foundation_cases,
    foundation_splits_name,
    load_config,
    preprocess_foundation_case,
)
from strokeseg.datasets.fingerprint import write_dataset_fingerprint
from strokeseg.datasets.splits import add_rebuild_splits_argument, cases_to_rebuild, write_stage_splits


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


def dataset_settings(dataset: DatasetConfig, config: FoundationConfig, args: argparse.Namespace) -> dict:
    """The settings that shape ``<output_base_dir>/<name>/`` (``use_gpu`` only picks the device)."""
    preprocessing = {k: v for k, v in config.as_dict()["preprocessing"].items() if k != "use_gpu"}
    return {
        "dataset": dataset.name, "data_dir": str(dataset.data_dir.resolve()), "image_pattern": dataset.image_pattern,
        "mask_pattern": dataset.mask_pattern, "id_markers": list(dataset.id_markers), "preprocessing": preprocessing,
        "test_fraction": args.test_fraction, "seed": args.seed,
    }


def run_dataset(dataset: DatasetConfig, config: FoundationConfig, args: argparse.Namespace) -> int:
    """Preprocess one dataset into ``<output_base_dir>/<name>/`` (or only rebuild its splits);
    returns its exit status. Raises :class:`CaseError` for a run-level problem."""
    out_dir = config.output_base_dir / dataset.name
    if args.rebuild_splits:
        case_ids, status = cases_to_rebuild(out_dir, dataset_settings(dataset, config, args), "_metadata.json"), 0
    else:
        cases = discover_foundation_cases(dataset)
        prepare_output_dir(out_dir)
        check_settings(out_dir, dataset_settings(dataset, config, args), args.overwrite)
        write_run_args(out_dir, {**vars(args), "resolved_config": config.as_dict()})
        get_logger().info(f"{dataset.name}: {len(cases)} cases under {dataset.data_dir} -> {out_dir}")
        process = functools.partial(preprocess_foundation_case, output_dir=out_dir, settings=config.preprocessing, overwrite=args.overwrite)
        report = run_cases(cases, process, workers=args.workers, desc=dataset.name)
        extra = {"dataset": dataset.name, "keys": list(FOUNDATION_KEYS), "preprocessing": config.as_dict()["preprocessing"]}
        status = finish(out_dir / f"{dataset.name}_summary.json", report, extra)
        write_dataset_fingerprint(out_dir, {r.case_id: r.info["fingerprint"] for r in report.by_status("done")}, report.with_output())
        case_ids = report.with_output()
    volume = lambda case_id: read_json(out_dir / f"{case_id}_metadata.json")["lesion_ml"]  # noqa: E731
    splits = out_dir / foundation_splits_name(dataset.name)
    overwrite = args.overwrite or args.rebuild_splits
    return max(status, write_stage_splits(splits, case_ids, volume, dataset.name, args.test_fraction, args.seed, overwrite))


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
    status = 0
    for dataset in config.datasets:
        if args.datasets is None or dataset.name in args.datasets:
            status = max(status, guard_stage(functools.partial(run_dataset, dataset, config, args)))
    return status


if __name__ == "__main__":
    sys.exit(main())
