"""Splits: disjoint folds, fixed test set, stratification, patient grouping, and load errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from strokeseg.core.io import CaseError, write_json
from strokeseg.datasets.splits import load_split, make_splits, validate_splits, write_splits_once


def _volumes(n: int, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    return {f"case{i:03d}": float(v) for i, v in enumerate(rng.lognormal(8.0, 1.5, n))}


def _parts(splits: dict, dataset: str) -> list[dict[str, list[str]]]:
    return [splits[f"fold_{k}"][dataset] for k in range(5)]


@pytest.mark.parametrize("n, fraction, n_test", [(250, 0.2, 50), (655, 0.15, 98), (177, 0.15, 27), (30, 0.0, 0)])
def test_folds_disjoint_test_fixed_every_case_validated_once(n: int, fraction: float, n_test: int) -> None:
    volumes = _volumes(n)
    splits = make_splits(volumes, "DS", test_fraction=fraction, seed=3)
    assert sorted(splits) == [f"fold_{k}" for k in range(5)]
    parts = _parts(splits, "DS")
    test = set(parts[0]["test"])
    assert len(test) == n_test
    vals: list[str] = []
    for p in parts:
        assert set(p["test"]) == test
        for key in ("train", "val", "test"):
            assert len(set(p[key])) == len(p[key])
        assert not set(p["train"]) & set(p["val"]) and not (set(p["train"]) | set(p["val"])) & test
        assert set(p["train"]) | set(p["val"]) | test == set(volumes)
        vals += p["val"]
    assert sorted(vals) == sorted(set(volumes) - test)
    sizes = [len(p["val"]) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_stratification_balances_lesion_volumes() -> None:
    volumes = _volumes(300, seed=5)
    splits = make_splits(volumes, "DS", test_fraction=0.15, seed=1)
    overall = np.median(list(volumes.values()))
    groups = [splits["fold_0"]["DS"]["test"]] + [p["val"] for p in _parts(splits, "DS")]
    for ids in groups:
        vals = np.array([volumes[c] for c in ids])
        # Each subset spans the volume range: its median within 25 % of the whole set's (a random
        # subset of this lognormal often misses by more), and it holds small and large lesions.
        assert abs(np.median(vals) / overall - 1.0) < 0.25
        assert (vals < np.quantile(list(volumes.values()), 0.2)).any() and (vals > np.quantile(list(volumes.values()), 0.8)).any()


def test_same_seed_same_splits_other_seed_differs() -> None:
    volumes = _volumes(40)
    assert make_splits(volumes, "DS", seed=7) == make_splits(volumes, "DS", seed=7)
    assert make_splits(volumes, "DS", seed=7) != make_splits(volumes, "DS", seed=8)


def test_patients_never_straddle_train_val_test() -> None:
    volumes, groups = {}, {}
    rng = np.random.default_rng(2)
    for patient in range(40):
        visits = ("100", "101") if patient % 3 == 0 else ("100",)
        for visit in visits:
            case = f"BraTS-GLI-{patient:05d}-{visit}"
            volumes[case], groups[case] = float(rng.integers(100, 10000)), f"{patient:05d}"
    splits = make_splits(volumes, "BraTS2024", test_fraction=0.1, seed=0, groups=groups)
    for p in _parts(splits, "BraTS2024"):
        sides = [{groups[c] for c in p[key]} for key in ("train", "val", "test")]
        assert not sides[0] & sides[1] and not sides[0] & sides[2] and not sides[1] & sides[2]
    assert len({groups[c] for c in splits["fold_0"]["BraTS2024"]["test"]}) == 4  # round(0.1 * 40) patients


def test_validate_splits_catches_a_patient_across_train_and_test() -> None:
    groups = {"a-100": "a", "a-101": "a", "b-100": "b", "c-100": "c"}
    bad = {"fold_0": {"D": {"train": ["a-100", "b-100"], "val": ["c-100"], "test": ["a-101"]}}}
    with pytest.raises(CaseError, match=r"patient\(s\) in both train and test: \['a'\]"):
        validate_splits(bad, groups=groups)


def _good_file(path: Path) -> dict:
    splits = make_splits(_volumes(20), "DS", test_fraction=0.2, seed=0)
    write_json(path, splits)
    return splits


def _move_to_val(parts: dict, case: str) -> None:
    parts["train"].remove(case)
    parts["val"].append(case)


def test_load_split_reads_a_fold(tmp_path: Path) -> None:
    splits = _good_file(tmp_path / "s.json")
    split = load_split(tmp_path / "s.json", 2)
    assert split.val == splits["fold_2"]["DS"]["val"] and split.test == splits["fold_2"]["DS"]["test"]
    assert load_split(tmp_path / "s.json", 2, dataset="DS") == split


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s["fold_1"]["DS"]["train"].append(s["fold_1"]["DS"]["train"][0]), r"fold_1/DS: duplicated id\(s\) in train"),
        (lambda s: s["fold_0"]["DS"]["val"].append(s["fold_0"]["DS"]["train"][0]), r"fold_0/DS: 1 id\(s\) in both train and val"),
        (lambda s: s["fold_3"]["DS"]["val"].append(s["fold_0"]["DS"]["test"][0]), r"in both (train|val) and test"),
        (lambda s: _move_to_val(s["fold_4"]["DS"], s["fold_0"]["DS"]["val"][0]), r"in the validation sets of fold_0 and fold_4"),
        (lambda s: s.pop("fold_3"), r"no fold_3; folds present"),
        (lambda s: s["fold_3"].update(OTHER=s["fold_3"]["DS"]), r"fold_3 holds datasets \['DS', 'OTHER'\]; name one"),
    ],
)
def test_load_split_errors_are_clear(tmp_path: Path, edit, message: str) -> None:
    splits = _good_file(tmp_path / "s.json")
    edit(splits)
    write_json(tmp_path / "bad.json", splits)
    with pytest.raises(CaseError, match=message):
        load_split(tmp_path / "bad.json", 3)


def test_load_split_unknown_dataset_and_missing_file(tmp_path: Path) -> None:
    _good_file(tmp_path / "s.json")
    with pytest.raises(CaseError, match=r"has no dataset 'ATLAS'; has \['DS'\]"):
        load_split(tmp_path / "s.json", 0, dataset="ATLAS")
    with pytest.raises(CaseError, match="file not found"):
        load_split(tmp_path / "none.json", 0)


def test_write_splits_once_keeps_the_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "DS_splits_5fold.json"
    first = write_splits_once(path, _volumes(20), "DS", test_fraction=0.2, seed=0)
    again = write_splits_once(path, _volumes(20), "DS", test_fraction=0.2, seed=99)
    assert again == first
    redone = write_splits_once(path, _volumes(20), "DS", test_fraction=0.2, seed=99, overwrite=True)
    assert redone != first


def test_too_few_cases_is_an_error() -> None:
    with pytest.raises(ValueError, match="too few for 5 folds"):
        make_splits(_volumes(5), "DS", test_fraction=0.2)
