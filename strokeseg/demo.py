"""The main job: the paper's whole ablation end to end on generated synthetic data.

Synthetic ISLES 2022, BraTS 2024, ATLAS 2.0 and UOA trees in the real layouts go through the
paper's plan (``ablation.json``: every stage script with its real flags, run as a subprocess):
preprocessing, patch extraction, BraTS pretraining of both architectures, the five ISLES
strategies, ATLAS and UOA transfer vs scratch for both architectures (fold k fine-tuned from
BraTS fold k), then ``evaluate.py``. The paper-style tables are printed and saved to
``<out>/results.md``; curves and example PNGs stay in each stage's folder.

The default is sized for 2 CPU cores (tiny widths and volumes, fold 0 only, few epochs, test
sets of 6 cases so the paired comparisons run, about 13 minutes on 2 idle cores); ``--full`` uses the paper's sizes (96³/64³ patches, width 64, 5 folds, 100 epochs) for
a GPU machine. The demo's grid is written to ``<out>/ablation.json``; each task logs to
``<out>/logs/<task>.log``; after a failing task nothing new starts, and a rerun continues where
the last one stopped (finished tasks are skipped). ``--emit-slurm DIR`` writes the same plan as
SLURM jobs instead (see :mod:`strokeseg.ablation`).

    python -m strokeseg.demo --out demo_run
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .ablation import cpu_count, emit_slurm, load_plan, run_local
from .core.io import read_json, write_json, write_text
from .core.runner import get_logger, write_run_args
from .datasets.synthetic import MARKER, make_atlas, make_brats, make_isles, make_uoa

REPO = Path(__file__).resolve().parents[1]


def _resources(train: dict, other: dict) -> dict[str, dict]:
    """Per stage kind of the plan: what one task asks for."""
    kinds = ("preprocess", "extract_patches", "train_brats", "train_isles", "train_stroke", "evaluate")
    return {kind: dict(train if kind.startswith("train") else other) for kind in kinds}


@dataclass(frozen=True)
class Scale:
    """Sizes of one demo run. Shapes in voxels; ``epochs_*`` per training stage."""

    folds: tuple[int, ...]
    width: int
    isles_cases: int
    isles_shape: int
    brats_patients: int
    mni_shape: tuple[int, int, int]
    atlas_cases: int
    uoa_cases: int
    patch: dict[str, int]
    min_lesion_overlap: float | None  # lesion share of a stored lesion patch, both architectures (None: the paper's per architecture)
    epochs_brats: int
    epochs_isles: int
    epochs_stroke: dict[str, int]  # per architecture
    batch_size: int
    patches_per_volume: int  # training samples per case and epoch (ISLES: augmented whole volumes)
    optim: tuple[str, ...]  # extra training flags (every stage, both inits alike)
    stroke: tuple[str, ...]  # extra flags of the ATLAS/UOA training
    test_fraction: float | None  # share of cases held out for testing (None: each stage's default)
    resources: dict[str, dict]  # per stage kind: gpus, cpus (threads; training's DataLoader workers = cpus - 1), memory, time


# The small demo: a larger learning rate for few epochs; GroupNorm, because at batch 2 of 48³
# patches the ResNet's BatchNorm sees 2 x 2³ values per channel at the bottleneck and its running
# statistics made eval-mode predictions fall below 0.5 everywhere; 70 % of the ATLAS/UOA samples
# random (paper: 30 %; nnU-Net's foreground oversampling is 33 %): mostly lesion-centred samples
# taught false positives at CSF next to grey matter, which looks like a lesion's gliotic rim;
# 10 BraTS epochs (4 left UCTransNet3D's BraTS model at validation Dice 0.38, a start its UOA
# transfer arm did not recover from in 20 epochs); validation every 2nd epoch (half a
# UCTransNet3D epoch is its sliding-window validation); stored lesion patches at least 1 % lesion
# for both architectures (the paper's 0.01 % for UCTransNet3D is 3 voxels of a 32³ patch: its
# "lesion" patches only grazed the lesion).
SMALL = Scale(
    folds=(0,), width=8, isles_cases=24, isles_shape=32, brats_patients=8, mni_shape=(64, 72, 60),
    atlas_cases=24, uoa_cases=24, patch={"resnet18": 48, "uctransnet3d": 32}, min_lesion_overlap=0.01,
    epochs_brats=10, epochs_isles=15, epochs_stroke={"resnet18": 10, "uctransnet3d": 20}, batch_size=2, patches_per_volume=4,
    optim=("--lr", "3e-3", "--loss", "dice_ce", "--norm", "group"), stroke=("--random-patch-fraction", "0.7", "--val-every", "2"), test_fraction=0.25,
    resources=_resources({"gpus": 0, "cpus": 1, "memory": "4G", "time": "01:00:00"}, {"gpus": 0, "cpus": 2, "memory": "4G", "time": "01:00:00"}),
)
FULL = Scale(
    folds=(0, 1, 2, 3, 4), width=64, isles_cases=60, isles_shape=96, brats_patients=40, mni_shape=(197, 233, 189),
    atlas_cases=60, uoa_cases=40, patch={"resnet18": 96, "uctransnet3d": 64}, min_lesion_overlap=None,
    epochs_brats=100, epochs_isles=100, epochs_stroke={"resnet18": 100, "uctransnet3d": 100}, batch_size=4, patches_per_volume=10,
    optim=(), stroke=(), test_fraction=None,
    resources=_resources({"gpus": 1, "cpus": 8, "memory": "64G", "time": "24:00:00"}, {"gpus": 0, "cpus": 8, "memory": "64G", "time": "04:00:00"}),
)


def generate_data(raw: Path, scale: Scale, seed: int) -> None:
    """Write the four synthetic datasets in their real layouts under ``raw`` (skipped when
    ``raw/synthetic.json`` records the same seed and sizes: a rerun continues the demo)."""
    log, record = get_logger(), {"seed": seed, "scale": asdict(scale)}
    marker = raw / MARKER
    if marker.is_file() and read_json(marker) == json.loads(json.dumps(record)):
        log.info(f"synthetic data in {raw} already written (seed {seed})")
        return
    make_isles(raw / "ISLES2022", scale.isles_cases, layout="A", seed=seed, empty_every=8)
    make_brats(raw / "BraTS2024", scale.brats_patients, seed=seed, shape=scale.mni_shape)
    make_atlas(raw / "ATLAS", scale.atlas_cases, seed=seed, shape=scale.mni_shape, empty_every=8)
    make_uoa(raw / "UOA", scale.uoa_cases, seed=seed, shape=scale.mni_shape, empty_every=7)
    write_json(marker, record)
    log.info(f"synthetic data in {raw}: ISLES {scale.isles_cases}, BraTS {scale.brats_patients} patients, ATLAS {scale.atlas_cases}, UOA {scale.uoa_cases}")


def write_grid(out: Path, scale: Scale) -> Path:
    """The paper's grid (``ablation.json``: arms, datasets, architectures) at the demo's sizes,
    pointed at the synthetic data, as ``<out>/ablation.json`` (and the foundation stage's
    ``<out>/config.json``); returns its path."""
    raw, paper = out / "raw", read_json(REPO / "ablation.json")
    config = read_json(REPO / "config.json")  # the paper's example, pointed at the synthetic folders
    config["output_base_dir"] = str(out / "preprocessed_stroke_foundation")
    config["preprocessing"]["use_gpu"] = False
    for dataset, folder in zip(config["datasets"], ("ATLAS", "UOA")):
        dataset["data_dir"] = str(raw / folder)
    write_json(out / "config.json", config)
    train = ["--width", str(scale.width), "--batch-size", str(scale.batch_size), "--patches-per-volume", str(scale.patches_per_volume), *scale.optim]
    split = [] if scale.test_fraction is None else ["--test-fraction", str(scale.test_fraction)]
    overlap = {} if scale.min_lesion_overlap is None else {"min_lesion_overlap": scale.min_lesion_overlap}
    grid = {
        **paper, "_about": "the demo's grid on synthetic data, written by python -m strokeseg.demo", "work_dir": str(out),
        "data": {"isles": str(raw / "ISLES2022" / "derivatives"), "brats": str(raw / "BraTS2024"), "foundation_config": str(out / "config.json")},
        "folds": list(scale.folds),
        "architectures": {arch: {**spec, "patch_size": scale.patch[arch], **overlap} for arch, spec in paper["architectures"].items()},
        "epochs": {"train_brats": scale.epochs_brats, "train_isles": scale.epochs_isles, "train_stroke": scale.epochs_stroke},
        "args": {"preprocess_isles": ["--target-shape", *[str(scale.isles_shape)] * 3, *split], "preprocess_brats": ["--target-shape", *map(str, scale.mni_shape)],
                 "preprocess_foundation": split, "extract_patches": ["--max_patches", "20"], "train": train, "train_stroke": list(scale.stroke)},
        "resources": scale.resources,
    }
    write_json(out / "ablation.json", grid)
    return out / "ablation.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_run"), help="output folder (default demo_run)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default 0)")
    parser.add_argument("--full", action="store_true", help="the paper's sizes (width 64, 96³/64³ patches, 5 folds, 100 epochs): for a GPU machine")
    parser.add_argument("--emit-slurm", type=Path, metavar="DIR", help="write the demo's plan as sbatch scripts and DIR/submit.sh instead of running it (data generated under --out)")
    parser.add_argument("--cpus", type=int, default=cpu_count(), help="CPU cores shared by the stages (default: all of this machine's)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = get_logger()
    scale = FULL if args.full else SMALL
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_run_args(out, args)
    start = time.perf_counter()
    generate_data(out / "raw", scale, args.seed)
    plan = load_plan(write_grid(out, scale))
    if args.emit_slurm:
        written = emit_slurm(plan, args.emit_slurm)
        log.info(f"{len(written) - 1} sbatch scripts in {args.emit_slurm}; submit with: bash {written[-1]}")
        return 0
    if run_local(plan, args.cpus, torch.cuda.device_count()) != 0:
        return 1
    tables = [(Path(stage.outputs[0]).parent / "results.md").read_text() for stage in plan.stages if stage.script == "evaluate.py"]
    report = "\n\n".join(tables)
    write_text(out / "results.md", report + "\n")
    print("\n" + report + "\n", flush=True)
    log.info(f"demo finished in {(time.perf_counter() - start) / 60:.1f} min; tables in {out / 'results.md'}, per-stage outputs and logs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
