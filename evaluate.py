#!/usr/bin/env python
"""Evaluate fold checkpoints on the held-out test set: whole-volume metrics, tables, figures.

Each run is a training output folder holding ``fold_<k>/best_model.pth``; every fold model is
scored on the test cases of the splits file, giving the paper's mean ± std across fold means.
ISLES 2022 reads ``preprocess_isles_WITH_BBOX.py`` output and scores on the native grid;
ATLAS / UOA read ``preprocess_stroke_foundation.py`` output and score whole volumes.

    python evaluate.py --dataset ISLES2022 --data-dir /data/preprocessed_isles_eval \\
        --splits-file /data/preprocessed_isles_train/isles2022_splits_5fold.json \\
        --run shared_scratch=/runs/isles_shared_scratch --run dwi_only=/runs/isles_dwi_only \\
        --compare shared_scratch dwi_only --output-dir /results/ISLES2022
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from strokeseg.datasets.contract import check_preprocessing
from strokeseg.core.io import CaseError, file_fingerprints, write_csv, write_text
from strokeseg.core.runner import CaseResult, RunReport, finish, get_logger, write_run_args
from strokeseg.datasets.registry import dataset_names, dataset_spec
from strokeseg.evaluation import engine as ev
from strokeseg.inference import fold_models as fm
from strokeseg.evaluation import report
from strokeseg.core.metrics import PRESETS
from strokeseg.inference.model_folders import empty_fold_folders
from strokeseg.inference.inferer import Inferer
from strokeseg.inference.precision import PRECISIONS

_LABEL = re.compile(r"^[A-Za-z0-9._-]+$")
# Arguments that do not change an evaluation's results ("runs" is parsed from --run).
RESULT_FREE = ("output_dir", "device", "overwrite", "sw_batch_size", "allow_unfinished", "runs", "no_brain_crop")


def build_parser() -> argparse.ArgumentParser:
    """evaluate.py's command line (checked further by :func:`parse_args`)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluable = [name for name in dataset_names() if dataset_spec(name).load_eval_case is not None]
    parser.add_argument("--dataset", required=True, choices=evaluable, help="a registered dataset; it sets the metrics preset: ISLES2022 (isles22: 26-connectivity, ml), ATLAS or UOA_Private (atlas22: 6-connectivity, voxels); must be the checkpoints' (their data contract)")
    parser.add_argument("--data-dir", type=Path, required=True, help="ISLES: preprocess_isles_WITH_BBOX.py output; ATLAS/UOA: preprocess_stroke_foundation.py output base (holding <DATASET>/) or the <DATASET> folder")
    parser.add_argument("--splits-file", type=Path, help="splits JSON (default: the one the preprocessing stage wrote beside the data: isles2022_splits_5fold.json, <DATASET>_splits_5fold.json)")
    parser.add_argument("--split", choices=("test", "val"), default="test", help="test: the fixed held-out set, scored by every fold (default); val: each fold's own validation cases")
    parser.add_argument("--run", action="append", default=[], metavar="LABEL=RUN_DIR", help="a training output folder with fold_<k>/<checkpoint-name>; repeat for several runs; several folders with one LABEL are seeds of one arm")
    parser.add_argument("--checkpoints", type=Path, nargs="+", help="checkpoint files of a single run labelled 'model' (fold from a fold_<k> parent folder, else the run config)")
    parser.add_argument("--folds", type=int, nargs="+", help="folds to evaluate (default: every fold folder found)")
    parser.add_argument("--checkpoint-name", default="best_model.pth", help="checkpoint file inside fold_<k>/ (default best_model.pth)")
    parser.add_argument("--output-dir", type=Path, required=True, help="folder for per_case.csv, summary.json, results.md, figures/, predictions/")
    parser.add_argument("--ensemble", action="store_true", help="also score the fold ensemble (mean of the fold models' probabilities per case; test split only)")
    parser.add_argument("--compare", nargs=2, action="append", default=[], metavar=("LABEL_A", "LABEL_B"), help="paired comparison of two runs on every metric of the preset's tables over the cases both scored (per case: the ensemble with --ensemble, else the mean over fold models and seeds): mean difference A - B with bootstrap 95%% CI, Wilcoxon signed-rank p, Holm-adjusted p over all comparisons; repeatable")
    parser.add_argument("--compare-all", action="store_true", help="compare every pair of runs (in --run order)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help=f"metrics preset (default: the dataset's); isles24: the ISLES'24 organisers' current evaluation, a lesion counts only when matched one-to-one at IoU >= {PRESETS['isles24'].match_iou} (their rule since 2025-12-16); isles24_2024: their 2024 rule, IoU >= {PRESETS['isles24_2024'].match_iou}")
    parser.add_argument("--save-nifti", action="store_true", help="write every prediction as a uint8 NIfTI on the scoring grid (ISLES: native grid)")
    parser.add_argument("--png", choices=report.PNG_MODES, default="best-median-worst", help="axial-slice figures per run (default best-median-worst by Dice)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="inference device (auto: CUDA when available); CUDA runs under autocast")
    parser.add_argument("--window", type=int, nargs="+", help="sliding-window size in voxels, 1 or 3 ints (default: the window of the checkpoint's data contract; a volume the window covers is seen whole, as in training); a fixed-input-size network (UCTransNet3D) only runs at its own")
    parser.add_argument("--overlap", type=float, default=0.5, help="window overlap fraction in [0, 1) (default 0.5)")
    parser.add_argument("--mode", choices=("gaussian", "constant"), default="gaussian", help="blending of overlapping windows (default gaussian)")
    parser.add_argument("--tta", action="store_true", help="mirror test-time augmentation (mean over 8 flips)")
    parser.add_argument("--sw-batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    parser.add_argument("--precision", choices=PRECISIONS, help="network arithmetic: fp32, bf16 (autocast) or auto (bf16 where the CPU/GPU runs it natively); default fp32 on the CPU (reproducible), auto on CUDA")
    crop = parser.add_mutually_exclusive_group()
    crop.add_argument("--brain-crop", action="store_true", help="whole-volume datasets (ATLAS/UOA): run the windows only over the box of the brain's non-zero voxels, the rest predicted background, so false positives outside the box are never counted (faster; predict.py's default). Default: the whole volume, every voxel scored")
    crop.add_argument("--no-brain-crop", action="store_true", help="accepted for old commands and does nothing: the whole volume is the default")
    parser.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples for the 95%% CI of the case mean (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="evaluate again although --output-dir holds a finished evaluation (default: report it when its arguments match, else stop with an error; a failed one is redone)")
    parser.add_argument("--allow-unfinished", action="store_true", help="exit 0 although a fold's training stopped before its last epoch (it is scored and marked 'unfinished (epoch k of N)' either way), and leave out fold_<k> folders without a checkpoint (refused otherwise)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.run) == bool(args.checkpoints):
        parser.error("give either --run LABEL=RUN_DIR (repeatable) or --checkpoints PATH...")
    if args.checkpoints and args.folds:
        parser.error("--folds selects fold folders of --run; with --checkpoints list the files instead")
    args.runs = {}
    for spec in args.run:
        label, _, run_dir = spec.partition("=")
        if not _LABEL.match(label) or not run_dir or Path(run_dir) in args.runs.get(label, []):
            parser.error(f"--run {spec!r}: expected LABEL=RUN_DIR (each folder once) with LABEL of letters, digits, '.', '_', '-'")
        args.runs.setdefault(label, []).append(Path(run_dir))
    labels = list(args.runs) or ["model"]
    if args.compare_all:
        args.compare += [[a, b] for i, a in enumerate(labels) for b in labels[i + 1:] if [a, b] not in args.compare]
    for pair in args.compare:
        if any(label not in labels for label in pair) or pair[0] == pair[1]:
            parser.error(f"--compare {' '.join(pair)}: name two different runs among {labels}")
    if args.window is not None and (len(args.window) not in (1, 3) or min(args.window) < 1):
        parser.error(f"--window takes 1 or 3 positive sizes in voxels, got {args.window}")
    if not 0 <= args.overlap < 1 or args.sw_batch_size < 1 or args.bootstrap < 1:
        parser.error("need 0 <= --overlap < 1, --sw-batch-size >= 1 and --bootstrap >= 1")
    if args.brain_crop and not dataset_spec(args.dataset).whole_brain:
        parser.error(f"--brain-crop: {args.dataset} is not a whole-volume dataset (its network input is the preprocessing crop already)")
    if args.ensemble and args.split != "test":
        parser.error("--ensemble needs --split test (each validation case belongs to one fold)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    return args


def load_runs(args: argparse.Namespace, case_dir: Path) -> dict[str, list[list[fm.FoldModel]]]:
    """label -> its seeds (one per run folder given that label) -> fold models, rebuilt on the
    CPU and checked before any case runs: each fits the dataset, and the data in ``case_dir``
    was preprocessed with its training data's settings."""
    window = None if args.window is None else tuple(args.window * 3 if len(args.window) == 1 else args.window)
    if args.checkpoints:
        found = {"model": [[(fm.fold_of_path(path), path) for path in args.checkpoints]]}
    else:
        found = {label: [list(fm.discover_checkpoints(d, args.folds, args.checkpoint_name).items()) for d in dirs] for label, dirs in args.runs.items()}
    runs: dict[str, list[list[fm.FoldModel]]] = {}
    for label, seeds in found.items():
        for checkpoints in seeds:
            loaded = sorted((fm.load_fold_model(path, fold, args.dataset, torch.device("cpu"), window) for fold, path in checkpoints), key=lambda fm: fm.fold)
            for fold_model in loaded:
                check_preprocessing(fold_model.contract, case_dir, fold_model.path)
            folds = [fm.fold for fm in loaded]
            if len(set(folds)) != len(folds):
                raise CaseError(f"run {label}: several checkpoints for one fold ({sorted(folds)})")
            runs.setdefault(label, []).append(loaded)
    return runs


def check_fold_folders(args: argparse.Namespace) -> None:
    """predict.py's rule for ``fold_<k>`` folders without a checkpoint (a training that has not
    written its best model: still running, failed, never started) when the folds are found, not
    named: :class:`CaseError` naming them, or one WARNING each with ``--allow-unfinished`` (left out)."""
    if args.checkpoints or args.folds is not None:  # named folds: a missing checkpoint is refused when found
        return
    empty = [folder for dirs in args.runs.values() for d in dirs for folder in empty_fold_folders(d, args.checkpoint_name)]
    if empty and not args.allow_unfinished:
        raise CaseError(f"fold folder(s) without {args.checkpoint_name}: {', '.join(map(str, empty))} (training not finished, or failed); "
                        "choose folds with --folds, or pass --allow-unfinished to leave them out")
    for folder in empty:
        get_logger().info(f"WARNING {folder}: fold folder without {args.checkpoint_name}; left out (--allow-unfinished)")


def report_unfinished(runs: dict[str, list[list[fm.FoldModel]]], allowed: bool) -> int:
    """Log every fold (of every seed) whose training stopped early (:func:`strokeseg.inference.fold_models.report_unfinished`);
    the exit status they give: 1 when any and not ``allowed``, else 0."""
    labelled = [(f"run {label}", fm) for label, seeds in runs.items() for fold_models in seeds for fm in fold_models]
    return int(fm.report_unfinished(labelled, allowed, "scored and marked anyway"))


def evaluate_arm(label: str, seeds: list[list[fm.FoldModel]], cases: list[dict], args: argparse.Namespace, case_dir: Path, inferer: Inferer) -> tuple[list[dict], list[CaseResult], dict]:
    """Every seed of one arm on its cases. Returns rows (with "run" and "seed"), case results
    (named "<label>/<case>" or "<label>/seed_<s>/<case>") and the arm's summary (an "error"
    when nothing was scored). Case figures show the first seed; the Bland-Altman PNG all."""
    log = get_logger()
    listed = sorted({case for seed_cases in cases for case in seed_cases})
    log.info(f"run {label}: {len(seeds)} seed(s), folds {[[fm.fold for fm in fms] for fms in seeds]}, windows {sorted({fm.window for fms in seeds for fm in fms})}, {len(listed)} cases")
    summary = ev.describe_run(label, seeds, args.dataset, len(listed))
    if summary["model_config_differs_in"]:
        log.info(f"NOTE run {label}: fold checkpoints differ in {summary['model_config_differs_in']}")
    rows, results = [], []
    for seed, (fold_models, seed_cases) in enumerate(zip(seeds, cases)):
        name = f"{label}/seed_{seed}" if len(seeds) > 1 else label
        outputs = ev.CaseOutputs(args.output_dir / "predictions" / name if args.save_nifti else None, {} if args.png != "none" and seed == 0 else None)
        run_report = ev.evaluate_run(fold_models, seed_cases, case_dir, args.dataset, args.ensemble, inferer, outputs, args.preset)
        seed_rows = [{"run": label, "seed": seed, **row} for r in run_report.results if r.status == "done" for row in r.info["rows"]]
        rows += seed_rows
        results += [CaseResult(f"{name}/{r.case_id}", r.status, r.reason, r.seconds, r.info) for r in run_report.results]
        if outputs.figures is not None:
            report.write_figures(args.output_dir / "figures" / label, seed_rows, outputs.figures, args.png, label)
    summary["failed"] = [{"case_id": r.case_id, "reason": r.reason} for r in results if r.status == "failed"]
    try:
        summary.update(ev.summarize_run(rows, args.bootstrap, args.seed))
    except ValueError as err:
        summary["error"] = str(err)
        log.info(f"ERROR run {label}: {err}")
        return rows, results, summary
    if summary["volume_agreement"]["n"]:
        report.save_bland_altman(args.output_dir / "figures" / "bland_altman" / f"{label}.png", summary, label)
    return rows, results, summary


def compare_arms(args: argparse.Namespace, summaries: dict[str, dict]) -> list[dict]:
    """The --compare pairs on every metric of the preset (:func:`strokeseg.evaluation.engine.compare_runs`:
    the primary and the secondary metrics, each a Holm family of its own), one log line each;
    one that cannot be computed (fewer than 5 paired cases, a run without scores) is a WARNING,
    not a failure: results.md notes it."""
    comparisons = ev.compare_runs([tuple(pair) for pair in args.compare], summaries, PRESETS[args.preset].report_metrics, args.bootstrap, args.seed)
    for comp in comparisons:
        if "error" in comp:
            get_logger().info(f"WARNING compare {comp['a']} vs {comp['b']}: not computed ({comp['error']}); noted in results.md")
            continue
        dice = comp["metrics"]["dice"]
        get_logger().info(f"compare {comp['a']} vs {comp['b']} ({comp['per_case']}): n = {dice['n']}, Dice difference {dice['mean_difference']:+.4f}, "
                          f"p = {dice['p_value']}, Holm p = {dice['p_holm']}")
    return comparisons


def evaluation_inputs(args: argparse.Namespace) -> dict[str, list[int] | None]:
    """Fingerprints (:func:`strokeseg.core.io.file_fingerprints`) of every file the
    evaluation reads: the checkpoints, the splits file and the data folder's ``.npz`` files."""
    spec = dataset_spec(args.dataset)
    case_dir = spec.case_dir(args.data_dir)
    if args.checkpoints:
        checkpoints = list(args.checkpoints)
    else:
        checkpoints = [path for dirs in args.runs.values() for d in dirs for path in fm.discover_checkpoints(d, args.folds, args.checkpoint_name).values()]
    return file_fingerprints([*checkpoints, args.splits_file or case_dir / spec.splits_name, *case_dir.glob("*.npz")])


def write_tables(args: argparse.Namespace, rows: list[dict], summaries: dict[str, dict], preset: dict, comparisons: list[dict], scoring: dict) -> None:
    """per_case.csv, lesions.csv and results.md (printed too) in ``--output-dir``; preset:
    :func:`strokeseg.evaluation.engine.preset_record`; scoring: :func:`strokeseg.evaluation.report.scoring_record`."""
    write_csv(args.output_dir / "per_case.csv", rows, ev.csv_columns())
    write_csv(args.output_dir / "lesions.csv", ev.lesion_rows(rows), ev.LESION_COLUMNS)
    good = [summary for summary in summaries.values() if "error" not in summary]
    text = report.results_markdown(args.dataset, good, preset, comparisons, args.split, scoring) if good else "no run could be summarised\n"
    text += ev.unfinished_notes(summaries)
    write_text(args.output_dir / "results.md", text)
    print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = get_logger()
    # Paths absolute (a run or data folder spelled another way is the same evaluation); --run as LABEL=/abs/dir.
    run = [f"{label}={run_dir.resolve()}" for label, dirs in args.runs.items() for run_dir in dirs]
    arguments = ev.absolute_paths({**{key: value for key, value in vars(args).items() if key not in RESULT_FREE}, "run": run})
    try:
        inputs = evaluation_inputs(args)
        reuse = not args.overwrite and ev.reusable_evaluation(args.output_dir, arguments, RESULT_FREE, inputs)
    except CaseError as err:
        log.info(f"ERROR {err}")
        return 1
    if reuse:
        log.info(f"{args.output_dir} already holds this evaluation, finished (summary.json, results.md): not re-run; use --overwrite to evaluate again")
        print((args.output_dir / "results.md").read_text(), flush=True)
        return 0
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    spec = dataset_spec(args.dataset)
    brain_crop = spec.whole_brain and args.brain_crop
    inferer = Inferer(args.overlap, args.mode, args.sw_batch_size, device, args.tta, args.precision, brain_crop)
    args.preset = args.preset or spec.preset
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_run_args(args.output_dir, args)
    try:
        case_dir = spec.case_dir(args.data_dir)
        splits_file = args.splits_file or case_dir / spec.splits_name
        check_fold_folders(args)
        runs = load_runs(args, case_dir)
        cases = {label: [ev.split_cases(splits_file, args.dataset, fms, args.split) for fms in seeds] for label, seeds in runs.items()}
    except CaseError as err:
        log.info(f"ERROR {err}")
        return 1
    preset = ev.preset_record(args.preset)
    log.info(f"{args.dataset}: {len(runs)} run(s), {args.split} split of {splits_file}; preset {preset['name']} ({preset['connectivity']}-connectivity, lesion match {'IoU >= ' + str(preset['match_iou']) if preset['match_iou'] else 'any overlap'}); device {device}, precision {inferer.resolved_precision}, brain crop {'on' if brain_crop else 'off'}")

    results, rows, summaries = [], [], {}
    for label, seeds in runs.items():
        run_rows, run_results, summaries[label] = evaluate_arm(label, seeds, cases[label], args, case_dir, inferer)
        rows += run_rows
        results += run_results
    status = max(report_unfinished(runs, args.allow_unfinished), int(any("error" in summary for summary in summaries.values())))

    comparisons = compare_arms(args, summaries)
    scoring = report.scoring_record(spec.whole_brain, brain_crop)
    write_tables(args, rows, summaries, preset, comparisons, scoring)
    extra = {
        "dataset": args.dataset,
        "split": args.split,
        "splits_file": str(splits_file),
        "preset": preset,
        "scoring": scoring,
        "table_values": "mean ± sample std (ddof=1) across the per-fold means",
        "runs": summaries,
        "compare": comparisons,
        "arguments": arguments,
        "inputs": inputs,
    }
    return max(status, finish(args.output_dir / "summary.json", RunReport(results), extra))


if __name__ == "__main__":
    sys.exit(main())
