#!/usr/bin/env python
"""Samples per second of a full training step (forward, loss, backward, AdamW step, clipping),
the engine's own strokeseg.training.engine.train_step, on random batches already on the device.

Both networks at the paper's size (ResNet-18 U-Net: width 64, 96³, batch 4; UCTransNet3D:
width 64, 64³, batch 4), with automatic mixed precision on (bfloat16, or float16 + GradScaler
without bf16 support) and off (float32), each with weights and batches in the contiguous and in
the channels-last layout (the engine's default, ``--no-channels-last`` turns it off). Reports
samples/s, the AMP speed-up and the channels-last speed-up (ratios of figures measured in the
same run). CPU-only machines print "no CUDA: skipped GPU figures";
``--device cpu --quick`` times small networks (width 16, 32³ patches, batch 2) on the CPU.

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
from strokeseg.inference.sliding_window import autocast_dtype, training_precision  # noqa: E402
from strokeseg.training.engine import make_grad_scaler, train_step  # noqa: E402
from strokeseg.training.losses import build_loss  # noqa: E402

FULL = {"resnet18": (64, 96, 4), "uctransnet3d": (64, 64, 4)}  # width, patch edge, batch
QUICK = {"resnet18": (16, 32, 2), "uctransnet3d": (16, 32, 2)}
LAYOUTS = (torch.contiguous_format, torch.channels_last_3d)


def model_config(arch: str, width: int, patch: int) -> dict:
    """The architecture's default config at ``width`` (and ``patch`` when its input size is fixed)."""
    fixed = {"patch_size": patch} if models.arch_spec(arch).fixed_input_size else {}
    return {"arch": arch, "width": width, **fixed}


def samples_per_second(arch: str, sizes: tuple[int, int, int], amp: str, layout: torch.memory_format, device: torch.device, steps: int) -> float:
    width, patch, batch = sizes
    torch.manual_seed(0)
    model = models.build_model(model_config(arch, width, patch)).to(device, memory_format=layout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp_dtype = autocast_dtype(device, training_precision(amp))
    scaler = make_grad_scaler(amp_dtype)
    loss_fn = build_loss("gdice")
    images = torch.randn(batch, 1, patch, patch, patch, device=device).contiguous(memory_format=layout)
    masks = (torch.rand(batch, patch, patch, patch, device=device) < 0.05).to(torch.uint8)
    for _ in range(3):  # warm-up: cuDNN autotuning, allocator
        train_step(model, images, masks, optimizer, scaler, loss_fn, amp_dtype, 1.0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = train_step(model, images, masks, optimizer, scaler, loss_fn, amp_dtype, 1.0)
    float(loss)  # waits for the device
    return steps * batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where to time (default cuda)")
    parser.add_argument("--quick", action="store_true", help="small networks and patches (for a CPU figure)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per setting (default 20 on CUDA, 3 on CPU)")
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
    steps = args.steps or (20 if device.type == "cuda" else 3)
    print("samples/s (contiguous | channels-last); AMP/fp32 and channels-last/contiguous are speed-ups")
    print(f"{'network':<14}{'width':>6}{'patch':>7}{'batch':>6}{'fp32':>16}{'AMP':>16}{'AMP/fp32':>10}{'cl/contig':>10}")
    for arch, (width, patch, batch) in sizes.items():
        rate = {
            (amp, layout): samples_per_second(arch, (width, patch, batch), amp, layout, device, steps)
            for amp in ("off", "auto") for layout in LAYOUTS
        }
        fp32, amp = [f"{rate[(a, LAYOUTS[0])]:.2f} | {rate[(a, LAYOUTS[1])]:.2f}" for a in ("off", "auto")]
        amp_gain = rate[("auto", LAYOUTS[1])] / rate[("off", LAYOUTS[1])]
        layout_gain = rate[("auto", LAYOUTS[1])] / rate[("auto", LAYOUTS[0])]
        print(f"{arch:<14}{width:>6}{patch:>6}³{batch:>6}{fp32:>16}{amp:>16}{amp_gain:>10.2f}{layout_gain:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
