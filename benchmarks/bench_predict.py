"""Time predict.py's per-case work against the forward passes inside it.

Writes synthetic cases (ATLAS-like T1w by default, or ISLES DWI+ADC) and an untrained ResNet-18
U-Net run folder with a data contract, then runs prediction as ``predict.py`` does (load, read,
preprocess, sliding windows, map back, threshold, tables, NIfTI, overlay) and measures, in the
same run, the seconds spent inside the networks' forward passes (hooks on each fold model).
Prints per case: wall time, forward time, their ratio (target <= 1.25), and the overall ratio;
and the FLOP floor: the windows the networks ran times one window's FLOPs
(``bench_roofline.window_flops``) at the matmul peak of the precision measured after each case
(same run, same load), and wall / floor (target <= 2 for a 5-fold full-width ensemble).
``--tta`` adds the 8 mirror flips (8x the windows). ``--json F`` also writes the figures to F.

    python benchmarks/bench_predict.py                                    # ATLAS-size, width 16
    python benchmarks/bench_predict.py --dataset isles --shape 112 112 73 --width 32
    python benchmarks/bench_predict.py --shape 98 116 94 --window 48 --width 8 --cases 2   # quick
    python benchmarks/bench_predict.py --run runs/atlas_resnet18_scratch   # a trained ATLAS model
    python benchmarks/bench_predict.py --folds 5 --width 64 --precision bf16 --cases 1   # the paper's ensemble vs its floor
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import models  # noqa: E402
from benchmarks.bench_roofline import matmul_rate, window_flops  # noqa: E402
from strokeseg.datasets.contract import THRESHOLD, DataContract  # noqa: E402
from strokeseg.datasets import synthetic  # noqa: E402
from strokeseg.datasets.registry import dataset_spec  # noqa: E402
from strokeseg.inference.inferer import Inferer  # noqa: E402
from strokeseg.inference import prediction as pr  # noqa: E402
from strokeseg.inference.precision import autocast_dtype  # noqa: E402

_SETTINGS = {
    "atlas": ("ATLAS", ["image"], {"target_spacing": [1.0, 1.0, 1.0], "clip_percentile": 99.5, "brain_threshold": 0.0}),
    "isles": ("ISLES2022", ["dwi", "adc"], {"target_shape": [96, 96, 96], "margin": 4}),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(_SETTINGS), default="atlas", help="synthetic input kind (default atlas)")
    p.add_argument("--shape", type=int, nargs=3, help="native grid in voxels (default 197 233 189 for atlas, 112 112 73 for isles)")
    p.add_argument("--cases", type=int, default=2, help="cases to predict (default 2)")
    p.add_argument("--folds", type=int, default=1, help="fold models in the ensemble (default 1)")
    p.add_argument("--width", type=int, default=16, help="ResNet-18 U-Net base width (default 16)")
    p.add_argument("--window", type=int, default=96, help="training patch / window in voxels (default 96)")
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32", help="network arithmetic (default fp32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--run", type=Path, help="a trained run or model folder of the --dataset to time instead of an untrained network "
                   "(whose masks call most of the volume lesion: one lesion of thousands of ml, whose centroid the lesion tables take seconds to find)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--tta", action="store_true", help="mirror test-time augmentation (8 flips: 8x the windows)")
    p.add_argument("--matmul", type=int, default=4096, help="edge N of the N x N matmul whose rate is the FLOP floor's peak (default 4096)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    return p.parse_args(argv)


def make_inputs(args: argparse.Namespace, root: Path) -> tuple[Path, list[str]]:
    """Synthetic cases under ``root / 'data'`` and a run folder: ``--run``, else ``root / 'run'``
    (untrained)."""
    dataset, keys, preprocessing = _SETTINGS[args.dataset]
    if args.dataset == "atlas":
        synthetic.make_atlas(root / "data", args.cases, seed=0, shape=args.shape or (197, 233, 189))
    else:
        synthetic.make_isles(root / "data", args.cases, layout="A", seed=0, shape=args.shape or (112, 112, 73))
    if args.run is not None:
        return args.run, keys
    config = {"arch": "resnet18_unet", "variant": "shared" if len(keys) == 2 else "single", "width": args.width, "in_channels": len(keys)}
    for fold in range(args.folds):
        torch.manual_seed(fold)
        contract = DataContract(dataset, tuple(keys), dataset_spec(dataset).mask_key, (args.window,) * 3, THRESHOLD, preprocessing, fold, (), ()).as_dict()
        run_config = {"dataset": dataset, "fold": fold, "patch_size": args.window}
        models.save_checkpoint(root / "run" / f"fold_{fold}" / "best_model.pth", models.build_model(config), config, config=run_config, data_contract=contract)
    return root / "run", keys


def time_forward_passes(model_set: pr.ModelSet, device: torch.device) -> list[float]:
    """A list [seconds, windows] that the fold models' forward hooks add to: the seconds spent
    inside their forwards and the windows they ran (each fold's windows counted)."""
    spent, started = [0.0, 0], [0.0]

    def before(module, inputs):
        spent[1] += inputs[0].shape[0]
        started[0] = time.perf_counter()

    def after(module, inputs, output):
        if device.type == "cuda":
            torch.cuda.synchronize()
        spent[0] += time.perf_counter() - started[0]

    for fold_model in model_set.fold_models:
        fold_model.model.register_forward_pre_hook(before)
        fold_model.model.register_forward_hook(after)
    return spent


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    root = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    try:
        run, _ = make_inputs(args, root)
        model_set = pr.load_model_set([run], None, device)
        spec = model_set.spec
        pattern = "**/*_T1w.nii.gz" if args.dataset == "atlas" else None
        cases, _ = pr.discover_cases(pr.InputSpec(root / "data", image_pattern=pattern), spec)
        inferer = Inferer(device=device, mirror_tta=args.tta, precision=args.precision, brain_crop=spec.whole_brain)
        options = pr.PredictOptions(root / "out", inferer)
        spent = time_forward_passes(model_set, device)
        first = dict(list(cases.items())[:1])
        pr.predict_cases(first, model_set, pr.PredictOptions(root / "warm", inferer))  # warm-up: allocator, oneDNN kernels
        print(f"{args.dataset}: {len(cases)} case(s), native shape {args.shape or 'default'}, {args.folds} fold model(s), ResNet-18 U-Net width {args.width}, "
              f"window {args.window}, precision {args.precision}, TTA {args.tta}, brain crop {spec.whole_brain}, device {device}, {torch.get_num_threads()} threads")
        fold = model_set.fold_models[0]
        flops = window_flops(fold.model_config, args.window)
        dtype = "bf16" if autocast_dtype(device, args.precision) == torch.bfloat16 else "fp32"
        print(f"{'case':24}{'wall s':>9}{'forward s':>11}{'ratio':>8}{'lesions':>9}{'ml':>8}{'windows':>9}{'floor s':>9}{'wall/floor':>11}")
        wall_total, forward_total, rows = 0.0, 0.0, []
        for case_id, case in cases.items():
            spent[0], spent[1] = 0.0, 0
            start = time.perf_counter()
            report = pr.predict_cases({case_id: case}, model_set, options)
            wall = time.perf_counter() - start
            if report.n_failed:
                print(f"{case_id}: failed: {report.results[0].reason}")
                return 1
            wall_total, forward_total = wall_total + wall, forward_total + spent[0]
            volume = report.results[0].info["volume"]
            peak = matmul_rate(args.matmul, dtype, device)
            floor = spent[1] * flops / peak
            print(f"{case_id:24}{wall:9.2f}{spent[0]:11.2f}{wall / spent[0]:8.3f}{volume['lesion_count']:9d}{volume['lesion_volume_ml']:8.1f}"
                  f"{spent[1]:9d}{floor:9.2f}{wall / floor:11.2f}")
            rows.append({"case": case_id, "wall_s": wall, "forward_s": spent[0], "windows": spent[1], "window_gflop": flops / 1e9,
                         "matmul_tflops": peak / 1e12, "floor_s": floor, "wall_over_floor": wall / floor})
        note = "" if args.run else "; an untrained network, whose masks are not lesions: the figure needs a trained one (--run)"
        print(f"predict wall time / sum of forward passes: {wall_total / forward_total:.3f} (target <= 1.25){note}")
        print(f"FLOP floor: {flops / 1e9:.1f} GFLOP per window at the {dtype} matmul peak ({args.matmul}², after each case); "
              f"wall / floor {sum(r['wall_s'] for r in rows) / sum(r['floor_s'] for r in rows):.2f} (target <= 2 for 5 folds at width 64)")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            settings_row = {"dataset": args.dataset, "folds": args.folds, "width": args.width, "window": args.window, "precision": args.precision,
                            "tta": args.tta, "device": device.type, "threads": torch.get_num_threads()}
            args.json.write_text(json.dumps({"settings": settings_row, "cases": rows}, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
