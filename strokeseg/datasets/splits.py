"""Cross-validation splits as files: a fixed held-out test set plus K disjoint train/val folds.

File shape (the original repository's, so its split files load too)::

    {"fold_0": {"ISLES2022": {"train": [...], "val": [...], "test": [...]}}, "fold_1": ...}

Test and folds are stratified by lesion volume (cases sorted by volume, dealt out from blocks of
similar volume) and optionally grouped (all visits of one patient go to the same side).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..core.io import CaseError, read_json, write_json
from ..core.runner import get_logger

__all__ = [
    "Split",
    "make_splits",
    "load_split",
    "validate_splits",
    "write_splits_once",
    "write_stage_splits",
    "SPLIT_SETTINGS",
    "add_rebuild_splits_argument",
]

IN_NO_FOLD = "preprocessed case(s) are in no fold"  # the warning strokeseg.ablation looks for in a stage's log
# Stage settings that shape only the splits file: --rebuild-splits may change them.
SPLIT_SETTINGS = ("test_fraction", "seed")
REBUILD_HINT = (
    "rerun the same command with --rebuild-splits to deal the folds again from every preprocessed case "
    "(nothing is preprocessed again; the folds change, so retrain every fold)"
)


@dataclass(frozen=True)
class Split:
    """Case ids of one fold: train and val are disjoint, test is the fixed held-out set."""

    train: list[str]
    val: list[str]
    test: list[str]


def _group_volumes(
    case_ids: Sequence[str], volumes: Mapping[str, float], groups: Mapping[str, str] | None
) -> dict[str, float]:
    """Mean lesion volume per group (a group is one case when ``groups`` is None)."""
    members: dict[str, list[float]] = {}
    for case_id in case_ids:
        key = groups[case_id] if groups else case_id
        members.setdefault(key, []).append(float(volumes[case_id]))
    return {key: float(np.mean(vals)) for key, vals in members.items()}


def _stratified_assign(keys_by_volume: list[str], n_bins: int, rng: np.random.Generator) -> dict[str, int]:
    """Deal keys (sorted by volume) into ``n_bins`` bins: each block of ``n_bins`` consecutive keys
    is shuffled and spread one per bin, so every bin covers the whole volume range."""
    assignment: dict[str, int] = {}
    offset = 0
    for start in range(0, len(keys_by_volume), n_bins):
        block = keys_by_volume[start : start + n_bins]
        order = rng.permutation(len(block))
        for slot, idx in enumerate(order):
            assignment[block[idx]] = (slot + offset) % n_bins
        offset += len(block)  # rotate where a partial block lands so bins stay balanced
    return assignment


def make_splits(
    lesion_volumes: Mapping[str, float],
    dataset: str,
    n_folds: int = 5,
    test_fraction: float = 0.2,
    seed: int = 42,
    groups: Mapping[str, str] | None = None,
) -> dict:
    """Build the splits dictionary for ``dataset``.

    lesion_volumes: case id -> lesion volume (voxels or ml; only the order matters).
    groups: optional case id -> patient id; a patient's cases never straddle test/train/val.
    test_fraction: share of groups held out as the fixed test set (0 for none); the test set holds
    ``round(test_fraction * n_groups)`` groups (250 ISLES cases at 0.2: 50; ATLAS 655 at 0.15: 98
    and UOA 177 at 0.15: 27, where the paper reports 97 and 25, counts no simple rule reproduces).
    """
    case_ids = sorted(lesion_volumes)
    if len(set(case_ids)) != len(case_ids):
        raise ValueError("duplicate case ids")
    group_vol = _group_volumes(case_ids, lesion_volumes, groups)
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if len(group_vol) < n_folds + (1 if test_fraction > 0 else 0):
        raise ValueError(f"{len(group_vol)} patients are too few for {n_folds} folds plus a test set")
    rng = np.random.default_rng(seed)
    keys = sorted(group_vol, key=lambda k: (group_vol[k], k))

    test_keys: set[str] = set()
    n_test = int(round(test_fraction * len(keys)))
    if n_test:
        # Evenly spaced ranks over the volume order, shifted by a seeded offset: stratified.
        ranks = np.floor((np.arange(n_test) + rng.random()) * len(keys) / n_test).astype(int)
        test_keys = {keys[r] for r in ranks}
    cv_keys = [k for k in keys if k not in test_keys]
    fold_of = _stratified_assign(cv_keys, n_folds, rng)

    def cases_of(selected: set[str]) -> list[str]:
        return sorted(c for c in case_ids if (groups[c] if groups else c) in selected)

    test = cases_of(test_keys)
    splits = {}
    for fold in range(n_folds):
        val_keys = {k for k in cv_keys if fold_of[k] == fold}
        train_keys = set(cv_keys) - val_keys
        splits[f"fold_{fold}"] = {dataset: {"train": cases_of(train_keys), "val": cases_of(val_keys), "test": test}}
    validate_splits(splits, groups=groups)
    return splits


def validate_splits(splits: dict, source: str | Path = "splits", groups: Mapping[str, str] | None = None) -> None:
    """Check every fold: unique ids, train/val/test pairwise disjoint, validation sets disjoint
    across folds, one test set shared by every fold of a dataset (so no case is test in one fold
    and train or val in another), and (with ``groups``) no patient on both sides. Raises
    :class:`CaseError`; files written elsewhere (the original repository's) are checked alike."""
    seen_val: dict[str, str] = {}
    first_test: dict[str, tuple[str, set[str]]] = {}
    for fold_name, per_dataset in splits.items():
        for dataset, parts in per_dataset.items():
            where = f"{source}: {fold_name}/{dataset}"
            for part in ("train", "val", "test"):
                ids = parts.get(part, [])
                if len(set(ids)) != len(ids):
                    dups = sorted({i for i in ids if ids.count(i) > 1})
                    raise CaseError(f"{where}: duplicated id(s) in {part}: {dups[:5]}")
            train, val, test = (set(parts.get(p, [])) for p in ("train", "val", "test"))
            for a, b, name_a, name_b in ((train, val, "train", "val"), (train, test, "train", "test"), (val, test, "val", "test")):
                overlap = a & b
                if overlap:
                    raise CaseError(f"{where}: {len(overlap)} id(s) in both {name_a} and {name_b}: {sorted(overlap)[:5]}")
            if groups:
                _check_groups(where, {"train": train, "val": val, "test": test}, groups)
            first_fold, first = first_test.setdefault(dataset, (fold_name, test))
            if test != first:
                changed = sorted(test ^ first)
                raise CaseError(f"{where}: test set differs from {first_fold}'s in {len(changed)} case(s), e.g. {changed[:5]}; every fold must share one held-out test set")
            for case_id in val:
                other = seen_val.setdefault(f"{dataset}/{case_id}", fold_name)
                if other != fold_name:
                    raise CaseError(f"{source}: {case_id} is in the validation sets of {other} and {fold_name}")


def _check_groups(where: str, parts: Mapping[str, set[str]], groups: Mapping[str, str]) -> None:
    """Raise when one patient (group) has cases in two of train/val/test."""
    patients = {name: {groups[c] for c in ids if c in groups} for name, ids in parts.items()}
    names = list(patients)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            crossing = patients[a] & patients[b]
            if crossing:
                raise CaseError(f"{where}: patient(s) in both {a} and {b}: {sorted(crossing)[:5]}")


def load_split(path: str | Path, fold: int, dataset: str | None = None) -> Split:
    """Read fold ``fold`` of a splits file, validating the whole file first.

    ``dataset`` picks the dataset key; when None the fold must hold exactly one dataset.
    Raises :class:`CaseError` naming the file on any problem.
    """
    splits = read_json(path)
    if not isinstance(splits, dict) or not splits:
        raise CaseError(f"{path}: not a splits file (expected {{'fold_0': {{dataset: {{...}}}}}})")
    key = f"fold_{fold}"
    if key not in splits:
        raise CaseError(f"{path}: no {key}; folds present: {sorted(splits)}")
    validate_splits(splits, source=path)
    per_dataset = splits[key]
    if dataset is None:
        if len(per_dataset) != 1:
            raise CaseError(f"{path}: {key} holds datasets {sorted(per_dataset)}; name one")
        dataset = next(iter(per_dataset))
    if dataset not in per_dataset:
        raise CaseError(f"{path}: {key} has no dataset {dataset!r}; has {sorted(per_dataset)}")
    parts = per_dataset[dataset]
    if not parts.get("train") or not parts.get("val"):
        raise CaseError(f"{path}: {key}/{dataset} needs non-empty 'train' and 'val' lists")
    return Split(train=list(parts["train"]), val=list(parts["val"]), test=list(parts.get("test", [])))


def write_splits_once(
    path: Path,
    lesion_volumes: Mapping[str, float],
    dataset: str,
    test_fraction: float,
    seed: int,
    groups: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> dict:
    """Write the 5-fold splits file unless it exists; an existing file is kept (folds must not move
    under running experiments) and a warning is logged when its cases differ from ``lesion_volumes``."""
    log = get_logger()
    if path.exists() and not overwrite:
        existing = read_json(path)
        validate_splits(existing, source=path, groups=groups)
        listed = {c for per_ds in existing.values() for parts in per_ds.values() for ids in parts.values() for c in ids}
        unlisted, gone = sorted(set(lesion_volumes) - listed), sorted(listed - set(lesion_volumes))
        if unlisted:
            log.info(
                f"WARNING {path}: kept the existing folds; {len(unlisted)} {IN_NO_FOLD}, so no "
                f"training, validation or test uses them: {unlisted[:10]}. To add them, {REBUILD_HINT}"
            )
        if gone:
            log.info(f"WARNING {path}: {len(gone)} case(s) in the folds have no preprocessed output: {gone[:10]}")
        if not unlisted and not gone:
            log.info(f"kept existing splits {path}")
        return existing
    splits = make_splits(lesion_volumes, dataset, test_fraction=test_fraction, seed=seed, groups=groups)
    write_json(path, splits)
    fold0 = splits["fold_0"][dataset]
    log.info(f"wrote {path}: {len(fold0['test'])} test cases, 5 folds of ~{len(fold0['val'])} val / {len(fold0['train'])} train")
    return splits


def write_stage_splits(
    path: Path,
    case_ids: Sequence[str],
    lesion_volume: Callable[[str], float],
    dataset: str,
    test_fraction: float,
    seed: int,
    overwrite: bool,
    groups: Mapping[str, str] | None = None,
    required: bool = True,
) -> int:
    """The last step of every preprocessing stage: :func:`write_splits_once` over ``case_ids``,
    the cases with output in the stage's folder (done or skipped by this run, or every case on
    disk with ``--rebuild-splits``, which passes ``overwrite``).

    lesion_volume: a case id's lesion volume (any fixed unit; it only orders the cases for
    stratification); groups: case id -> patient id (optional).
    Returns 0, or 1 after logging why: no case has output, or the splits cannot be made (with
    ``required`` False a NOTE is logged instead and 0 returned).
    """
    log = get_logger()
    if not case_ids:
        log.info(f"ERROR no case was preprocessed; {path} not written")
        return 1
    volumes = {case_id: float(lesion_volume(case_id)) for case_id in case_ids}
    try:
        write_splits_once(
            path, volumes, dataset=dataset, test_fraction=test_fraction, seed=seed,
            groups={c: groups[c] for c in volumes} if groups is not None else None, overwrite=overwrite,
        )
    except ValueError as err:
        log.info(f"{'ERROR' if required else 'NOTE'} {dataset}: cannot write splits: {err}")
        return int(required)
    return 0


def add_rebuild_splits_argument(parser: argparse.ArgumentParser) -> None:
    """``--rebuild-splits``: the flag of every stage that writes a splits file."""
    parser.add_argument(
        "--rebuild-splits", action="store_true",
        help="only deal the folds again from every case already preprocessed in the output folder (after a fixed "
        "case was added), with the same other arguments; the folds change, so retrain every fold",
    )
