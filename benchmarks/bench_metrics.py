"""Time strokeseg.core.metrics.case_metrics against a straightforward scipy implementation.

The reference computes each metric on its own, as separate per-metric functions would: Dice and
the volumes from fresh sums, lesion F1 labelling P and G, and the count difference labelling
them again. case_metrics labels P and G once and reuses P ∩ G. Both run in this process on one
synthetic pair (spheres of several sizes, missed lesions, false positives and a bridge that makes
6- and 26-connectivity differ); the values must agree exactly. Prints the best of --repeats
seconds for each and the ratio case_metrics / reference (target <= 1.0).

    python benchmarks/bench_metrics.py
    python benchmarks/bench_metrics.py --preset atlas22 --lesions 40 --repeats 10
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from strokeseg.core.metrics import PRESETS, case_metrics  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=[197, 233, 189], help="volume size X Y Z in voxels")
    p.add_argument("--lesions", type=int, default=12, help="reference lesions (spheres) to draw")
    p.add_argument("--preset", default="isles22", choices=sorted(k for k, p in PRESETS.items() if p.match_iou is None), help="connectivity preset (the reference counts one overlapping voxel, so not isles24)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each (best is reported)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic pair")
    return p.parse_args(argv)


def synthetic_pair(shape: tuple[int, int, int], lesions: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pred, ref) boolean (X, Y, Z): ref = random spheres (radius 2-12 voxels); pred = ref shifted by
    one voxel with a quarter of the lesions missed, plus small false-positive blobs and a
    diagonal pair that is one component under 26- and two under 6-connectivity."""
    rng = np.random.default_rng(seed)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    ref, pred = np.zeros(shape, bool), np.zeros(shape, bool)
    for i in range(lesions):
        centre = [rng.integers(15, s - 15) for s in shape]
        radius = rng.uniform(2, 12)
        sphere = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2
        ref |= sphere
        if i % 4:
            pred |= np.roll(sphere, 1, axis=0)
    for _ in range(lesions):
        x, y, z = (rng.integers(2, s - 4) for s in shape)
        pred[x : x + 2, y : y + 2, z : z + 2] = True
    pred[5, 5, 5] = pred[6, 6, 6] = True
    return pred, ref


def reference_metrics(pred: np.ndarray, ref: np.ndarray, voxel_volume_ml: float, connectivity: int) -> dict:
    """Each metric computed independently with plain numpy/scipy (the naive approach)."""
    structure = ndimage.generate_binary_structure(3, 1 if connectivity == 6 else 3)

    def f1() -> float:
        pred_labels, n_pred = ndimage.label(pred, structure)
        ref_labels, n_ref = ndimage.label(ref, structure)
        if n_pred == 0 and n_ref == 0:
            return 1.0
        tp = len(np.setdiff1d(np.unique(ref_labels[pred]), [0]))
        fp = n_pred - len(np.setdiff1d(np.unique(pred_labels[ref]), [0]))
        return tp / (tp + (fp + n_ref - tp) / 2)

    def count_difference() -> int:
        return abs(ndimage.label(pred, structure)[1] - ndimage.label(ref, structure)[1])

    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    return {
        "dice": 1.0 if n_pred + n_ref == 0 else 2 * int((pred & ref).sum()) / (n_pred + n_ref),
        "abs_volume_diff_voxels": abs(n_pred - n_ref),
        "abs_volume_diff_ml": abs(n_pred - n_ref) * voxel_volume_ml,
        "lesion_f1": f1(),
        "abs_lesion_count_diff": count_difference(),
    }


def best_time(fn, repeats: int) -> tuple[float, dict]:
    times, out = [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main(argv=None) -> int:
    args = parse_args(argv)
    shape = tuple(args.shape)
    pred, ref = synthetic_pair(shape, args.lesions, args.seed)
    voxel_volume_ml = 0.001
    connectivity = PRESETS[args.preset].connectivity
    print(f"pair {shape}: |P| = {int(pred.sum())}, |G| = {int(ref.sum())} voxels; preset {args.preset} "
          f"({connectivity}-connectivity)")
    ours_s, ours = best_time(lambda: case_metrics(pred, ref, voxel_volume_ml, args.preset), args.repeats)
    naive_s, naive = best_time(lambda: reference_metrics(pred, ref, voxel_volume_ml, connectivity), args.repeats)
    print(f"case_metrics {ours_s * 1000:8.1f} ms   reference {naive_s * 1000:8.1f} ms   "
          f"ratio {ours_s / naive_s:.3f} (target <= 1.0)")
    agree = all(ours[key] == value for key, value in naive.items())
    print("values:", {key: ours[key] for key in naive}, "-> agree" if agree else f"-> DIFFER from {naive}")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
