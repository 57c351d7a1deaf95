"""Collect the JSON files that ``benchmarks/gpu_check.sh`` has its benchmarks write into OUT_DIR
into one ``OUT_DIR/gpu_check.json`` and one ``OUT_DIR/gpu_check.md`` (tables to copy into
README.md's "Resources per stage" and benchmarks/README.md).

    python benchmarks/gpu_check_report.py OUT_DIR [--dry-run]

Inputs (each optional: a missing one is reported as missing): train_step.json
(bench_train_step.py), data_pipeline.json (bench_data_pipeline.py), evaluate_fold.json and
predict.json (bench_predict.py with 1 fold and with 5 folds), roofline.json (bench_roofline.py).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

SOURCES = {
    "train_step": "bench_train_step.py: training steps at the paper's patch and batch sizes",
    "data_pipeline": "bench_data_pipeline.py: loader patches/s",
    "evaluate_fold": "bench_predict.py --folds 1: whole-volume inference per case per fold",
    "predict": "bench_predict.py --folds 5: predict.py per case, 5-fold ensemble",
    "roofline": "bench_roofline.py: forward FLOP/s against the same run's matmul peak",
}


def load_sources(out_dir: Path) -> dict:
    """{name: parsed JSON or None} for every file of :data:`SOURCES` in ``out_dir``."""
    found = {}
    for name in SOURCES:
        path = out_dir / f"{name}.json"
        found[name] = json.loads(path.read_text()) if path.is_file() else None
    return found


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _mib(value: float) -> str:
    return "— (CPU)" if value is None or value != value else f"{value:.0f}"  # null (NaN): not measured on the CPU


def train_section(rows: list[dict], loader: list[dict] | None) -> list[str]:
    """Steps/s and peak memory per network; the loader's patches/s against the patches/s the
    training step consumes."""
    loader_rate = loader[0]["patches_per_s"] if loader else None
    table = []
    for r in rows:
        samples = r["amp_channels_last"]
        ratio = f"{loader_rate / samples:.1f}x" if loader_rate else "not measured"
        table.append([r["network"], f"{r['patch']}³", r["batch"], f"{samples / r['batch']:.2f}", f"{samples:.1f}",
                      _mib(r["amp_channels_last_peak_mib"]), ratio])
    header = ["network", "patch", "batch", "steps/s (AMP)", "patches/s consumed", "peak MiB", "loader / consumed"]
    return _table(header, table)


def predict_section(name: str, data: dict) -> list[str]:
    s, cases = data["settings"], data["cases"]
    mean = {key: sum(c[key] for c in cases) / len(cases) for key in ("wall_s", "forward_s", "floor_s", "windows")}
    title = f"{name}: {s['folds']} fold(s), width {s['width']}, window {s['window']}, {s['precision']}, TTA {s['tta']}, {s['device']}"
    row = [f"{mean['wall_s']:.2f}", f"{mean['forward_s']:.2f}", f"{mean['windows']:.0f}", f"{mean['floor_s']:.2f}",
           f"{mean['wall_s'] / mean['floor_s']:.2f}"]
    return [f"**{title}** (mean of {len(cases)} case(s))", ""] + _table(["s per case", "forward s", "windows", "FLOP floor s", "wall / floor"], [row])


def roofline_section(rows: list[dict]) -> list[str]:
    table = [[r["network"], f"{r['window']}³", r["config"].get("width", "default"), r["device"], r["precision"], f"{r['gflop']:.1f}",
              f"{r['forward_s']:.3f}", f"{r['tflops']:.3f}", f"{r['matmul_tflops']:.3f}", f"{r['fraction']:.1%}"] for r in rows]
    return _table(["network", "window", "width", "device", "dtype", "GFLOP per window", "s per window", "TFLOP/s", "matmul TFLOP/s", "fraction"], table)


def markdown(found: dict, machine: dict) -> str:
    mode = " (DRY RUN: CPU, tiny sizes; the figures mean nothing)" if machine["dry_run"] else ""
    lines = [f"# GPU check{mode}", "", f"Device: {machine['device']}; torch {machine['torch']}; Python {machine['python']}.", ""]
    if found["train_step"]:
        lines += ["## Training", ""] + train_section(found["train_step"], found["data_pipeline"]) + [""]
    if found["data_pipeline"]:
        lines += [f"Loader: {r['layout']} {r['patches_per_s']:.1f} patches/s ({r['patch']}³, {r['workers']} workers)" for r in found["data_pipeline"]] + [""]
    for name in ("evaluate_fold", "predict"):
        if found[name]:
            lines += [f"## {SOURCES[name]}", ""] + predict_section(name, found[name]) + [""]
    if found["roofline"]:
        lines += ["## Roofline", ""] + roofline_section(found["roofline"]) + [""]
    missing = [f"{name}.json ({what})" for name, what in SOURCES.items() if found[name] is None]
    lines += ["Missing: " + "; ".join(missing) if missing else "All figures present.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="the folder gpu_check.sh wrote its JSON files into")
    parser.add_argument("--dry-run", action="store_true", help="mark the report as a CPU dry run")
    args = parser.parse_args(argv)
    found = load_sources(args.out_dir)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.dry_run else f"CPU ({platform.processor() or platform.machine()})"
    machine = {"device": device, "torch": torch.__version__, "python": platform.python_version(), "dry_run": args.dry_run}
    report = {"machine": machine, **found}
    for name, text in (("gpu_check.json", json.dumps(report, indent=1)), ("gpu_check.md", markdown(found, machine))):
        temporary = args.out_dir / f".{name}.tmp"
        temporary.write_text(text)
        temporary.replace(args.out_dir / name)
    print(f"wrote {args.out_dir / 'gpu_check.md'} and {args.out_dir / 'gpu_check.json'}")
    missing = [name for name, data in found.items() if data is None]
    if missing:
        print(f"missing figures: {', '.join(missing)}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
