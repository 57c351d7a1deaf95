"""Time strokeseg's sliding-window inference against MONAI's on one synthetic volume.

Both run the same network (same weights) on the same windows (overlap, Gaussian blending,
batch size), interleaved, under ``torch.inference_mode``; on CUDA MONAI's predictor runs under the
same autocast as ours. Each is used as its documentation says: ours as ``evaluate.py`` runs it
(weights and windows in channels-last memory format, the layout strokeseg chooses because
oneDNN/cuDNN convolve 3-D volumes fastest in it), MONAI with the network as trained (MONAI leaves
the layout to the caller). ``--monai-channels-last`` hands MONAI the channels-last network and
converts its windows inside the predictor: what a MONAI user could add by hand.

Prints wall time (best of --repeats), the part spent inside the predictor, the rest (gathering
and stitching), the time ratio ours / MONAI (target <= 0.8), the max absolute output difference
(target <= 1e-4) and the peak memory of one call of each, measured in a fresh process (CUDA:
allocator peak; CPU: growth of the peak resident set). The "rest" column and the --model
pointwise run show what the window loops themselves cost.

``--brain`` replaces the noise volume by a synthetic skull-stripped T1w brain preprocessed as the
foundation stage does (z-scored, 0 outside the brain). ``--brain-crop`` (implies --brain) runs
ours over the brain's bounding box only, as evaluate.py/predict.py do for whole-volume datasets,
against MONAI over the whole volume (target <= 0.35 at width 16), and prints the Dice between
ours cropped and uncropped (target >= 0.995; meaningful for a trained network: --checkpoint, on
a case it was made for: ``--case``, a ``.npz`` of the foundation stage, whose input channels (the
checkpoint's data contract) replace the synthetic brain; its mask, when present, scores both).
``--precision bf16`` (or auto) also times ours in bfloat16 autocast against float32, same crop,
and prints their speed ratio (target >= 1.7) and Dice (target >= 0.995).

    python benchmarks/bench_inference.py                      # tiny conv net, 197x233x189, window 96
    python benchmarks/bench_inference.py --model resnet18 --width 8
    python benchmarks/bench_inference.py --model pointwise    # stitching overhead only
    python benchmarks/bench_inference.py --device cuda --model resnet18 --width 32 --repeats 5
    python benchmarks/bench_inference.py --model resnet18 --width 16 --brain-crop --precision bf16
    python benchmarks/bench_inference.py --brain-crop --precision bf16 --checkpoint runs/atlas/fold_0/best_model.pth
    python benchmarks/bench_inference.py --brain-crop --checkpoint runs/atlas/fold_0/best_model.pth \
        --case preprocessed_stroke_foundation/ATLAS/sub-r001s001_ses-1.npz

MONAI is needed only here: ``.venv/bin/pip install --no-deps monai`` (torch and numpy are its
only hard dependencies, --no-deps keeps the pinned versions).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import models  # noqa: E402
from strokeseg.datasets.contract import contract_from_checkpoint  # noqa: E402
from strokeseg.core.io import load_nifti, load_npz, one_line  # noqa: E402
from strokeseg.datasets import synthetic  # noqa: E402
from strokeseg.core.case import Case  # noqa: E402
from strokeseg.datasets.foundation import prepare_foundation_case  # noqa: E402
from strokeseg.core.metrics import dice  # noqa: E402
from strokeseg.inference.precision import PRECISIONS, amp_autocast  # noqa: E402
from strokeseg.inference.sliding_window import crop_alignment, nonzero_box, sliding_window_inference  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=[197, 233, 189], help="volume size X Y Z in voxels")
    p.add_argument("--channels", type=int, default=1, help="input channels C")
    p.add_argument("--window", type=int, help="cubic window size in voxels (default: the --checkpoint's training window, else 96)")
    p.add_argument("--overlap", type=float, default=0.5, help="window overlap fraction in [0, 1)")
    p.add_argument("--sw-batch-size", type=int, default=4, help="windows per predictor call")
    p.add_argument("--model", default="conv", choices=["conv", "pointwise", "resnet18"],
                   help="conv: 3^3 conv, ReLU, 1^3 conv, sigmoid, built here; "
                        "pointwise: sigmoid only (measures stitching); "
                        "resnet18: the ResNet-18 U-Net of models/ at --width")
    p.add_argument("--width", type=int, default=4, help="hidden channels of the conv net; base width of --model resnet18")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each method (best is reported)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--monai-channels-last", action="store_true",
                   help="give MONAI the channels-last network and windows too (by hand, in its predictor)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--brain", action="store_true", help="a synthetic preprocessed T1w brain (0 outside it) instead of noise")
    p.add_argument("--brain-crop", action="store_true", help="ours runs over the brain's box only (implies --brain); prints Dice cropped vs uncropped")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16/auto: also time ours in that precision against fp32 (default fp32: no)")
    p.add_argument("--checkpoint", type=Path, help="a trained checkpoint of this pipeline to run instead of --model (its config sets width and channels)")
    p.add_argument("--case", type=Path, help="a preprocessed whole-volume case (.npz of the foundation stage) instead of the synthetic brain (implies --brain)")
    p.add_argument("--memory-of", choices=["ours", "monai"], help=argparse.SUPPRESS)  # child process mode
    args = p.parse_args(argv)
    args.brain = args.brain or args.brain_crop or args.case is not None
    args.input_keys, args.mask_key = ("image",), None
    arch = args.model if args.model == "resnet18" else None
    if args.checkpoint is not None:
        checkpoint = models.load_checkpoint(args.checkpoint)
        contract = contract_from_checkpoint(checkpoint, args.checkpoint)
        args.input_keys, args.channels, args.mask_key = contract.input_keys, len(contract.input_keys), contract.mask_key
        args.window = args.window or contract.window[0]
        arch = checkpoint["model_config"]["arch"]
    args.window = args.window or 96
    # the crop's box on the network's grid, as evaluate.py/predict.py place it
    args.align = crop_alignment(args.window, args.overlap, models.arch_spec(arch).downsampling if arch else 1)
    return args


def case_volume(path: Path, input_keys: tuple[str, ...], mask_key: str | None) -> tuple[torch.Tensor, np.ndarray | None]:
    """The case's inputs stacked in ``input_keys`` order, float32 (C, X, Y, Z), and its
    ``mask_key`` array as bool (X, Y, Z) (None when not given or not in the file)."""
    try:
        arrays = load_npz(path)
    except (OSError, ValueError) as err:
        raise SystemExit(one_line(err)) from err
    missing = [key for key in input_keys if key not in arrays]
    if missing:
        raise SystemExit(f"{path}: no array {missing} (holds {sorted(arrays)})")
    mask = arrays[mask_key] > 0 if mask_key in arrays else None
    return torch.from_numpy(np.stack([arrays[key].astype(np.float32) for key in input_keys])), mask


def build_network(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """The benchmarked network in eval mode on ``device``, contiguous (as trained), seeded weights."""
    torch.manual_seed(0)
    if args.checkpoint is not None:
        return models.model_from_checkpoint(args.checkpoint, map_location=device)[0].eval()
    if args.model == "pointwise":
        return torch.nn.Sigmoid()
    if args.model == "conv":
        return torch.nn.Sequential(
            torch.nn.Conv3d(args.channels, args.width, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv3d(args.width, 1, 1),
            torch.nn.Sigmoid(),
        ).to(device).eval()
    config = {"arch": "resnet18", "variant": "single", "in_channels": args.channels, "width": args.width}
    return models.build_model(config).to(device).eval()


def build_predictor(name: str, args: argparse.Namespace, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B, C, wx, wy, wz) -> foreground probabilities (B, 1, wx, wy, wz) for method ``name``."""
    net = build_network(args, device)
    channels_last = name == "ours" or args.monai_channels_last
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)  # what evaluate.py does
    forward = net if args.model in ("conv", "pointwise") and args.checkpoint is None else (lambda x: models.foreground_probability(net, x))
    if name == "monai" and channels_last:
        return lambda x: forward(x.contiguous(memory_format=torch.channels_last_3d))
    return forward


def peak_memory_mib(name: str, argv: list[str]) -> float:
    """Peak memory of one ``name`` call in a fresh process, in MiB above the level after setup.

    A fresh process, because freed memory stays with the allocator and would hide the second
    method's peak. CUDA: allocator peak; CPU: growth of the peak resident set (Linux only).
    """
    cmd = [sys.executable, __file__, *argv, "--memory-of", name]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        print(f"memory run of {name} failed: {result.stderr.strip()[-500:]}")
        return float("nan")
    return float(lines[-1])


def _memory_child(name: str, volume: torch.Tensor, args, device: torch.device) -> None:
    predictor = build_predictor(name, args, device)
    crop = args.brain_crop and name == "ours"
    run_once(name, volume[:, : args.window + 8, : args.window, : args.window], predictor, args, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_once(name, volume, predictor, args, device, crop=crop)
        print((torch.cuda.max_memory_allocated() - base) / 2**20)
    else:
        base = _peak_rss_kib()
        run_once(name, volume, predictor, args, device, crop=crop)
        print((_peak_rss_kib() - base) / 1024)


def _peak_rss_kib() -> int:
    """This process's peak resident set (VmHWM, KiB). Not ru_maxrss: Linux carries that over
    from the parent across fork + exec, which would hide the child's own peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


class TimedPredictor:
    """Wraps a predictor and adds up the seconds spent inside it (synchronising on CUDA)."""

    def __init__(self, predictor: Callable, device: torch.device, autocast: bool):
        self.predictor, self.device, self.autocast, self.seconds = predictor, device, autocast, 0.0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        if self.autocast:  # MONAI applies no autocast itself: give it the same as ours
            with amp_autocast(self.device):
                out = self.predictor(batch)
        else:
            out = self.predictor(batch)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        return out


def run_once(name: str, volume: torch.Tensor, predictor: Callable, args, device, crop: bool = False, precision: str = "fp32") -> tuple[np.ndarray, dict]:
    """One whole-volume inference by ``name``; ours over the brain's box only with ``crop`` (the
    rest 0) and at ``precision``. Returns the probabilities and {"total", "predictor"} seconds."""
    from monai.inferers import sliding_window_inference as monai_swi

    timed = TimedPredictor(predictor, device, autocast=name == "monai")
    start = time.perf_counter()
    with torch.inference_mode():
        if name == "ours":
            box = nonzero_box(volume.cpu().numpy(), args.align) if crop else None
            region = volume if box is None else volume[(slice(None), *box)]
            out = sliding_window_inference(region, timed, args.window, overlap=args.overlap, mode="gaussian",
                                           sw_batch_size=args.sw_batch_size, device=device, precision=precision)
            if box is not None:
                whole = np.zeros(volume.shape[1:], dtype=np.float32)
                whole[box] = out
                out = whole
        else:
            out = monai_swi(volume[None], args.window, args.sw_batch_size, timed, overlap=args.overlap,
                            mode="gaussian", sigma_scale=0.125)[0, 0].float().cpu().numpy()
    return out, {"total": time.perf_counter() - start, "predictor": timed.seconds}


def brain_volume(shape: tuple[int, int, int], channels: int) -> torch.Tensor:
    """(channels, X, Y, Z) float32: a synthetic skull-stripped T1w brain (UOA-like, 1 mm),
    preprocessed as the foundation stage does (brain mask, clip, z-score; 0 outside)."""
    with tempfile.TemporaryDirectory() as folder:
        synthetic.make_uoa(folder, 1, seed=0, shape=shape)
        image = load_nifti(Path(folder) / "UOA001" / "UOA001_T1_FNIRT_MNI.nii.gz")
    normalised = prepare_foundation_case(Case("UOA001", {"image": image}), {"use_gpu": False}).image("image").data
    return torch.from_numpy(np.ascontiguousarray(np.repeat(normalised[None], channels, axis=0)))


def best_of(name: str, volume: torch.Tensor, predictor: Callable, args, device, crop: bool, precision: str) -> tuple[np.ndarray, dict]:
    """Best (shortest) of ``args.repeats`` runs."""
    runs = [run_once(name, volume, predictor, args, device, crop, precision) for _ in range(args.repeats)]
    return min(runs, key=lambda run: run[1]["total"])


def crop_and_precision_report(volume: torch.Tensor, predictor: Callable, cropped: tuple[np.ndarray, dict], args, device,
                              reference: np.ndarray | None = None) -> None:
    """Print ours cropped vs uncropped (time, Dice) and, unless --precision fp32, that precision
    vs fp32 (speed ratio, Dice), all at threshold 0.5; with a ``reference`` mask (bool (X, Y, Z))
    also each prediction's Dice against it."""
    lesion = int(np.count_nonzero(cropped[0] >= 0.5))
    note = "" if args.checkpoint else "; an untrained network: the Dice figures need a trained one (--checkpoint)"
    print(f"voxels predicted lesion (p >= 0.5): {lesion} of {cropped[0].size}{note}")
    if args.brain_crop:
        whole = best_of("ours", volume, predictor, args, device, False, "fp32")
        speed = whole[1]["total"] / cropped[1]["total"]
        score = dice(cropped[0] >= 0.5, whole[0] >= 0.5)
        print(f"brain crop: {whole[1]['total']:.3f} s uncropped -> {cropped[1]['total']:.3f} s cropped ({speed:.2f}x faster); "
              f"Dice cropped vs uncropped {score:.4f} (target >= 0.995)")
        if reference is not None:
            print(f"Dice against the case's mask ({int(reference.sum())} voxels): cropped {dice(cropped[0] >= 0.5, reference):.4f}, "
                  f"uncropped {dice(whole[0] >= 0.5, reference):.4f}")
    if args.precision != "fp32":
        low = best_of("ours", volume, predictor, args, device, args.brain_crop, args.precision)
        speed = cropped[1]["total"] / low[1]["total"]
        score = dice(low[0] >= 0.5, cropped[0] >= 0.5)
        print(f"precision {args.precision} vs fp32: {low[1]['total']:.3f} s vs {cropped[1]['total']:.3f} s ({speed:.2f}x faster, target >= 1.7); "
              f"Dice {score:.4f} (target >= 0.995); max |diff| {float(np.abs(low[0] - cropped[0]).max()):.2e}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import monai
    except ImportError:
        print("MONAI is not installed; install it for this benchmark with: .venv/bin/pip install --no-deps monai")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    reference = None
    if args.case is not None:
        volume, reference = case_volume(args.case, args.input_keys, args.mask_key)
        volume = volume.to(device)
    elif args.brain:
        volume = brain_volume(tuple(args.shape), args.channels).to(device)
    else:
        volume = torch.from_numpy(np.random.default_rng(0).standard_normal((args.channels, *args.shape), dtype=np.float32)).to(device)
    if args.memory_of:
        _memory_child(args.memory_of, volume, args, device)
        return 0
    print(f"MONAI {monai.__version__}, torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads")
    model = str(args.checkpoint) if args.checkpoint else args.model if args.model == "pointwise" else f"{args.model} width {args.width}"
    monai_layout = "channels-last (by hand)" if args.monai_channels_last else "as trained (contiguous)"
    print(f"volume {tuple(volume.shape)}, window {args.window}, overlap {args.overlap}, "
          f"sw_batch_size {args.sw_batch_size}, model {model}; ours channels-last, MONAI {monai_layout}")

    warm = volume[:, : args.window + 8, : args.window, : args.window]
    predictors = {name: build_predictor(name, args, device) for name in ("ours", "monai")}
    for name, predictor in predictors.items():
        run_once(name, warm, predictor, args, device)
    runs: dict[str, list[dict]] = {"ours": [], "monai": []}
    outputs = {}
    for _ in range(args.repeats):
        for name in ("ours", "monai"):
            outputs[name], stats = run_once(name, volume, predictors[name], args, device, crop=args.brain_crop and name == "ours")
            runs[name].append(stats)
    if args.brain:
        box = nonzero_box(volume.cpu().numpy(), args.align if args.brain_crop else 1)
        aligned = f" (grown to multiples of {args.align[0]} voxels: the network grid)" if args.brain_crop and max(args.align) > 1 else ""
        print(f"brain box {tuple(b.stop - b.start for b in box)}{aligned} of {tuple(volume.shape[1:])}; ours {'cropped to it' if args.brain_crop else 'whole volume'}, MONAI whole volume")

    best = {name: min(stats, key=lambda s: s["total"]) for name, stats in runs.items()}
    child_argv = sys.argv[1:] if argv is None else list(argv)
    print(f"{'':8}{'total s':>10}{'predictor s':>13}{'rest s':>9}{'peak MiB':>10}")
    for name, s in best.items():
        memory = peak_memory_mib(name, child_argv)
        print(f"{name:8}{s['total']:10.3f}{s['predictor']:13.3f}{s['total'] - s['predictor']:9.3f}{memory:10.1f}")
    ratio = best["ours"]["total"] / best["monai"]["total"]
    rest = {name: s["total"] - s["predictor"] for name, s in best.items()}
    rest_ratio = rest["ours"] / rest["monai"]
    diff = float(np.abs(outputs["ours"] - outputs["monai"]).max())
    target = "0.35 with the brain crop at width 16" if args.brain_crop else "0.8"
    print(f"time ratio ours/MONAI: {ratio:.3f} (target <= {target}); outside the predictor: {rest_ratio:.3f}")
    if args.brain_crop:
        ours_best = (outputs["ours"], best["ours"])
        crop_and_precision_report(volume, predictors["ours"], ours_best, args, device, reference)
        return 0
    print(f"max |ours - MONAI|: {diff:.2e} (target <= 1e-4) -> {'OK' if diff <= 1e-4 else 'MISMATCH'}")
    if args.precision != "fp32":
        crop_and_precision_report(volume, predictors["ours"], (outputs["ours"], best["ours"]), args, device)
    return 0 if diff <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
