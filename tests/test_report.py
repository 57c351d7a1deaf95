"""Evaluation report: number formatting, the paper's table layouts, CSV, figure selection and PNGs."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from strokeseg.evaluation import report
from strokeseg.core.io import write_csv
from strokeseg.evaluation.engine import summarize_run


@pytest.mark.parametrize(
    "mean, std, decimals, expected",
    [
        (0.63721, 0.00814, 4, "0.6372 ± 0.0081"),
        (3.1149, 0.2351, 2, "3.11 ± 0.24"),
        (7811.4, 805.6, 0, "7811 ± 806"),
        (0.7, math.nan, 4, "0.7000 ± n/a"),
    ],
)
def test_format_mean_std(mean: float, std: float, decimals: int, expected: str) -> None:
    assert report.format_mean_std(mean, std, decimals) == expected


def test_markdown_table_layout_and_bad_row() -> None:
    text = report.markdown_table(["A", "B"], [["1", "2"]])
    assert text.splitlines() == ["| A | B |", "|---|---|", "| 1 | 2 |"]
    with pytest.raises(ValueError, match="has 1 cells"):
        report.markdown_table(["A", "B"], [["1"]])


def _case(fold: int, case: int, d: float) -> dict:
    """A scored row whose metrics all follow from its Dice d (lesion F1 d/2, count 2d, 1000d voxels)."""
    lesion = {"lesion_id": 1, "ref_volume_ml": 2.0 + case, "detected": d > 0.5, "overlap_fraction": d}
    return {"seed": 0, "fold": f"fold_{fold}", "case_id": f"c{case}", "dice": d, "lesion_f1": d / 2, "abs_lesion_count_diff": 2 * d,
            "abs_volume_diff_voxels": 1000 * d, "abs_volume_diff_ml": d, "ref_volume_ml": 2.0 + case, "pred_volume_ml": 2.0 + case + d,
            "fp_lesions": case, "lesions": [lesion]}


def _run(label: str, init: str, folds: list[int], dice_by_fold: list[list[float]], strategy: str = "S") -> dict:
    rows = [_case(k, i, d) for k, values in zip(folds, dice_by_fold) for i, d in enumerate(values)]
    return {"label": label, "strategy": strategy, "init": init, "folds": folds, "n_test_cases": len(dice_by_fold[0]),
            **summarize_run(rows, n_bootstrap=50, seed=0)}


def test_atlas_table_is_mean_and_std_across_fold_means() -> None:
    # fold means 0.5 and 0.7 (cases 0.4/0.6 and 0.6/0.8): mean 0.6, sample std 0.1414
    run = _run("tr", "Transfer", [0, 1], [[0.4, 0.6], [0.6, 0.8]])
    lines = report.atlas_table("ATLAS", [run]).splitlines()
    assert lines[0] == "| Dataset | Strategy | DSC ± std | Lesion F1 | Lesion Count Diff | Vol Diff (voxels) |"
    assert lines[2] == "| ATLAS | Transfer | 0.6000 ± 0.1414 | 0.3000 ± 0.0707 | 1.20 ± 0.28 | 600 ± 141 |"


def test_atlas_table_adds_folds_column_and_disambiguates_duplicates() -> None:
    all5 = _run("scratch_all", "Scratch", list(range(5)), [[0.5]] * 5)
    gn = _run("scratch_gn", "Scratch", [2, 3, 4], [[0.5]] * 3)
    lines = report.atlas_table("UOA", [all5, gn]).splitlines()
    assert lines[0].startswith("| Dataset | Strategy | Folds | DSC ± std |")
    assert lines[2].startswith("| UOA | Scratch | all 5 | 0.5000 ± 0.0000 |")
    assert lines[3].startswith("| UOA | Scratch | f2–4 |")
    twins = report.atlas_table("UOA", [all5, {**all5, "label": "again"}]).splitlines()
    assert "Scratch (scratch_all)" in twins[2] and "Scratch (again)" in twins[3]


def test_isles_table_and_paper_names() -> None:
    assert report.paper_strategy({"strategy": "shared"}, {}, "x") == "Shared encoder (DWI+ADC avg)"
    assert report.paper_strategy({}, {"variant": "separate"}, "x") == "Separate encoders (DWI only)"
    assert report.paper_strategy({}, {"arch": "uctransnet3d"}, "mylabel") == "mylabel"
    assert report.paper_init("brats", "x", "ISLES2022") == "BraTS"
    assert report.paper_init("transfer", "x", "ATLAS") == "Transfer"
    assert report.paper_init("scratch", "x", "ATLAS") == "Scratch"
    assert report.paper_init(None, "mylabel", "ATLAS") == "mylabel"
    run = _run("a", "Scratch", [0, 1, 2], [[0.70], [0.71], [0.72]], strategy="DWI-only baseline")
    lines = report.isles_table([run]).splitlines()
    assert lines[0] == "| Strategy | Init | Mean DSC |"
    assert lines[2] == "| DWI-only baseline | Scratch | 0.7100 ± 0.0100 |"


def test_results_markdown_names_preset_sections_failures_and_comparisons() -> None:
    run = _run("a", "Scratch", [0, 1], [[0.4, 0.6], [0.6, 0.8]])
    run["n_test_cases"] = 3
    run["failed"] = [{"case_id": "a/c9", "reason": "c9.npz does not exist"}]
    test = {"n": 6, "mean_difference": 0.05, "ci95": [-0.01, 0.1], "median_difference": 0.04, "p_value": 0.03125, "p_holm": 0.0625}
    comparisons = [{"a": "a", "b": "b", "per_case": "ensemble", "metrics": {"dice": test}}, {"a": "a", "b": "c", "error": "too few cases"}]
    preset = {"name": "atlas22", "connectivity": 6, "volume_unit": "voxels", "match_iou": None}
    text = report.results_markdown("ATLAS", [run], preset, comparisons, "test", report.scoring_record(True, False))
    assert "6-connected components (preset atlas22" in text and "Whole-volume scoring: the network ran over the whole volume" in text
    cropped = report.results_markdown("ATLAS", [run], preset, comparisons, "test", report.scoring_record(True, True))
    assert "Whole-volume scoring" not in cropped and "Brain-box inference (--brain-crop)" in cropped
    table, rest = text.split("Failed cases (not scored):\n- a/c9: c9.npz does not exist\n")
    assert "| ATLAS | Scratch | 0.6000 ± 0.1414 |" in table
    assert "| a − b | DSC (higher is better) | 6 | +0.05000 [-0.01000, 0.10000] | +0.04000 | 0.03125 | 0.0625 |" in text
    assert "- WARNING a vs c: not computed (too few cases)" in text
    details = rest.split("## Details")[1]
    # 2 of 3 listed cases scored; case c0 = mean(0.4, 0.6), c1 = mean(0.6, 0.8): distinct-case std 0.1414
    assert "| a | f0–1 | 2/3 | 0.6000 ± 0.1414 |" in details and "Vol Diff (voxels)" in details
    assert "| a | DSC | 0.6000 ± 0.1414 | 0.6000 ± 0.1414 |" in text.split("## Distributions over cases")[1]
    # volumes 2 + c + d per case over 2.0 + c: bias = mean Dice over cases 0.6; 2 cases: no limits, ICC, r
    assert "| a | 2 | 0.60 | n/a (n < 5) | n/a (n < 5) | n/a (n < 5) | n/a (n < 5) |" in text.split("## Volume agreement")[1]
    # c0 (2 ml; Dice 0.4 and 0.6: detected by 1 of 2 folds, share 0.5) and c1 (3 ml; 0.6 and 0.8: share 1):
    # 1.5 of 2 lesions; resampling the 2 cases gives 0.5, 0.75 or 1
    assert "| a | n/a [n/a, n/a] (0/0) | 0.750 [0.500, 1.000] (1.5/2) | n/a [n/a, n/a] (0/0) | 0.50 |" in text.split("## Lesion detection")[1]


def test_write_csv_round_trip(tmp_path: Path) -> None:
    rows = [{"run": "a", "case_id": "c1", "dice": 0.5, "ignored": 1}, {"run": "b", "case_id": "c2", "dice": 1.0}]
    write_csv(tmp_path / "x.csv", rows, ["run", "case_id", "dice"])
    with open(tmp_path / "x.csv", newline="") as f:
        back = list(csv.DictReader(f))
    assert back == [{"run": "a", "case_id": "c1", "dice": "0.5"}, {"run": "b", "case_id": "c2", "dice": "1.0"}]


def test_select_for_figures() -> None:
    rows = [{"case_id": c, "fold": "fold_0", "dice": d} for c, d in (("a", 0.1), ("b", 0.5), ("c", 0.9), ("d", 0.3))]
    picked = report.select_for_figures(rows, "best-median-worst")
    assert [r["case_id"] for r in picked] == ["c", "d", "a"]  # best, lower median, worst
    assert [r["case_id"] for r in report.select_for_figures(rows[:1], "best-median-worst")] == ["a"]
    assert len(report.select_for_figures(rows, "all")) == 4
    assert report.select_for_figures(rows, "none") == []
    with pytest.raises(ValueError, match="png mode"):
        report.select_for_figures(rows, "some")


def test_axial_slice_index() -> None:
    ref = np.zeros((4, 5, 6), dtype=bool)
    pred = np.zeros_like(ref)
    assert report.axial_slice_index(ref, pred) == 3  # both empty: middle
    pred[:, :, 1] = True
    assert report.axial_slice_index(ref, pred) == 1  # empty reference: most predicted slice
    ref[0, 0, 4] = True
    ref[:2, :2, 2] = True
    assert report.axial_slice_index(ref, pred) == 2  # largest reference area


def test_write_figures_draws_selected_pngs(tmp_path: Path) -> None:
    image = np.random.default_rng(0).normal(size=(12, 10)).astype(np.float32)
    mask = np.zeros((12, 10), dtype=bool)
    mask[3:6, 4:7] = True
    rows = [{"case_id": f"c{i}", "fold": "fold_0", "dice": i / 4} for i in range(4)]
    rows.append({"case_id": "c1", "fold": "ensemble", "dice": 0.2})
    slices = {(r["fold"], r["case_id"]): SimpleNamespace(image=image, reference=mask, prediction=mask, z=3) for r in rows}
    written = report.write_figures(tmp_path, rows, slices, "best-median-worst", "run")
    assert written == [tmp_path / "c1_ensemble.png"]  # ensemble rows are preferred when present
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = report.write_figures(tmp_path, rows[:4], slices, "all", "run")
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["c0_fold_0.png", "c1_ensemble.png", "c1_fold_0.png", "c2_fold_0.png", "c3_fold_0.png"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_tables_and_csv_columns_derive_from_the_metrics_table() -> None:
    from strokeseg.evaluation.engine import csv_columns
    from strokeseg.core.metrics import METRICS, PRESETS

    assert [c for c in csv_columns() if c in METRICS] == list(METRICS)
    assert PRESETS["isles22"].table_metrics == ("dice", "abs_volume_diff_ml", "lesion_f1", "abs_lesion_count_diff")
    run = _run("a", "Scratch", [0, 1], [[0.4, 0.6], [0.6, 0.8]])
    header = report.details_table([run], PRESETS["atlas22"].table_metrics).splitlines()[0]
    assert header.startswith("| Run | Folds | Cases | DSC | Vol Diff (voxels) | Lesion F1 | Lesion Count Diff |")
    row = report.details_table([run], ("abs_volume_diff_ml",)).splitlines()[2]
    assert "| 0.60 ± 0.14 |" in row  # METRICS["abs_volume_diff_ml"].decimals == 2


def test_bland_altman_png(tmp_path: Path) -> None:
    run = _run("a", "Scratch", [0, 1], [[0.4, 0.6], [0.6, 0.8]])
    report.save_bland_altman(tmp_path / "ba.png", run, "a")
    assert (tmp_path / "ba.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
