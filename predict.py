#!/usr/bin/env python
"""Segment your own data with trained fold models: native-grid lesion masks, volumes, lesions.

Every case is preprocessed exactly as the models' training data was (the checkpoints' data
contract: ISLES DWI+ADC crop, resampling and z-scoring; T1w foundation settings), predicted
with the mean probability of the fold models, mapped back to the input's native grid and
thresholded. A case with a reference mask is also scored.

    python predict.py --input /data/my_isles_cohort --run runs/isles_shared_brats --output-dir out/isles
    python predict.py --dwi sub-01_dwi.nii.gz --adc sub-01_adc.nii.gz --run exported/isles --output-dir out/one
    python predict.py --input /data/ATLAS_2 --run runs/atlas_resnet18_transfer --output-dir out/atlas
    python predict.py --image P001_T1.nii.gz --run runs/atlas_resnet18_transfer --output-dir out/p001
    python predict.py --input /data/hospital --modality dwi='*_DWI.nii.gz' --modality adc='*_ADC.nii.gz' --run exported/isles --output-dir out/h
    python predict.py --dwi patient07/dwi_4d.nii.gz --case-id patient07 --run exported/isles --output-dir out/p07   # 4-D DWI + .bval
    python predict.py --input /data/dicom_export --dicom-seg --run exported/isles --output-dir out/dicom   # DICOM in, DICOM-SEG out

Outputs in --output-dir: masks (``<case>_desc-lesion_mask.nii.gz``, or a BIDS derivatives tree
``sub-*/ses-*/<datatype>/`` with dataset_description.json for BIDS input), lesion_volumes.csv,
lesions.csv, scores.csv (labelled cases, each with its role for the models: train, val, unseen;
the printed mean Dice is over unseen cases only), overlays/<case>.png, report.html (every case of
the folder, self-contained), prediction_summary.json (every case of the folder, last status),
run_args.json; for DICOM input dicom_nifti/ (the converted series) and with --dicom-seg
``<case>_desc-lesion_seg.dcm``. Folds whose training stopped early and empty fold folders are
refused unless --allow-unfinished; an exported model folder must match its model_card.json.
Exit status 0, 1 when any case failed, 2 when nothing could run (or a table could not be written).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from strokeseg.datasets.contract import DataContract
from strokeseg.core.io import CaseError, file_fingerprints, one_line
from strokeseg.core.runner import add_run_arguments, check_settings, finish, get_logger, prepare_output_dir, write_run_args
from strokeseg.datasets.foundation import load_config, register_config_datasets
from strokeseg.inference.fold_models import report_unfinished
from strokeseg.inference import dicom, qc
from strokeseg.inference import prediction as pr
from strokeseg.inference.html_report import write_html_report
from strokeseg.inference.inferer import Inferer
from strokeseg.inference.inputs import parse_modalities
from strokeseg.inference.precision import PRECISIONS
from strokeseg.inference.tables import write_tables

DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("input (a folder, or single files)")
    source.add_argument("--input", type=Path, help="dataset folder: ISLES 2022 layout A or B (masks optional), any BIDS naming (with or without ses-, acq-/run-/rec-), "
                        "nnU-Net CASE_0000.nii.gz channels, files named by --modality, a T1w tree found by the config's patterns or --pattern, "
                        "or DICOM series (converted by dcm2niix into OUTPUT_DIR/dicom_nifti; needs pip install -r requirements-dicom.txt)")
    source.add_argument("--modality", action="append", default=[], metavar="KEY=GLOB",
                        help="with --input: the files of one input (KEY: the model's dwi, adc or image, or mask for reference masks), a glob relative to "
                             "--input, letter case ignored; case id = what its * matched, or the file's folder (repeatable: --modality dwi='*_DWI.nii.gz')")
    source.add_argument("--dwi", type=Path, help="one DWI NIfTI: 3-D, or 4-D with a .bval or BIDS JSON beside it (the model's b-value is used)")
    source.add_argument("--adc", type=Path, help="its ADC NIfTI (same grid; unit 10^-3 or 10^-6 mm^2/s told from the brain median). Optional: "
                        "computed from a 4-D DWI's b=0, and not read by DWI-only models")
    source.add_argument("--image", type=Path, help="one T1w NIfTI")
    source.add_argument("--case-id", help="case id of the single files (default: the file name without _dwi/.nii.gz, or its folder for a generic name like DWI.nii.gz)")
    source.add_argument("--dwi-volume", type=int, metavar="K", help="volume K (0-based) of a 4-D DWI instead of the b-value's trace (needed without b-values)")
    source.add_argument("--mask", type=Path, help="reference lesion mask of the single case (optional: then it is scored)")
    source.add_argument("--pattern", help="T1w images under --input, a glob relative to it (default: the config's image_pattern of the model's dataset)")
    source.add_argument("--mask-pattern", help="reference masks under --input (default: the config's mask_pattern with no --pattern, else none)")
    source.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="config.json whose dataset entry gives the T1w patterns; its datasets are registered, so a model of a cohort it lists is known (default: the repository's)")
    parser.add_argument("--run", type=Path, action="append", required=True, help="training run folder or exported model folder with fold_<k>/best_model.pth; repeat to ensemble several")
    parser.add_argument("--output-dir", type=Path, required=True, help="folder for masks, tables, overlays, summary")
    parser.add_argument("--folds", type=int, nargs="+", help="folds to use (default: every fold found)")
    parser.add_argument("--allow-unfinished", action="store_true", help="use folds whose training stopped before its last epoch and skip fold folders without a checkpoint (default: refuse them); lesion_volumes.csv and the summary name them")
    parser.add_argument("--tta", action="store_true", help="mirror test-time augmentation (mean over 8 flips; 8x slower)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="inference device (auto: CUDA when available)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="network arithmetic: fp32, bf16 (autocast) or auto (default: bf16 where the CPU/GPU runs it natively, else fp32)")
    parser.add_argument("--no-brain-crop", action="store_true", help="run the windows over the whole volume (default for whole-volume T1w models: only over the brain's box, the rest is background)")
    parser.add_argument("--sw-batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    parser.add_argument("--save-probabilities", action="store_true", help="also write the probability map (float32 NIfTI, native grid)")
    parser.add_argument("--dicom-seg", action="store_true", help="with DICOM --input: also write <case>_desc-lesion_seg.dcm, a DICOM-SEG of the mask "
                        "referencing the source series (needs pip install -r requirements-dicom.txt)")
    parser.add_argument("--save-uncertainty", action="store_true", help="also write the per-voxel standard deviation of the fold probabilities (<case>_desc-lesion_stddev.nii.gz, float32, native grid)")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    single = [name for name in ("dwi", "adc", "image") if getattr(args, name) is not None]
    if (args.input is None) == (not single):
        parser.error("give either --input DIR or single files (--dwi F --adc F, or --image F)")
    if single and sorted(single) not in (["adc", "dwi"], ["dwi"], ["image"]):
        parser.error("single files: --dwi F [--adc F] (DWI models) or --image F (T1w models)")
    if args.case_id is not None and not single:
        parser.error("--case-id goes with single files; in a folder case ids come from the file names")
    if args.modality and not args.input:
        parser.error("--modality goes with --input DIR")
    if args.dwi_volume is not None and args.dwi_volume < 0:
        parser.error("--dwi-volume must be >= 0")
    if args.dicom_seg and not args.input:
        parser.error("--dicom-seg goes with --input DIR holding DICOM series")
    if args.mask is not None and not single:
        parser.error("--mask goes with single files; in a folder masks are found beside the images")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.workers > 1 and (args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())):
        parser.error("--workers > 1 needs --device cpu (each worker holds its own copy of the models)")
    if args.sw_batch_size < 1:
        parser.error("--sw-batch-size must be >= 1")
    return args


def input_spec(args: argparse.Namespace, contract: DataContract) -> pr.InputSpec:
    """Where the cases are; T1w folder patterns from --pattern / --mask-pattern or the config;
    --modality globs checked against the contract's inputs."""
    image_pattern, mask_pattern = args.pattern, args.mask_pattern or ""
    if args.input is not None and args.pattern is None and args.config.is_file():
        entry = {d.name: d for d in load_config(args.config).datasets}.get(contract.dataset)
        if entry is not None:
            image_pattern, mask_pattern = entry.image_pattern, args.mask_pattern or entry.mask_pattern
    modalities = tuple(parse_modalities(args.modality, contract.input_keys).items())
    return pr.InputSpec(args.input, args.dwi, args.adc, args.image, args.mask, image_pattern, mask_pattern,
                        contract.input_keys, modalities, args.case_id, args.dwi_volume)


def output_settings(args: argparse.Namespace, model_set: pr.ModelSet, brain_crop: bool) -> dict:
    """What shapes the masks in ``--output-dir`` (see :func:`strokeseg.core.runner.check_settings`):
    each checkpoint (path, size, modification time: a model trained again counts as another),
    TTA, precision, brain crop, probability maps. Not the input: one folder may collect cases
    predicted one call at a time."""
    return {
        "checkpoints": file_fingerprints(fm.path.resolve() for fm in model_set.fold_models), "tta": args.tta,
        "precision": args.precision, "brain_crop": brain_crop, "save_probabilities": args.save_probabilities,
        **({"save_uncertainty": True} if args.save_uncertainty else {}),  # absent when off: folders of older versions stay valid
        **({"dwi_volume": args.dwi_volume} if args.dwi_volume is not None else {}),
    }


def check_folds(model_set: pr.ModelSet, allowed: bool) -> bool:
    """Apply evaluate.py's rule to unfinished folds (:func:`strokeseg.inference.fold_models.report_unfinished`)
    and name each empty fold folder: ERROR lines unless ``allowed`` (then NOTE / WARNING lines).
    Returns whether prediction may go on."""
    log = get_logger()
    consequence = "used, and marked in lesion_volumes.csv" if allowed else "refused, nothing predicted"
    refused = report_unfinished([("model", fm) for fm in model_set.fold_models], allowed, consequence)
    for folder in model_set.empty_folds:
        log.info(f"{'WARNING' if allowed else 'ERROR'} {folder}: fold folder without best_model.pth (its training has not finished, or failed); "
                 f"{'left out' if allowed else 'refused, nothing predicted (choose folds with --folds, or pass --allow-unfinished to leave it out)'}")
    return not (refused or (model_set.empty_folds and not allowed))


def report_tables(tables: dict, output_dir: Path) -> None:
    """The mean Dice line: over unseen cases only, with a WARNING naming the others."""
    log, roles = get_logger(), tables["roles"]
    others = {role: n for role, n in roles.items() if role != "unseen"}
    if others:
        log.info(f"WARNING {', '.join(f'{n} {role}' for role, n in others.items())} case(s) scored in {output_dir}/scores.csv (column 'role') "
                 "were the models' own training/validation cases or of unknown role: left out of the mean Dice")
    if tables["mean_dice"] is not None:
        log.info(f"{roles['unseen']} unseen labelled case(s) in {output_dir} scored: mean Dice {tables['mean_dice']:.4f} (scores.csv)")


def run(args: argparse.Namespace, model_set: pr.ModelSet, cases: dict, bids: bool, device: torch.device) -> int:
    """Predict ``cases`` into ``args.output_dir`` and write its tables and summary; a write
    error of the run (not of one case) raises OSError."""
    log = get_logger()
    brain_crop = model_set.spec.whole_brain and not args.no_brain_crop
    inferer = Inferer(sw_batch_size=args.sw_batch_size, device=device, mirror_tta=args.tta, precision=args.precision, brain_crop=brain_crop)
    recorded = output_settings(args, model_set, brain_crop)
    prepare_output_dir(args.output_dir)
    same_models = check_settings(args.output_dir, recorded, args.overwrite)
    write_run_args(args.output_dir, args)
    if bids:
        pr.write_dataset_description(args.output_dir, model_set)
    log.info(
        f"{len(cases)} case(s); model {model_set.label} ({model_set.contract.dataset}, {len(model_set.fold_models)} fold model(s): "
        f"{' '.join(model_set.members)}); device {device}, precision {args.precision} ({inferer.resolved_precision}), brain crop {'on' if brain_crop else 'off'}, "
        f"TTA {'on' if args.tta else 'off'}; output {'BIDS derivatives' if bids else 'flat'} in {args.output_dir}"
    )
    note = qc.fingerprint_note(model_set.contract, model_set.label)
    if note:
        log.info(note)
    options = pr.PredictOptions(args.output_dir, inferer, args.save_probabilities, args.overwrite, pr.settings_id(recorded), save_uncertainty=args.save_uncertainty)
    report = pr.predict_cases(cases, model_set, options, args.workers)
    qc_warnings = {r.case_id: r.info["qc"] for r in report.results if r.info and r.info.get("qc")}
    for warning in qc_warnings.values():
        log.info(f"WARNING {warning}")
    tables = write_tables(args.output_dir, report, model_set, keep_earlier=same_models)
    segs = dicom.write_segs(cases, report, args.output_dir, model_set.label, pr.code_version()) if args.dicom_seg else None
    stale = pr.stale_masks(args.output_dir, options.settings_id)
    if stale:
        log.info(f"WARNING {len(stale)} mask(s) in {args.output_dir} come from other models or settings (not in the tables): "
                 f"{', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}; run predict.py on those patients again")
    report_tables(tables, args.output_dir)
    log.info(f"report: {write_html_report(args.output_dir, f'Stroke lesion segmentation: {model_set.label}')}")
    extra = {"model": model_set.label, "folds": model_set.members, "unfinished": model_set.unfinished, "empty_fold_folders": [str(f) for f in model_set.empty_folds],
             "data_contract": pr.shared_contract(model_set.contract), "bids": bids, "qc_warnings": qc_warnings, **tables}
    extra["this_call"] = {key: value for key, value in report.as_dict().items() if key.startswith("n_")}
    if segs is not None:
        extra["dicom_seg"] = segs
    summary_path = args.output_dir / "prediction_summary.json"
    finish(summary_path, qc.accumulate_report(summary_path, report, keep_earlier=same_models), extra)  # every case of the folder
    return 1 if report.n_failed or (segs and segs["failed"]) else 0  # this call's cases


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = get_logger()
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    try:
        register_config_datasets(args.config)  # a T1w cohort of that config.json is a dataset by its entry alone
        model_set = pr.load_model_set(args.run, args.folds, device)
        if not check_folds(model_set, args.allow_unfinished):
            return 2
        inputs = dicom.dicom_input(input_spec(args, model_set.contract), args.output_dir, args.dicom_seg)  # DICOM: converted to NIfTI first
        cases, bids = pr.discover_cases(inputs, model_set.spec)
        return run(args, model_set, cases, bids, device)
    except (CaseError, ValueError, OSError) as err:  # bad input, or a write of the run's own (a table, the summary) failed
        log.info(f"ERROR {one_line(err)}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
