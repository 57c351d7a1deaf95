"""How far one inference window's forward is from what the hardware can do (a roofline figure).

For each registered network (models/registry.py) at its paper window and full width: the FLOPs
of one window's forward (``torch.utils.flop_counter``, counted on the meta device: convolutions
and matrix products, which is nearly all of the arithmetic; norms and activations are not
counted), the achieved FLOP/s of the forward as inference runs it (eval mode, channels-last,
``torch.inference_mode``, the precision's autocast, ``models.foreground_probability``) in fp32
and bf16, the peak of an N x N matmul in the same dtype measured in the same run (interleaved
with the forwards, so both see the same load), and the fraction forward / matmul. The floor
column is the FLOPs at the matmul peak: the fastest a window could run.

``--paths`` picks the inference paths timed: ``fast`` (default) is the network as
``models.prepare_for_inference`` hands it to the sliding window, ``plain`` the network as
trained (channels-last, BatchNorm not folded); ``--paths plain fast`` times both, interleaved,
for before/after figures in the same run. Forwards run ``--batch`` windows (default 4, the
sliding window's); seconds and FLOPs are per window. bf16 is timed only where the device runs it
natively unless ``--precisions`` asks for it.

    python benchmarks/bench_roofline.py --threads 2                       # CPU (and CUDA when present)
    python benchmarks/bench_roofline.py --width 8 --window 32 --repeats 1 --matmul 256   # seconds
    python benchmarks/bench_roofline.py --json roofline.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import models  # noqa: E402
from strokeseg.core.io import write_json  # noqa: E402
from strokeseg.inference.precision import amp_autocast, cpu_supports_bf16  # noqa: E402

# The paper's inference cases beyond the registry's defaults: the ISLES ResNet-18 U-Net on
# DWI+ADC with a shared encoder (the slowest inference variant but 'separate').
PAPER_CONFIGS = {"resnet18": {"variant": "shared"}}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def network_config(arch: str, width: int | None, window: int | None) -> tuple[dict, int]:
    """The paper's config of ``arch`` at ``width`` (None: the registry default) and its window
    (None: the registry's paper patch edge)."""
    spec = models.arch_spec(arch)
    window = window or spec.default_patch
    config = {"arch": arch, **PAPER_CONFIGS.get(arch, {})}
    if width:
        config["width"] = width
    if spec.fixed_input_size:
        config["patch_size"] = window
    return config, window


def window_flops(config: dict, window: int, batch: int = 1) -> float:
    """FLOPs (multiply and add counted as 2) of one inference forward of ``batch`` cubic windows
    of edge ``window`` through the network of ``config``, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = models.build_model(config).eval()
        x = torch.empty(batch, model.config.in_channels, window, window, window)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        models.foreground_probability(model, x)
    return float(counter.get_total_flops())


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def matmul_rate(n: int, precision: str, device: torch.device) -> float:
    """FLOP/s of one n x n @ n x n product in the precision's dtype on ``device``."""
    a = torch.randn(n, n, device=device, dtype=DTYPES[precision])
    b = torch.randn(n, n, device=device, dtype=DTYPES[precision])
    return 2.0 * n**3 / _timed(lambda: a @ b, device)


def forward_runner(config: dict, window: int, batch: int, precision: str, device: torch.device, path: str) -> Callable[[], object]:
    """A call running one inference forward of ``batch`` random windows (seeded weights)."""
    torch.manual_seed(0)
    model = models.build_model(config).eval()
    if path == "fast":
        model = models.prepare_for_inference(model, device)
    else:
        model = model.to(device, memory_format=torch.channels_last_3d)
    x = torch.randn(batch, model.config.in_channels, window, window, window, device=device)
    x = x.contiguous(memory_format=torch.channels_last_3d)

    def run() -> torch.Tensor:
        with torch.inference_mode(), amp_autocast(device, precision):
            return models.foreground_probability(model, x)

    return run


def measure(arch: str, args: argparse.Namespace, device: torch.device, precision: str) -> list[dict]:
    """Table rows of ``arch`` at ``precision``, one per ``args.paths``: median forward seconds
    and median matmul FLOP/s over ``args.repeats`` interleaved rounds (each path's forward, then
    the matmul), after one untimed run of each."""
    config, window = network_config(arch, args.width, args.window)
    flops = window_flops(config, window, args.batch)
    forwards = {path: forward_runner(config, window, args.batch, precision, device, path) for path in args.paths}
    for forward in forwards.values():
        forward()
    matmul_rate(args.matmul, precision, device)
    seconds: dict[str, list[float]] = {path: [] for path in args.paths}
    peaks = []
    for _ in range(args.repeats):
        for path, forward in forwards.items():
            seconds[path].append(_timed(forward, device))
        peaks.append(matmul_rate(args.matmul, precision, device))
    peak = statistics.median(peaks)
    rows = []
    for path in args.paths:
        second = statistics.median(seconds[path])
        rows.append({
            "network": arch, "config": config, "window": window, "batch": args.batch, "device": device.type,
            "precision": precision, "path": path, "gflop": flops / args.batch / 1e9, "forward_s": second / args.batch,
            "tflops": flops / second / 1e12, "matmul_tflops": peak / 1e12, "fraction": flops / second / peak,
            "floor_s": flops / args.batch / peak, "forward_s_all": seconds[path], "matmul_tflops_all": [p / 1e12 for p in peaks],
        })
    return rows


def native_precisions(device: torch.device) -> list[str]:
    """fp32, and bf16 where ``device`` runs it natively (CUDA with bf16; a CPU with AVX512-BF16
    or AMX): elsewhere PyTorch emulates bf16 convolutions and matmuls, tens of times slower."""
    if device.type == "cuda":
        return ["fp32", "bf16"] if torch.cuda.is_bf16_supported() else ["fp32"]
    return ["fp32", "bf16"] if cpu_supports_bf16() else ["fp32"]


def print_table(rows: list[dict]) -> None:
    header = f"{'network':<14}{'window':>7}{'width':>6}{'batch':>6}{'device':>7}{'dtype':>6}{'path':>7}{'GFLOP':>9}{'s/window':>9}{'TFLOP/s':>9}{'matmul':>9}{'fraction':>9}{'floor s':>9}"
    print(header)
    for r in rows:
        width = r["config"].get("width", models.arch_spec(r["network"]).defaults()["width"])
        print(f"{r['network']:<14}{r['window']:>6}³{width:>6}{r['batch']:>6}{r['device']:>7}{r['precision']:>6}{r['path']:>7}"
              f"{r['gflop']:>9.1f}{r['forward_s']:>9.3f}{r['tflops']:>9.4f}{r['matmul_tflops']:>9.4f}{r['fraction']:>9.1%}{r['floor_s']:>9.3f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", choices=models.arch_names(), default=list(models.arch_names()), help="networks (default: every registered one)")
    p.add_argument("--width", type=int, help="base width (default: each network's full width, 64)")
    p.add_argument("--window", type=int, help="cubic window edge in voxels (default: each network's paper patch: 96 and 64)")
    p.add_argument("--batch", type=int, default=4, help="windows per forward (default 4, the sliding window's); figures are per window")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards (and matmuls) per row; medians are printed (default 3)")
    p.add_argument("--matmul", type=int, default=4096, help="edge N of the N x N peak matmul (default 4096)")
    p.add_argument("--precisions", nargs="+", choices=sorted(DTYPES),
                   help="default: fp32, and bf16 where the device runs it natively (a CPU without AVX512-BF16/AMX emulates it, tens of times slower)")
    p.add_argument("--devices", nargs="+", help="default: cpu, and cuda when present")
    p.add_argument("--paths", nargs="+", choices=("fast", "plain"), default=["fast"],
                   help="fast: the network as inference prepares it (models.prepare_for_inference); plain: as trained, channels-last (default: fast)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    for name in ("batch", "repeats", "matmul"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; medians of {args.repeats} run(s); matmul {args.matmul}²")
    rows = []
    for name in devices:
        device = torch.device(name)
        for arch in args.archs:
            for precision in args.precisions or native_precisions(device):
                rows += measure(arch, args, device, precision)
    print_table(rows)
    if args.json:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
