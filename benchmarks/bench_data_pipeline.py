#!/usr/bin/env python
"""Training patches per second delivered by the data pipeline alone (no model).

Writes ``--cases`` synthetic ATLAS-sized preprocessed volumes (197x233x189: ``image`` float32,
``lesion_mask`` and ``brain_mask`` uint8, as preprocess_stroke_foundation.py writes them) plus
patch files holding the ``centers`` of 20 lesion patches each, then drives
strokeseg.training.data.TrainingSet through the training DataLoader exactly as train_stroke.py does
(70 % stored lesion patches, 30 % random brain patches, flips, ``--workers`` workers, batch 4),
for volumes stored uncompressed (memory-mapped) and compressed (decoded once per chunk).
Reports patches/s and the ratio to the target (150 patches/s of 96³ with 2 workers);
``--json F`` also writes them to F (benchmarks/gpu_check.sh); ``--shape`` makes smaller volumes.

    python benchmarks/bench_data_pipeline.py                 # ~1 min on 2 cores
    python benchmarks/bench_data_pipeline.py --epochs 5 --workers 4
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from strokeseg.core.io import save_npz, write_json  # noqa: E402
from strokeseg.training.augment import augment_preset  # noqa: E402
from strokeseg.training.data import BatchLoader, EpochSampler, SampleMix, TrainingSet, find_case_files  # noqa: E402
from strokeseg.training.patches import lesion_centers  # noqa: E402

SHAPE = (197, 233, 189)  # ATLAS MNI grid, 1 mm
TARGET = 150.0  # patches per second


def _ellipsoid(shape: tuple[int, ...], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1.0


def write_cases(root: Path, n_cases: int, patch_size: int, compress: bool, shape: tuple[int, int, int] = SHAPE) -> list[str]:
    """Synthetic preprocessed volumes under root/volumes and patch centres under root/patches."""
    rng = np.random.default_rng(0)
    ids = []
    centre = np.array(shape) / 2
    brain = _ellipsoid(shape, centre, np.array(shape) * 0.42)
    radii = np.array([6, 20]) * min(shape) / min(SHAPE)
    for i in range(n_cases):
        lesion = _ellipsoid(shape, centre + rng.uniform(-0.15, 0.15, 3) * shape, rng.uniform(*radii, 3)) & brain
        image = np.where(brain, rng.standard_normal(shape, dtype=np.float32), np.float32(0))
        image[lesion] -= 1.5
        case_id = f"sub-r001s{i + 1:03d}_ses-1"
        save_npz(root / "volumes" / f"{case_id}.npz", {"image": image, "lesion_mask": lesion.astype(np.uint8), "brain_mask": brain.astype(np.uint8)}, compress=compress)
        centres, _ = lesion_centers(lesion, 20, patch_size, 0.01, rng)
        save_npz(root / "patches" / f"{case_id}.npz", {"centers": centres, "original_shape": np.array(shape)})
        ids.append(case_id)
    return ids


def measure(root: Path, ids: list[str], args: argparse.Namespace) -> tuple[float, float]:
    """Patches per second of the first epoch (worker start, first file opens with their one-off
    CRC and finiteness checks, each worker's centre pools) and over ``args.epochs`` epochs after
    it: the steady state of a run."""
    cases = find_case_files(root / "volumes", ids, ("image",), "lesion_mask", "brain_mask", root / "patches")
    mix = SampleMix.from_fraction(args.patches_per_volume, 0.7, "stored")
    dataset = TrainingSet(cases, args.patch_size, mix, augment_preset("flip"), seed=0, chunk_cases=args.chunk_cases)
    sampler = EpochSampler(dataset, args.batch_size)
    loader = BatchLoader(dataset, sampler, args.workers)
    counts, times = [0] * (args.epochs + 1), [0.0] * (args.epochs + 1)
    for epoch in range(args.epochs + 1):
        start = time.perf_counter()
        sampler.set_epoch(epoch)
        for images, _ in loader:
            counts[epoch] += images.shape[0]
        times[epoch] = time.perf_counter() - start
    return counts[0] / times[0], sum(counts[1:]) / sum(times[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=8, help="synthetic volumes (default 8)")
    parser.add_argument("--patch-size", type=int, default=96, help="patch edge in voxels (default 96)")
    parser.add_argument("--patches-per-volume", type=int, default=10, help="samples per volume per epoch (default 10)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2, the target's setting)")
    parser.add_argument("--chunk-cases", type=int, default=4, help="cases interleaved in the epoch order = volumes each worker caches (default 4: "
                        "half the volumes, so every volume is reopened each epoch as in a real run with hundreds of cases)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (default 3)")
    parser.add_argument("--skip-compressed", action="store_true", help="only time the memory-mapped (uncompressed) layout")
    parser.add_argument("--shape", type=int, nargs=3, default=list(SHAPE), help="volume size X Y Z in voxels (default ATLAS's 197 233 189)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    layouts = ("uncompressed",) if args.skip_compressed else ("uncompressed", "compressed")
    shape = tuple(args.shape)
    print(f"{args.cases} volumes {shape}, {args.patch_size}^3 patches, {args.patches_per_volume} per volume per epoch, "
          f"batch {args.batch_size}, {args.workers} workers, {args.epochs} timed epochs")
    rows = []
    for layout in layouts:
        with tempfile.TemporaryDirectory() as tmp:
            ids = write_cases(Path(tmp), args.cases, args.patch_size, compress=layout == "compressed", shape=shape)
            first, rate = measure(Path(tmp), ids, args)
        print(f"{layout:>12} .npz: {rate:7.1f} patches/s  = {rate / TARGET:.2f} x target ({TARGET:.0f}/s); first epoch {first:.1f} patches/s")
        rows.append({"layout": layout, "patches_per_s": rate, "first_epoch_patches_per_s": first, "shape": list(shape),
                     "patch": args.patch_size, "workers": args.workers, "batch": args.batch_size})
    if args.json:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
