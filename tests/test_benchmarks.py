"""benchmarks/gpu_check.sh --dry-run (every step on the CPU at tiny sizes) and its report."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from benchmarks import gpu_check_report  # noqa: E402


@pytest.mark.slow(45)
def test_gpu_check_dry_run_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--dry-run"],
                          env=env, capture_output=True, text=True, timeout=900)  # a hang guard only
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["machine"]["dry_run"] is True
    assert {r["network"] for r in report["train_step"]} == {"resnet18", "uctransnet3d"}
    assert all(r["amp_channels_last"] > 0 for r in report["train_step"])
    assert report["data_pipeline"][0]["patches_per_s"] > 0
    assert report["evaluate_fold"]["settings"]["folds"] == 1 and report["predict"]["settings"]["folds"] == 5
    predict = report["predict"]["cases"][0]
    # 5 folds run 5x the windows of 1 fold on the same case
    assert predict["windows"] == 5 * report["evaluate_fold"]["cases"][0]["windows"]
    assert predict["floor_s"] == pytest.approx(predict["windows"] * predict["window_gflop"] / predict["matmul_tflops"] / 1e3)
    roofline = report["roofline"]
    assert {r["network"] for r in roofline} == set(models.arch_names())  # every registered network
    for row in roofline:
        assert row["fraction"] == pytest.approx(row["tflops"] / row["matmul_tflops"])
        assert row["gflop"] > 0
    markdown = (out / "gpu_check.md").read_text()
    for heading in ("DRY RUN", "## Training", "## Roofline", "predict", "All figures present."):
        assert heading in markdown


def test_report_lists_missing_figures_and_ratios(tmp_path: Path) -> None:
    (tmp_path / "train_step.json").write_text(json.dumps([{
        "network": "resnet18", "patch": 96, "batch": 4, "amp_channels_last": 8.0, "amp_channels_last_peak_mib": 9000.0}]))
    (tmp_path / "data_pipeline.json").write_text(json.dumps([{"layout": "uncompressed", "patches_per_s": 200.0, "patch": 96, "workers": 2}]))
    assert gpu_check_report.main([str(tmp_path)]) == 1  # three figures missing
    markdown = (tmp_path / "gpu_check.md").read_text()
    # 8 samples/s at batch 4 = 2 steps/s; the loader gives 200 / 8 = 25x what the step consumes
    assert "| resnet18 | 96³ | 4 | 2.00 | 8.0 | 9000 | 25.0x |" in markdown
    assert "Missing: evaluate_fold.json" in markdown and "roofline.json" in markdown
