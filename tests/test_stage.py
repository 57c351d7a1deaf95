"""The one stage skeleton (strokeseg.core.stage): failed cases listed with a non-zero exit, reruns
skip outputs made with the same settings, other settings refused (or redone with overwrite),
outputs written atomically, --rebuild-splits' door check, one stage's problem not stopping the next."""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import pytest

import extract_patches_96x96x96
import models
import train_stroke
from strokeseg.core.io import CaseError, atomic_path, load_npz, read_json, save_npz
from strokeseg.core.runner import SETTINGS_NAME, CaseResult
from strokeseg.core.stage import Stage, cases_on_disk, run_stage, run_stages
from strokeseg.training.patch_stage import DEFAULT_PATCH_SIZE, patch_dir_name, patch_summary_name

BROKEN = "case2"


def _square(value: int, out_dir: Path, overwrite: bool) -> CaseResult:
    """Toy per-case function: writes ``case<value>.npz`` holding value²; ``BROKEN`` fails half-way
    through its write; a finished output is skipped unless ``overwrite``."""
    case_id = f"case{value}"
    path = out_dir / f"{case_id}.npz"
    if path.exists() and not overwrite:
        return CaseResult(case_id, "skipped", reason="output exists (use --overwrite)")
    if case_id == BROKEN:
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half an npz")
            raise CaseError(f"{case_id}.nii.gz: broken")
    save_npz(path, {"square": np.int64(value * value)})
    return CaseResult(case_id, "done", info={"square": value * value})


def _stage(out: Path, values: tuple[int, ...] = (1, 2, 3), scale: int = 1, splits_log: list | None = None) -> Stage:
    def splits(case_ids, report, overwrite) -> int:
        if splits_log is not None:
            splits_log.append((list(case_ids), report is None, overwrite))
        return 0

    return Stage(
        name="toy", label="toy", out_dir=out, settings={"scale": scale, "seed": 0},
        discover=lambda: {f"case{v}": v for v in values},
        process=functools.partial(_square, out_dir=out),
        summary_name="toy_summary.json", summary_fields={"dataset": "toy"},
        report_fields=lambda report: {"squares": sorted(r.info["square"] for r in report.by_status("done"))},
        splits=splits, split_settings=("seed",),
    )


def test_failed_case_is_listed_the_others_written_and_the_exit_is_1(tmp_path: Path) -> None:
    out, calls = tmp_path / "out", []
    assert run_stage(_stage(out, splits_log=calls), {"argv": "toy"}) == 1
    summary = read_json(out / "toy_summary.json")
    assert (summary["n_done"], summary["n_failed"]) == (2, 1)
    assert summary["failed"] == [{"case_id": BROKEN, "reason": "case2.nii.gz: broken"}]
    assert summary["dataset"] == "toy" and summary["squares"] == [1, 9]
    assert read_json(out / SETTINGS_NAME) == {"scale": 1, "seed": 0}
    assert read_json(out / "run_args.json")["args"] == {"argv": "toy"}
    assert calls == [(["case1", "case3"], False, False)]  # splits over the cases with output only
    # atomic: the broken case left neither its output nor a temporary file
    assert sorted(p.name for p in out.iterdir()) == ["case1.npz", "case3.npz", "run_args.json", SETTINGS_NAME, "toy_summary.json"]


def test_rerun_with_same_settings_skips_finished_cases(tmp_path: Path) -> None:
    out, calls = tmp_path / "out", []
    run_stage(_stage(out, values=(1, 3)), {})
    before = (out / "case1.npz").stat().st_mtime_ns
    assert run_stage(_stage(out, values=(1, 3, 4), splits_log=calls), {}) == 0
    summary = read_json(out / "toy_summary.json")
    assert (summary["n_done"], summary["n_skipped"]) == (1, 2)
    assert {s["case_id"]: s["reason"] for s in summary["skipped"]} == {"case1": "output exists (use --overwrite)", "case3": "output exists (use --overwrite)"}
    assert (out / "case1.npz").stat().st_mtime_ns == before
    assert calls == [(["case1", "case3", "case4"], False, False)]


def test_other_settings_are_refused_before_anything_is_written_and_redone_with_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_stage(_stage(out, values=(1, 3)), {})
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(CaseError, match=r"holds outputs made with other settings \(scale: 1 there, 2 now\)"):
        run_stage(_stage(out, values=(1, 3), scale=2), {})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot
    assert run_stage(_stage(out, values=(1, 3), scale=2), {}, overwrite=True) == 0
    assert read_json(out / "toy_summary.json")["n_done"] == 2
    assert read_json(out / SETTINGS_NAME)["scale"] == 2


def test_rebuild_splits_takes_the_cases_on_disk_and_lets_only_split_settings_change(tmp_path: Path) -> None:
    out, calls = tmp_path / "out", []
    run_stage(_stage(out, values=(1, 3)), {})
    (out / "case5.npz").write_bytes((out / "case1.npz").read_bytes())  # a case fixed and added by hand
    rebuilt = dataclasses.replace(_stage(out, splits_log=calls), settings={"scale": 1, "seed": 7})
    assert run_stage(rebuilt, {}, rebuild_splits=True) == 0
    assert calls == [(["case1", "case3", "case5"], True, True)]
    assert read_json(out / SETTINGS_NAME)["seed"] == 7
    with pytest.raises(CaseError, match="scale: 1 there, 3 now"):
        run_stage(_stage(out, scale=3), {}, rebuild_splits=True)
    with pytest.raises(CaseError, match="no such folder"):
        run_stage(_stage(tmp_path / "missing"), {}, rebuild_splits=True)
    assert cases_on_disk(out) == ["case1", "case3", "case5"]


def test_one_stage_failing_at_the_door_does_not_stop_the_next(tmp_path: Path, capsys) -> None:
    def missing() -> Stage:
        raise CaseError(f"{tmp_path / 'nowhere'}: dataset folder not found")

    status = run_stages([missing, lambda: _stage(tmp_path / "b", values=(1,))], {})
    assert status == 1
    assert f"ERROR {tmp_path / 'nowhere'}: dataset folder not found" in capsys.readouterr().out
    assert load_npz(tmp_path / "b" / "case1.npz")["square"] == 1
    assert run_stages([lambda: _stage(tmp_path / "c", values=(1,))], {}) == 0


def test_patch_folder_name_and_default_have_one_home(tmp_path: Path) -> None:
    assert DEFAULT_PATCH_SIZE == models.arch_spec("resnet18").default_patch == 96
    args = extract_patches_96x96x96.parse_args(["--input_dir", str(tmp_path), "--output_dir", str(tmp_path)])
    assert args.patch_size == DEFAULT_PATCH_SIZE
    assert patch_dir_name("ATLAS", 64) == "ATLAS_patches_64" and patch_summary_name("ATLAS", 64) == "ATLAS_64_summary.json"
    train = train_stroke.parse_args(["--data-dir", str(tmp_path), "--dataset", "ATLAS", "--fold", "0", "--output-dir", str(tmp_path / "run"), "--patch-size", "48"])
    assert train.patch_dir == tmp_path / patch_dir_name("ATLAS", 48)
