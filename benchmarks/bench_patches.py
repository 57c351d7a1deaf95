"""Cases per second of lesion-focused patch extraction on ATLAS-sized volumes (197x233x189).

Setup (not timed): synthetic ATLAS cases are written and run through the foundation stage. Then,
per case, the stage's per-case function (load the .npz, sample centres, cut and write the
patches) is timed against its I/O floor measured in the same run: loading the same input .npz
and writing the same output arrays. The sampling alone (lesion_centers with the integral image)
is timed too, each the best of --repeats runs. Prints seconds per case, cases per second and
the ratio to the floor.

    python benchmarks/bench_patches.py
    python benchmarks/bench_patches.py --no-compress
    python benchmarks/bench_patches.py --cases 8 --patch-size 64 --min-lesion-overlap 0.0001
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from strokeseg.core.case import Case  # noqa: E402
from strokeseg.core.io import load_npz, save_npz  # noqa: E402
from strokeseg.datasets import synthetic  # noqa: E402
from strokeseg.datasets.foundation import DatasetConfig, PreprocessingConfig, discover_foundation_cases, preprocess_foundation_case  # noqa: E402
from strokeseg.training.patches import case_rng, extract_case_patches, lesion_centers, stored_case  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=4, help="synthetic ATLAS cases (default 4)")
    p.add_argument("--shape", type=int, nargs=3, default=[197, 233, 189], help="volume X Y Z in voxels")
    p.add_argument("--patch-size", type=int, default=96, help="patch size P (default 96)")
    p.add_argument("--max-patches", type=int, default=20, help="patches per case (default 20)")
    p.add_argument("--min-lesion-overlap", type=float, default=0.01, help="lesion fraction rule (default 0.01)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    p.add_argument("--repeats", type=int, default=2, help="runs per case; the best counts (default 2)")
    p.add_argument("--no-compress", dest="compress", action="store_false", help="time the stored (uncompressed) output")
    return p.parse_args(argv)


def prepare(root: Path, n: int, shape: tuple[int, int, int], seed: int) -> Path:
    """Foundation-stage outputs of ``n`` synthetic ATLAS cases in ``root/found``."""
    synthetic.make_atlas(root / "in", n, seed=seed, shape=shape)
    dataset = DatasetConfig("ATLAS", root / "in", "**/*_T1w.nii.gz", "**/*_label-L_desc-T1lesion_mask.nii.gz")
    for item in discover_foundation_cases(dataset).values():
        preprocess_foundation_case(item, root / "found", PreprocessingConfig(), overwrite=True)
    return root / "found"


def _kind(path: Path) -> tuple[str, int]:
    data = load_npz(path, keys=("patch_kind", "centers"))
    return str(data["patch_kind"]), len(data["centers"])


def _best_of(args: argparse.Namespace, root: Path, item: Case) -> tuple[float, float, float]:
    """Best-of-``--repeats`` seconds: the per-case stage function, its I/O floor (load the same
    input .npz, write the same output arrays) and the centre sampling alone."""
    fulls, floors, samples = [], [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        extract_case_patches(item, root / "patches", args.patch_size, args.max_patches, args.min_lesion_overlap, 42, overwrite=True, compress=args.compress)
        fulls.append(time.perf_counter() - start)
        out = load_npz(root / "patches" / f"{item.case_id}.npz")
        start = time.perf_counter()
        lesion = load_npz(item.source("npz"), keys=("image", "lesion_mask", "brain_mask"))["lesion_mask"]
        save_npz(root / "floor.npz", out, compress=args.compress)
        floors.append(time.perf_counter() - start)
        start = time.perf_counter()
        if lesion.any():
            lesion_centers(lesion, args.max_patches, args.patch_size, args.min_lesion_overlap, case_rng(42, item.case_id))
        samples.append(time.perf_counter() - start)
    return min(fulls), min(floors), min(samples)


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"preparing {args.cases} synthetic ATLAS cases of {tuple(args.shape)} ...", flush=True)
        found = prepare(root, args.cases, tuple(args.shape), args.seed)
        print(f"{'case':22s} {'kind':>8s} {'N':>3s} {'sample s':>9s} {'full s':>7s} {'floor s':>8s} {'ratio':>6s}")
        fulls, floors = [], []
        for npz in sorted(found.glob("*.npz")):
            item = stored_case(npz.stem, npz, found / f"{npz.stem}_metadata.json")
            full, floor, sample = _best_of(args, root, item)
            fulls.append(full)
            floors.append(floor)
            kind, n = _kind(root / "patches" / npz.name)
            print(f"{npz.stem:22s} {kind:>8s} {n:3d} {sample:9.3f} {full:7.3f} {floor:8.3f} {full / floor:6.2f}")
        print(f"{len(fulls) / sum(fulls):.2f} cases/s ({statistics.mean(fulls):.2f} s per case, {args.patch_size}^3 x {args.max_patches}, compressed: {args.compress}); "
              f"I/O floor {len(floors) / sum(floors):.2f} cases/s; median ratio {statistics.median(f / g for f, g in zip(fulls, floors)):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
