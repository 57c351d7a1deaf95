"""strokeseg.core.metrics' registry: voxel precision by hand (empty cases too), every entry's
empty rules, and a metric registered as one entry reaching the per-case CSV columns, summaries,
comparisons (by its direction, in its own Holm family) and the extended results tables while the
paper's tables keep their columns."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from strokeseg.core import metrics
from strokeseg.core.io import write_csv
from strokeseg.core.metrics import METRICS, PRESETS, Metric, MetricInputs, case_metrics
from strokeseg.datasets.registry import EvalCase
from strokeseg.evaluation import engine as ev
from strokeseg.evaluation import report
from strokeseg.evaluation.statistics import holm
from strokeseg.inference.tables import score_columns

SHAPE = (5, 6, 7)  # odd sizes: no axis can stand in for another


def _mask(*voxels: tuple[int, int, int]) -> np.ndarray:
    """bool SHAPE with the given voxels set."""
    mask = np.zeros(SHAPE, dtype=bool)
    for voxel in voxels:
        mask[voxel] = True
    return mask


A, B, C, D, E = (0, 0, 0), (1, 1, 1), (2, 2, 2), (3, 3, 3), (4, 5, 6)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize(
    "pred, ref, expected",
    [
        ([A, B, C, E], [A, B, C, D], 3 / 4),  # TP 3, FP 1
        ([A, B, C, D, E], [A, B, (0, 1, 0)], 2 / 5),  # TP 2, FP 3
        ([A], [A, (1, 0, 0)], 1.0),  # under-segmentation: no false positive
        ([A, E], [C], 0.0),  # no overlap
        ([], [], 1.0),  # both empty: nothing to find, nothing wrongly found
        ([], [C], 0.0),  # prediction empty, reference not: the entry's rule (not NaN)
        ([C, D], [], 0.0),  # reference empty: every predicted voxel a false positive
    ],
)
def test_voxel_precision_by_hand(pred: list, ref: list, expected: float, preset: str) -> None:
    assert case_metrics(_mask(*pred), _mask(*ref), 0.5, preset)["precision"] == pytest.approx(expected, abs=1e-15)


# key -> value when (both empty, only the prediction empty, only the reference empty); the
# non-empty mask is two face-adjacent voxels (1 ml at 0.5 ml per voxel, one lesion).
EMPTY_RULES = {
    "dice": (1.0, 0.0, 0.0),
    "abs_volume_diff_voxels": (0, 2, 2),
    "abs_volume_diff_ml": (0.0, 1.0, 1.0),
    "lesion_f1": (1.0, 0.0, 0.0),
    "abs_lesion_count_diff": (0, 1, 1),
    "precision": (1.0, 0.0, 0.0),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_entry_defines_its_empty_cases(preset: str) -> None:
    assert set(EMPTY_RULES) == set(METRICS)  # a new entry states its empty cases here too
    lesion, empty = _mask(A, (0, 0, 1)), _mask()
    pairs = [(empty, empty), (empty, lesion), (lesion, empty)]
    for key, expected in EMPTY_RULES.items():
        assert tuple(case_metrics(p, r, 0.5, preset)[key] for p, r in pairs) == expected, key


def _inputs(pred: np.ndarray, ref: np.ndarray) -> MetricInputs:
    """MetricInputs of a pair under isles22 (26-connected, any-overlap matching), built by hand."""
    match = metrics.match_lesions(*metrics.label_components(pred, 26), *metrics.label_components(ref, 26), pred & ref, None)
    return MetricInputs(pred, ref, 1.0, PRESETS["isles22"], int(pred.sum()), int(ref.sum()), int((pred & ref).sum()), match)


def test_empty_rule_takes_precedence_over_the_function() -> None:
    def fails(inputs: MetricInputs) -> float:
        raise ZeroDivisionError("called on an empty case")

    metric = Metric("x", "X", "", 2, True, fails, both_empty=1.0, pred_empty=0.25, ref_empty=0.5)
    lesion, empty = _mask(A, E), _mask()
    assert [metric.value(_inputs(p, r)) for p, r in ((empty, empty), (empty, lesion), (lesion, empty))] == [1.0, 0.25, 0.5]
    assert (_inputs(lesion, empty).n_pred_lesions, _inputs(lesion, empty).n_ref_lesions) == (2, 0)
    with pytest.raises(ZeroDivisionError):
        metric.value(_inputs(lesion, lesion))


def _fp_voxels(inputs: MetricInputs) -> int:
    """False-positive voxels |P \\ G|: 0 when P is empty."""
    return inputs.n_pred - inputs.n_overlap


@pytest.fixture(params=[False, True], ids=["lower_is_better", "higher_is_better"])
def registered(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Metric:
    """A secondary metric registered as one entry (and nothing else) for the test's duration."""
    metric = Metric("fp_voxels", "FP voxels", "", 1, request.param, _fp_voxels)
    monkeypatch.setitem(METRICS, metric.key, metric)
    return metric


def _rows(label: str, extra_fp: int) -> list[dict]:
    """Six cases scored by fold 0 and the ensemble: a cube of reference lesion per case, the
    prediction the cube plus ``extra_fp + case`` // 2 ... false-positive voxels along one edge."""
    rows = []
    for case in range(6):
        ref = np.zeros((9, 10, 11), dtype=bool)
        ref[2:4 + case % 3, 2:5, 2:5] = True
        pred = ref.copy()
        pred[8, 0, : extra_fp + case] = True
        for fold in ("fold_0", "ensemble"):
            out = case_metrics(pred, ref, 0.5, "isles22")
            rows.append({"run": label, "seed": 0, "fold": fold, "case_id": f"c{case}", **out, "ref_voxels": int(ref.sum()), "pred_voxels": int(pred.sum())})
    return rows


def _summary(label: str, rows: list[dict]) -> dict:
    """A run summary as evaluate.py builds it (describe_run's fields by hand)."""
    return {"label": label, "strategy": "S", "init": "Scratch", "folds": [0], "n_test_cases": 6, **ev.summarize_run(rows, n_bootstrap=50, seed=0)}


def test_a_registered_metric_reaches_csv_summaries_comparisons_and_tables(registered: Metric, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = {"a": _rows("a", 1), "b": _rows("b", 4)}
    assert rows["a"][0]["fp_voxels"] == 1 and rows["b"][0]["fp_voxels"] == 4
    # per-case CSV (evaluate.py) and scores.csv (predict.py): one column after the other metrics
    assert "fp_voxels" in ev.csv_columns() and "fp_voxels" in score_columns()
    write_csv(tmp_path / "per_case.csv", rows["a"] + rows["b"], ev.csv_columns())
    with open(tmp_path / "per_case.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [row["fp_voxels"] for row in table[:4]] == ["1", "1", "2", "2"]
    # summaries (summary.json): fold and ensemble summaries and the per-case values
    runs = {label: _summary(label, rows[label]) for label in rows}
    fp = json.loads(json.dumps(runs["b"]))["fold_summary"]["metrics"]["fp_voxels"]
    assert fp["fold_mean"] == pytest.approx(np.mean([4, 5, 6, 7, 8, 9]))
    assert set(runs["a"]["per_case"]["fp_voxels"]) == {f"c{case}" for case in range(6)}
    # comparisons: the direction says which run the difference favours; the Holm family is the role's
    preset = PRESETS["isles22"]
    assert "fp_voxels" in preset.report_metrics and "fp_voxels" not in preset.table_metrics
    (comp,) = ev.compare_runs([("a", "b")], runs, preset.report_metrics, 50, 0)
    test = comp["secondary_metrics"]["fp_voxels"]
    assert test["mean_difference"] == pytest.approx(-3.0)
    assert test["favours"] == ("b" if registered.higher_is_better else "a")
    assert comp["secondary_metrics"]["precision"]["favours"] == "a"  # higher precision is better, a has fewer FP voxels
    assert tuple(comp["metrics"]) == preset.table_metrics
    (primary_only,) = ev.compare_runs([("a", "b")], runs, preset.table_metrics, 50, 0)
    assert comp["metrics"] == primary_only["metrics"]  # the paper's p-values and Holm p-values are untouched
    secondary = [t["p_value"] for t in comp["secondary_metrics"].values()]
    assert [t["p_holm"] for t in comp["secondary_metrics"].values()] == pytest.approx(holm(secondary))
    # results.md: extended tables show it; the paper's table keeps its columns
    preset_record = ev.preset_record("isles22")
    text = report.results_markdown("ATLAS", list(runs.values()), preset_record, [comp], "test", report.scoring_record(True, False))
    details = text.split("## Details")[1].split("## Distributions")[0]
    assert details.splitlines()[2].startswith("| Run | Folds | Cases | DSC | Vol Diff (ml) | Lesion F1 | Lesion Count Diff | Precision | FP voxels |")
    assert "| a | FP voxels | 3.5 ± n/a |" in text
    better = "higher" if registered.higher_is_better else "lower"
    assert f"| a − b | FP voxels ({better} is better; secondary) | 6 | -3.00 " in text
    assert "the secondary metrics form a family of their own" in text
    paper = report.atlas_table("ATLAS", [runs["a"]]), report.isles_table([runs["a"]])
    assert paper[0].splitlines()[0] == "| Dataset | Strategy | DSC ± std | Lesion F1 | Lesion Count Diff | Vol Diff (voxels) |"
    with monkeypatch.context() as without:  # the registry as before precision and the test's metric
        without.delitem(METRICS, "precision")
        without.delitem(METRICS, "fp_voxels")
        assert (report.atlas_table("ATLAS", [runs["a"]]), report.isles_table([runs["a"]])) == paper


def test_score_probability_carries_every_registered_metric(registered: Metric) -> None:
    reference = _mask(A, B)
    case = EvalCase("c0", {}, reference, np.eye(4), (1.0, 1.0, 1.0))
    probability = _mask(A, B, C, D).astype(np.float32)
    prediction, scores = ev.score_probability(probability, case, "isles22")
    assert prediction.sum() == 4 and scores["fp_voxels"] == 2 and scores["precision"] == 0.5
    assert set(METRICS) <= set(scores) and all(key in scores for key in ev.csv_columns() if key not in ("run", "seed", "fold", "case_id"))


def test_rows_without_a_secondary_metric_still_summarise_and_table() -> None:
    """Rows scored before a secondary metric was registered (an older per_case.csv): it is left out."""
    rows = [{key: value for key, value in row.items() if key != "precision"} for row in _rows("old", 1)]
    run = _summary("old", rows)
    assert "precision" not in run["fold_summary"]["metrics"] and "dice" in run["fold_summary"]["metrics"]
    text = report.results_markdown("ATLAS", [run], ev.preset_record("isles22"), [], "test", report.scoring_record(True, False))
    assert "Precision" not in text and "| Lesion Count Diff |" in text
    with pytest.raises(ValueError, match="'dice' is missing"):
        ev.summarize_run([{key: value for key, value in row.items() if key != "dice"} for row in _rows("old", 1)], 10, 0)
