#!/usr/bin/env python
"""Samples per second of a full training step (forward, loss, backward, AdamW step, clipping),
the engine's own strokeseg.training.optimization.train_step, on random batches already on the device.

Both networks at the paper's sizes (README "Resources per stage": ResNet-18 U-Net width 64,
96³, batch 4; UCTransNet3D width 64, 64³, batch 4 for ATLAS and 8 for BraTS), with automatic mixed precision on (bfloat16, or float16 + GradScaler
without bf16 support) and off (float32), each with weights and batches in the contiguous and in
the channels-last layout (the engine's default, ``--no-channels-last`` turns it off). Reports
samples/s, the AMP speed-up and the channels-last speed-up (ratios of figures measured in the
same run) and, on CUDA, the peak allocated memory of each setting. CPU-only machines print "no
CUDA: skipped GPU figures"; ``--device cpu --quick`` times small networks (width 16, 32³ patches,
batch 2) on the CPU. ``--json F`` also writes the figures to F (benchmarks/gpu_check.sh);
``--amp-only`` times only AMP with channels-last (the training default).

    python benchmarks/bench_train_step.py                       # CUDA, full size
    python benchmarks/bench_train_step.py --device cpu --quick  # ~1 min on 2 cores
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from strokeseg.core.io import write_json  # noqa: E402
from strokeseg.inference.precision import autocast_dtype, training_precision  # noqa: E402
from strokeseg.training.optimization import make_grad_scaler, train_step  # noqa: E402
from strokeseg.training.losses import build_loss  # noqa: E402

# label: (arch, width, patch edge, batch)
FULL = {"resnet18": ("resnet18", 64, 96, 4), "uctransnet3d ATLAS": ("uctransnet3d", 64, 64, 4), "uctransnet3d BraTS": ("uctransnet3d", 64, 64, 8)}
QUICK = {"resnet18": ("resnet18", 16, 32, 2), "uctransnet3d": ("uctransnet3d", 16, 32, 2)}
LAYOUTS = (torch.contiguous_format, torch.channels_last_3d)


def model_config(arch: str, width: int, patch: int) -> dict:
    """The architecture's default config at ``width`` (and ``patch`` when its input size is fixed)."""
    fixed = {"patch_size": patch} if models.arch_spec(arch).fixed_input_size else {}
    return {"arch": arch, "width": width, **fixed}


def samples_per_second(arch: str, sizes: tuple[int, int, int], amp: str, layout: torch.memory_format, device: torch.device, steps: int,
                       warmup: int = 3) -> tuple[float, float]:
    """Training samples/s of ``arch`` at (width, patch, batch) and the peak allocated MiB (CUDA;
    NaN on the CPU)."""
    width, patch, batch = sizes
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = models.build_model(model_config(arch, width, patch)).to(device, memory_format=layout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp_dtype = autocast_dtype(device, training_precision(amp))
    scaler = make_grad_scaler(amp_dtype)
    loss_fn = build_loss("gdice")
    images = torch.randn(batch, 1, patch, patch, patch, device=device).contiguous(memory_format=layout)
    masks = (torch.rand(batch, patch, patch, patch, device=device) < 0.05).to(torch.uint8)
    for _ in range(warmup):  # warm-up: cuDNN autotuning, allocator
        train_step(model, images, masks, optimizer, scaler, loss_fn, amp_dtype, 1.0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = train_step(model, images, masks, optimizer, scaler, loss_fn, amp_dtype, 1.0)
    float(loss)  # waits for the device
    rate = steps * batch / (time.perf_counter() - start)
    return rate, torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def measure_all(sizes: dict, device: torch.device, steps: int, amp_only: bool, warmup: int = 3) -> list[dict]:
    """One row per network size: samples/s and peak MiB per (amp, layout) setting."""
    settings = [("auto", LAYOUTS[1])] if amp_only else [(amp, layout) for amp in ("off", "auto") for layout in LAYOUTS]
    rows = []
    for label, (arch, width, patch, batch) in sizes.items():
        row = {"network": label, "arch": arch, "width": width, "patch": patch, "batch": batch, "steps": steps, "device": device.type}
        for amp, layout in settings:
            key = f"{'amp' if amp == 'auto' else 'fp32'}_{'channels_last' if layout is LAYOUTS[1] else 'contiguous'}"
            row[key], row[f"{key}_peak_mib"] = samples_per_second(arch, (width, patch, batch), amp, layout, device, steps, warmup)
        rows.append(row)
    return rows


def print_rows(rows: list[dict], amp_only: bool) -> None:
    if amp_only:
        print(f"{'network':<20}{'width':>6}{'patch':>7}{'batch':>6}{'AMP samples/s':>15}{'steps/s':>9}{'peak MiB':>10}")
        for r in rows:
            rate = r["amp_channels_last"]
            print(f"{r['network']:<20}{r['width']:>6}{r['patch']:>6}³{r['batch']:>6}{rate:>15.2f}{rate / r['batch']:>9.2f}{r['amp_channels_last_peak_mib']:>10.0f}")
        return
    print("samples/s (contiguous | channels-last); AMP/fp32 and channels-last/contiguous are speed-ups; peak MiB of AMP channels-last")
    print(f"{'network':<20}{'width':>6}{'patch':>7}{'batch':>6}{'fp32':>16}{'AMP':>16}{'AMP/fp32':>10}{'cl/contig':>10}{'peak MiB':>10}")
    for r in rows:
        fp32, amp = [f"{r[a + '_contiguous']:.2f} | {r[a + '_channels_last']:.2f}" for a in ("fp32", "amp")]
        amp_gain = r["amp_channels_last"] / r["fp32_channels_last"]
        layout_gain = r["amp_channels_last"] / r["amp_contiguous"]
        print(f"{r['network']:<20}{r['width']:>6}{r['patch']:>6}³{r['batch']:>6}{fp32:>16}{amp:>16}{amp_gain:>10.2f}{layout_gain:>10.2f}"
              f"{r['amp_channels_last_peak_mib']:>10.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where to time (default cuda)")
    parser.add_argument("--quick", action="store_true", help="small networks and patches (for a CPU figure)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per setting (default 20 on CUDA, 3 on CPU)")
    parser.add_argument("--size", type=int, nargs=3, metavar=("WIDTH", "PATCH", "BATCH"), help="one size for every network (e.g. a dry run: 4 32 2)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each timing (default 3)")
    parser.add_argument("--amp-only", action="store_true", help="time only AMP with channels-last (the training default)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA: skipped GPU figures (use --device cpu --quick for a CPU figure)")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        print(f"device: {torch.cuda.get_device_name(device)}; AMP dtype: {autocast_dtype(device, None)}")
    else:
        print(f"device: CPU, {torch.get_num_threads()} threads; AMP is off on CPU, so both columns are float32")
    sizes = QUICK if args.quick else FULL
    if args.size:
        sizes = {label: (arch, *args.size) for label, (arch, *_) in QUICK.items()}
    rows = measure_all(sizes, device, args.steps or (20 if device.type == "cuda" else 3), args.amp_only, args.warmup)
    print_rows(rows, args.amp_only)
    if args.json:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
