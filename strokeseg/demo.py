"""The main job: the paper's whole ablation end to end on generated synthetic data.

Synthetic ISLES 2022, BraTS 2024, ATLAS 2.0 and UOA trees in the real layouts go through every
stage script, run as a user runs them (a subprocess with its real flags): preprocessing, patch
extraction, BraTS pretraining of both architectures, the five ISLES strategies, ATLAS and UOA
transfer vs scratch for both architectures, then ``evaluate.py``. The paper-style tables are
printed and saved to ``<out>/results.md``; curves and example PNGs stay in each stage's folder.

The default is sized for 2 CPU cores (tiny widths and volumes, 2 folds, few epochs, about 15
minutes); ``--full`` uses the paper's sizes (96³/64³ patches, width 64, 5 folds, 100 epochs) for
a GPU machine. Each stage logs to ``<out>/logs/<stage>.log``; a failing stage stops the demo.

    python -m strokeseg.demo --out demo_run
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .io import read_json, write_json, write_text
from .runner import get_logger, write_run_args
from .synthetic import make_atlas, make_brats, make_isles, make_uoa

REPO = Path(__file__).resolve().parents[1]
ISLES_RUNS = (  # (label, strategy, init): the paper's experiments 1-5
    ("separate_brats", "separate", "brats"),
    ("shared_brats", "shared", "brats"),
    ("separate_scratch", "separate", "scratch"),
    ("shared_scratch", "shared", "scratch"),
    ("dwi_only_scratch", "dwi_only", "scratch"),
)
STROKE_DATASETS = ("ATLAS", "UOA_Private")
ARCHS = ("resnet18", "uctransnet3d")


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
    epochs_brats: int
    epochs_isles: int
    epochs_stroke: dict[str, int]  # per architecture
    batch_size: int
    patches_per_volume: int  # training samples per case and epoch (ISLES: augmented whole volumes)
    optim: tuple[str, ...]  # extra training flags; the small demo needs a larger learning rate
    compare: bool  # paired Wilcoxon tests need >= 5 test cases, more than the small demo has


SMALL = Scale(
    folds=(0, 1), width=8, isles_cases=16, isles_shape=32, brats_patients=8, mni_shape=(64, 72, 60),
    atlas_cases=16, uoa_cases=14, patch={"resnet18": 48, "uctransnet3d": 32},
    epochs_brats=4, epochs_isles=15, epochs_stroke={"resnet18": 10, "uctransnet3d": 6}, batch_size=2, patches_per_volume=4,
    optim=("--lr", "3e-3", "--loss", "dice_ce"), compare=False,
)
FULL = Scale(
    folds=(0, 1, 2, 3, 4), width=64, isles_cases=60, isles_shape=96, brats_patients=40, mni_shape=(197, 233, 189),
    atlas_cases=60, uoa_cases=40, patch={"resnet18": 96, "uctransnet3d": 64},
    epochs_brats=100, epochs_isles=100, epochs_stroke={"resnet18": 100, "uctransnet3d": 100}, batch_size=4, patches_per_volume=10,
    optim=(), compare=True,
)


@dataclass(frozen=True)
class Stage:
    """One stage script invocation: ``python <script> <args>`` from the repository root."""

    name: str
    script: str
    args: tuple[str, ...]


def run_stages(stages: list[Stage], log_dir: Path, parallel: int = 1) -> None:
    """Run ``stages`` (at most ``parallel`` at once, each then single-threaded), each logging to
    ``log_dir/<name>.log``. Raises SystemExit naming the log of the first stage that failed."""
    log = get_logger()
    env = dict(os.environ, OMP_NUM_THREADS="1") if parallel > 1 else None
    pending, running, failed = list(stages), [], []
    while pending or running:
        while pending and len(running) < parallel:
            stage = pending.pop(0)
            out = open(log_dir / f"{stage.name}.log", "w")
            command = [sys.executable, str(REPO / stage.script), *stage.args]
            running.append((stage, subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env), out, time.perf_counter()))
        time.sleep(0.2)
        for entry in [e for e in running if e[1].poll() is not None]:
            stage, process, out, start = entry
            out.close()
            running.remove(entry)
            log.info(f"stage {stage.name}: exit {process.returncode} ({time.perf_counter() - start:.0f} s)")
            if process.returncode != 0:
                failed.append(stage)
                pending.clear()
    if failed:
        raise SystemExit(f"stage {failed[0].name} failed; see {log_dir / (failed[0].name + '.log')}")


def run_stage(name: str, script: str, args: list[str], log_dir: Path) -> None:
    """Run one stage script; see :func:`run_stages`."""
    run_stages([Stage(name, script, tuple(args))], log_dir)


def generate_data(raw: Path, scale: Scale, seed: int) -> None:
    """Write the four synthetic datasets in their real layouts under ``raw``."""
    log = get_logger()
    make_isles(raw / "ISLES2022", scale.isles_cases, layout="A", seed=seed, empty_every=8)
    make_brats(raw / "BraTS2024", scale.brats_patients, seed=seed, shape=scale.mni_shape)
    make_atlas(raw / "ATLAS", scale.atlas_cases, seed=seed, shape=scale.mni_shape, empty_every=8)
    make_uoa(raw / "UOA", scale.uoa_cases, seed=seed, shape=scale.mni_shape, empty_every=7)
    log.info(f"synthetic data in {raw}: ISLES {scale.isles_cases}, BraTS {scale.brats_patients} patients, ATLAS {scale.atlas_cases}, UOA {scale.uoa_cases}")


def preprocess(out: Path, scale: Scale, logs: Path) -> None:
    """Every preprocessing and patch-extraction script, with the paper's flags."""
    raw, isles_shape = out / "raw", [str(scale.isles_shape)] * 3
    isles_in = ["--isles-dir", str(raw / "ISLES2022" / "derivatives"), "--target-shape", *isles_shape, "--workers", "2"]
    run_stage("preprocess_v2_isles", "preprocess_v2_isles.py", isles_in + ["--output-dir", str(out / "isles_train")], logs)
    run_stage("preprocess_isles_WITH_BBOX", "preprocess_isles_WITH_BBOX.py", isles_in + ["--output-dir", str(out / "isles_eval")], logs)
    mni = [str(s) for s in scale.mni_shape]
    run_stage("preprocess_brats2024_t2flair", "preprocess_brats2024_t2flair.py",
              ["--brats-dir", str(raw / "BraTS2024"), "--output-dir", str(out / "brats"), "--target-shape", *mni, "--workers", "2"], logs)
    config = read_json(REPO / "config.json")  # the paper's example, pointed at the synthetic folders
    config["output_base_dir"] = str(out / "foundation")
    config["preprocessing"]["use_gpu"] = False
    for dataset, folder in zip(config["datasets"], ("ATLAS", "UOA")):
        dataset["data_dir"] = str(raw / folder)
    write_json(out / "config.json", config)
    run_stage("preprocess_stroke_foundation", "preprocess_stroke_foundation.py", ["--config", str(out / "config.json"), "--workers", "2"], logs)
    for arch, size in scale.patch.items():
        overlap = "0.01" if arch == "resnet18" else "0.0001"  # the paper's two commands
        run_stage(f"extract_patches_{size}", "extract_patches_96x96x96.py",
                  ["--input_dir", str(out / "foundation"), "--output_dir", str(out / "foundation"), "--datasets", *STROKE_DATASETS,
                   "--patch_size", str(size), "--max_patches", "20", "--min_lesion_overlap", overlap, "--workers", "2"], logs)


def common_training_args(scale: Scale, epochs: int, fold: int) -> list[str]:
    return ["--fold", str(fold), "--epochs", str(epochs), "--width", str(scale.width), "--batch-size", str(scale.batch_size),
            "--patches-per-volume", str(scale.patches_per_volume), *scale.optim, "--workers", "0", "--resume-if-exists"]


def pretrain_brats(out: Path, scale: Scale, logs: Path) -> dict[str, Path]:
    """BraTS pretraining of both architectures (fold 0); returns arch -> best checkpoint."""
    run_dirs = {arch: out / "runs" / f"brats_{arch}" for arch in ARCHS}
    run_stages([Stage(f"train_brats_{arch}", "train_brats_uctransnet3d.py",
                      ("--brats-dir", str(out / "brats"), "--output-dir", str(run_dir), "--arch", arch, "--patch-size", str(scale.patch[arch]),
                       *common_training_args(scale, scale.epochs_brats, 0)))
                for arch, run_dir in run_dirs.items()], logs, parallel=2)
    return {arch: run_dir / "fold_0" / "best_model.pth" for arch, run_dir in run_dirs.items()}


def train_isles(out: Path, scale: Scale, logs: Path, brats: dict[str, Path]) -> dict[str, Path]:
    """The five ISLES strategies, every demo fold; returns label -> run folder."""
    runs = {}
    for label, strategy, init in ISLES_RUNS:
        run_dir = out / "runs" / f"isles_{label}"
        init_args = ["--init", init] + (["--pretrain-ckpt", str(brats["resnet18"])] if init == "brats" else [])
        run_stages([Stage(f"train_isles_{label}_fold{fold}", "train_isles_resnet18.py",
                          ("--isles-dir", str(out / "isles_train"), "--output-dir", str(run_dir), "--strategy", strategy, *init_args,
                           *common_training_args(scale, scale.epochs_isles, fold))) for fold in scale.folds], logs, parallel=2)
        runs[label] = run_dir
    return runs


def train_stroke(out: Path, scale: Scale, logs: Path, brats: dict[str, Path], dataset: str) -> dict[str, Path]:
    """Transfer vs scratch for both architectures on ATLAS or UOA; returns label -> run folder."""
    runs = {}
    for arch in ARCHS:
        for arm in ("transfer", "scratch"):
            label = f"{arch}_{arm}"
            run_dir = out / "runs" / f"{dataset.lower()}_{label}"
            init_args = ["--pretrain-ckpt", str(brats[arch])] if arm == "transfer" else []
            run_stages([Stage(f"train_{dataset}_{label}_fold{fold}", "train_stroke.py",
                              ("--dataset", dataset, "--data-dir", str(out / "foundation"), "--arch", arch, "--output-dir", str(run_dir),
                               "--patch-size", str(scale.patch[arch]), *init_args,
                               *common_training_args(scale, scale.epochs_stroke[arch], fold))) for fold in scale.folds], logs, parallel=2)
            runs[label] = run_dir
    return runs


def evaluate(out: Path, logs: Path, dataset: str, data_args: list[str], runs: dict[str, Path], compare: tuple[str, ...]) -> str:
    """``evaluate.py`` on the held-out test set (``compare``: two run labels for a paired test,
    or empty); returns its Markdown tables."""
    eval_dir = out / "results" / dataset
    run_args = [arg for label, run_dir in runs.items() for arg in ("--run", f"{label}={run_dir}")]
    compare_args = ["--compare", *compare] if compare else []
    run_stage(f"evaluate_{dataset}", "evaluate.py",
              ["--dataset", dataset, *data_args, *run_args, *compare_args, "--output-dir", str(eval_dir)], logs)
    return (eval_dir / "results.md").read_text()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_run"), help="output folder (default demo_run)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default 0)")
    parser.add_argument("--full", action="store_true", help="the paper's sizes (width 64, 96³/64³ patches, 5 folds, 100 epochs): for a GPU machine")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = get_logger()
    scale = FULL if args.full else SMALL
    out = args.out.resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    write_run_args(out, args)
    start = time.perf_counter()
    generate_data(out / "raw", scale, args.seed)
    preprocess(out, scale, logs)
    brats = pretrain_brats(out, scale, logs)
    isles_runs = train_isles(out, scale, logs, brats)
    isles_data = ["--data-dir", str(out / "isles_eval"), "--splits-file", str(out / "isles_train" / "isles2022_splits_5fold.json")]
    tables = [evaluate(out, logs, "ISLES2022", isles_data, isles_runs, ("shared_scratch", "shared_brats") if scale.compare else ())]
    for dataset in STROKE_DATASETS:
        runs = train_stroke(out, scale, logs, brats, dataset)
        compare = ("resnet18_transfer", "resnet18_scratch") if scale.compare else ()
        tables.append(evaluate(out, logs, dataset, ["--data-dir", str(out / "foundation")], runs, compare))
    report = "\n\n".join(tables)
    write_text(out / "results.md", report + "\n")
    print("\n" + report + "\n", flush=True)
    log.info(f"demo finished in {(time.perf_counter() - start) / 60:.1f} min; tables in {out / 'results.md'}, per-stage outputs and logs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
