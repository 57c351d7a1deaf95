"""Forward + backward time and peak memory per training patch for every network.

Each configuration runs in its own process (so CPU peak RSS is its own): one untimed warm-up
step, then ``--iters`` timed steps of forward, summed-heads Dice+CE loss and backward at batch 1.
CPU runs fp32; CUDA runs bf16 autocast with channels_last_3d memory format. Times are also
given relative to the ResNet-18 U-Net 'dwi_only' row measured in the same run.

Examples (from the repository root)::

    python -m benchmarks.bench_models                    # CPU, full width: ResNet 96^3, UCTransNet3D 64^3
    python -m benchmarks.bench_models --quick            # width 16, ResNet 64^3, UCTransNet3D 32^3: seconds
    python -m benchmarks.bench_models --device cuda --iters 10
"""
from __future__ import annotations

import argparse
import multiprocessing
import resource
import time

import torch

import models
from models import build_model, count_parameters
from strokeseg.training.losses import DiceCELoss, multi_head_loss

CASES = (
    # (name, model config, cubic patch edge in voxels): full size
    ("resnet18 dwi_only", {"arch": "resnet18", "variant": "dwi_only"}, 96),
    ("resnet18 separate", {"arch": "resnet18", "variant": "separate"}, 96),
    ("resnet18 shared", {"arch": "resnet18", "variant": "shared"}, 96),
    ("uctransnet3d", {"arch": "uctransnet3d", "patch_size": 64}, 64),
)
QUICK_WIDTH, QUICK_PATCH = 16, {96: 64, 64: 32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--device", default="cpu", help="'cpu' (fp32) or 'cuda' / 'cuda:N' (bf16 autocast, channels_last_3d); default cpu"
    )
    parser.add_argument(
        "--iters", type=int, default=1, help="timed forward+backward steps per configuration after one warm-up (default 1)"
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"width {QUICK_WIDTH} and smaller patches (ResNet 64^3, UCTransNet3D 32^3)"
    )
    args = parser.parse_args(argv)
    if args.iters < 1:
        parser.error(f"--iters must be >= 1, got {args.iters}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    return args


def _step(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, cuda: bool) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        loss = multi_head_loss(DiceCELoss(), model(x), target)
    loss.backward()
    model.zero_grad(set_to_none=True)


def _measure(config: dict, patch: int, device: str, iters: int, results: multiprocessing.Queue) -> None:
    """Child process: time ``iters`` steps; put (seconds per step, peak MiB, parameters) on ``results``."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    model = build_model(config)
    in_channels = model.config.in_channels
    x = torch.randn(1, in_channels, patch, patch, patch)
    target = (torch.rand(1, 1, patch, patch, patch) > 0.9).long().to(dev)
    if cuda:
        torch.backends.cudnn.benchmark = True
        model = model.to(dev, memory_format=torch.channels_last_3d)
        x = x.to(dev, memory_format=torch.channels_last_3d)
    _step(model, x, target, cuda)  # warm-up: allocator, cuDNN algorithm search
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    for _ in range(iters):
        _step(model, x, target, cuda)
    if cuda:
        torch.cuda.synchronize(dev)
        peak_mib = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    results.put(((time.perf_counter() - start) / iters, peak_mib, count_parameters(model)))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    mode = "bf16 autocast, channels_last_3d" if cuda else f"fp32, {torch.get_num_threads()} threads"
    memory = "CUDA max_memory_allocated" if cuda else "process max RSS"
    print(f"device {args.device} ({mode}), batch 1, {args.iters} timed step(s) after 1 warm-up; peak memory = {memory}")
    print(f"{'configuration':<24} {'patch':>6} {'params':>8} {'s/patch':>9} {'x dwi_only':>10} {'peak MiB':>9}")
    context = multiprocessing.get_context("spawn")
    reference = None
    for name, config, patch in CASES:
        if args.quick:
            config, patch = {**config, "width": QUICK_WIDTH}, QUICK_PATCH[patch]
            if models.arch_spec(config["arch"]).fixed_input_size:
                config["patch_size"] = patch
        results = context.Queue()
        worker = context.Process(target=_measure, args=(config, patch, args.device, args.iters, results))
        worker.start()
        seconds, peak_mib, params = results.get()
        worker.join()
        reference = reference or seconds
        ratio = seconds / reference
        print(f"{name:<24} {patch:>5}³ {params / 1e6:>7.1f}M {seconds:>9.3f} {ratio:>10.2f} {peak_mib:>9.0f}")


if __name__ == "__main__":
    main()
