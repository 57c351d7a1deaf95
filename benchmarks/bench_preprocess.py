"""Time per-case preprocessing against the I/O floor: reading the NIfTI files and writing the .npz.

For each synthetic case (written first, not timed) the full per-case function runs, then the
floor in the same process: nibabel load + get data of the same input files, and save_npz of the
same output arrays with the same compression, each the best of --repeats runs (alternating, so
background load hits both alike). Prints per-case seconds, the median ratio
full / floor (targets: ISLES <= 1.3, ATLAS <= 1.5) and, for ISLES, the wall time of the whole
stage with --workers 1 and --workers 2 (the speed-up includes starting the worker processes).

    python benchmarks/bench_preprocess.py --dataset isles
    python benchmarks/bench_preprocess.py --dataset isles --cases 60   # workers: start-up amortised
    python benchmarks/bench_preprocess.py --dataset atlas --cases 6
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from strokeseg.core.io import load_npz, save_npz  # noqa: E402
from strokeseg.core.runner import CaseResult, run_cases  # noqa: E402
from strokeseg.datasets import synthetic  # noqa: E402
from strokeseg.datasets.foundation import DatasetConfig, PreprocessingConfig, discover_foundation_cases, preprocess_foundation_case  # noqa: E402
from strokeseg.datasets.isles import discover_isles_cases, preprocess_isles_case  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("isles", "atlas"), default="isles", help="which stage to time")
    p.add_argument("--cases", type=int, default=None, help="synthetic cases (default: isles 12, atlas 4)")
    p.add_argument("--shape", type=int, nargs=3, default=None, help="input grid X Y Z (default: isles 112 112 72, atlas 197 233 189)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    p.add_argument("--repeats", type=int, default=3, help="runs per case of the full and the floor; the best counts (default 3)")
    p.add_argument("--workdir", type=Path, default=None, help="folder for inputs and outputs (default: a temporary one)")
    return p.parse_args(argv)


def _floor(inputs: list[Path], output: Path, floor_path: Path) -> float:
    """Seconds to read ``inputs`` with nibabel and write the arrays of ``output`` to ``floor_path``,
    stored as the stage stored them (compressed or not)."""
    arrays = load_npz(output)
    with zipfile.ZipFile(output) as archive:
        compressed = any(info.compress_type != zipfile.ZIP_STORED for info in archive.infolist())
    start = time.perf_counter()
    for path in inputs:
        np.asanyarray(nib.load(str(path)).dataobj)
    save_npz(floor_path, arrays, compress=compressed)
    return time.perf_counter() - start


def _timed(fn) -> float:
    start = time.perf_counter()
    result = fn()
    if result.status != "done":
        raise RuntimeError(f"{result.case_id}: {result.status} {result.reason}")
    return time.perf_counter() - start


def _best(full_fn, inputs: list[Path], output: Path, floor_path: Path, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` seconds of the full case function and of the I/O floor, alternating."""
    fulls, floors = [], []
    for _ in range(repeats):
        fulls.append(_timed(full_fn))
        floors.append(_floor(inputs, output, floor_path))
    return min(fulls), min(floors)


def bench_isles(root: Path, n: int, shape: tuple[int, int, int], seed: int, repeats: int) -> list[tuple[str, float, float]]:
    synthetic.make_isles(root / "in", n, layout="B", seed=seed, shape=shape)
    out = root / "out"
    rows = []
    for case in discover_isles_cases(root / "in"):
        full_fn = functools.partial(preprocess_isles_case, case, out, (96, 96, 96), 4, with_bbox=False, overwrite=True)
        rows.append((case.case_id, *_best(full_fn, [case.dwi, case.adc, case.mask], out / f"{case.case_id}.npz", root / "floor.npz", repeats)))
    return rows


def _no_op(case_id: str) -> CaseResult:
    return CaseResult(case_id, "done")


def bench_isles_workers(root: Path) -> dict[str, float]:
    """Stage wall time with 1 and 2 workers, and of 2 workers on no-op cases (process start-up)."""
    cases = {c.case_id: c for c in discover_isles_cases(root / "in")}
    walls = {}
    for workers in (1, 2):
        process = functools.partial(preprocess_isles_case, output_dir=root / f"w{workers}", target_shape=(96, 96, 96), margin=4, with_bbox=False, overwrite=True)
        start = time.perf_counter()
        report = run_cases(cases, process, workers=workers)
        walls[f"w{workers}"] = time.perf_counter() - start
        if report.n_failed:
            raise RuntimeError(f"{report.n_failed} case(s) failed")
    start = time.perf_counter()
    run_cases({c: c for c in cases}, _no_op, workers=2)
    walls["startup"] = time.perf_counter() - start
    return walls


def bench_atlas(root: Path, n: int, shape: tuple[int, int, int], seed: int, repeats: int) -> list[tuple[str, float, float]]:
    synthetic.make_atlas(root / "in", n, seed=seed, shape=shape)
    dataset = DatasetConfig("ATLAS", root / "in", "**/*_T1w.nii.gz", "**/*_label-L_desc-T1lesion_mask.nii.gz")
    settings = PreprocessingConfig(target_spacing=(1.0, 1.0, 1.0), clip_percentile=99.5, use_gpu=False)
    out = root / "out"
    rows = []
    for case_id, item in discover_foundation_cases(dataset).items():
        full_fn = functools.partial(preprocess_foundation_case, item, out, settings, overwrite=True)
        rows.append((case_id, *_best(full_fn, [item.source("image"), item.source("label")], out / f"{case_id}.npz", root / "floor.npz", repeats)))
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    isles = args.dataset == "isles"
    n = args.cases or (12 if isles else 4)
    shape = tuple(args.shape or ((112, 112, 72) if isles else (197, 233, 189)))
    target = 1.3 if isles else 1.5
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        print(f"generating {n} synthetic {args.dataset} cases of about {shape} ...", flush=True)
        rows = (bench_isles if isles else bench_atlas)(root, n, shape, args.seed, args.repeats)
        print(f"{'case':28s} {'full s':>8s} {'floor s':>8s} {'ratio':>6s}")
        for case_id, full, floor in rows:
            print(f"{case_id:28s} {full:8.3f} {floor:8.3f} {full / floor:6.2f}")
        ratio = statistics.median(full / floor for _, full, floor in rows)
        total = sum(r[1] for r in rows) / sum(r[2] for r in rows)
        verdict = "meets" if ratio <= target else "MISSES"
        print(f"median ratio full/floor {ratio:.2f} (total {total:.2f}); target <= {target}: {verdict}")
        if isles:
            walls = bench_isles_workers(root)
            print(f"stage wall time for {n} cases: --workers 1 {walls['w1']:.2f} s, --workers 2 {walls['w2']:.2f} s, speed-up {walls['w1'] / walls['w2']:.2f}x")
            work = max(walls["w2"] - walls["startup"], 1e-9)
            print(f"  of which starting 2 worker processes (no-op run): {walls['startup']:.2f} s; speed-up without it {walls['w1'] / work:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
