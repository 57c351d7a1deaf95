"""The shared per-case loop: failures collected, parallel runs equal serial ones, exit status."""
from __future__ import annotations

import functools
from pathlib import Path

from strokeseg.core.io import CaseError, read_json
from strokeseg.core.runner import CaseResult, finish, run_cases


def _square(value: int, fail_on: int) -> CaseResult:
    if value == fail_on:
        raise CaseError(f"case{value}.nii.gz: broken")
    if value < 0:
        return CaseResult(f"case{value}", "skipped", reason="output exists")
    return CaseResult(f"case{value}", "done", info={"square": value * value})


def test_failures_are_collected_and_summarised(tmp_path: Path) -> None:
    cases = {f"case{v}": v for v in (-1, 1, 2, 3)}
    report = run_cases(cases, functools.partial(_square, fail_on=2))
    assert [r.status for r in sorted(report.results, key=lambda r: r.case_id)] == ["skipped", "done", "failed", "done"]
    status = finish(tmp_path / "summary.json", report, {"dataset": "toy"})
    summary = read_json(tmp_path / "summary.json")
    assert status == 1
    assert summary["failed"] == [{"case_id": "case2", "reason": "case2.nii.gz: broken"}]
    assert summary["skipped"] == [{"case_id": "case-1", "reason": "output exists"}]
    assert (summary["n_done"], summary["dataset"]) == (2, "toy")


def test_parallel_run_matches_serial_and_survives_unexpected_errors() -> None:
    cases = {f"case{v}": v for v in range(5)}
    process = functools.partial(_square, fail_on=3)
    serial = {r.case_id: (r.status, r.info) for r in run_cases(cases, process).results}
    parallel = {r.case_id: (r.status, r.info) for r in run_cases(cases, process, workers=2).results}
    assert serial == parallel
    report = run_cases({"x": None}, functools.partial(_square, fail_on=3))  # None < 0 raises TypeError
    assert report.results[0].status == "failed" and report.results[0].reason.startswith("TypeError")
