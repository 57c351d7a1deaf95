"""Validation of an ablation grid (the ``ablation.json`` schema of :mod:`strokeseg.ablation`).

:func:`validate_grid` checks the whole grid when it is loaded, before any task runs, and raises
ValueError with one line naming the key (``isles.arms[2][0]: unknown strategy 'shard' ...``).
Architectures and datasets are looked up in their registries; ISLES strategies in
:data:`models.ISLES_STRATEGIES` (separate, shared, dwi_only).
"""
from __future__ import annotations

from typing import Any, Mapping

from models import ISLES_STRATEGIES, arch_names

from ..datasets.registry import dataset_names, dataset_spec

__all__ = ["validate_grid", "PLACEHOLDER"]

N_FOLDS = 5  # the splits files hold fold_0 .. fold_4 (strokeseg.datasets.splits.make_splits)
PLACEHOLDER = "/path/to"  # the shipped ablation.json's paths that must be replaced
ISLES_INITS = ("scratch", "brats")
STROKE_ARMS = ("transfer", "scratch")
TOP_KEYS = ("work_dir", "data", "folds", "architectures", "isles", "stroke", "compare", "epochs", "args", "resources")
EPOCH_KINDS = ("train_brats", "train_isles", "train_stroke")
ARG_KINDS = ("preprocess_isles", "preprocess_brats", "preprocess_foundation", "extract_patches", "train", *EPOCH_KINDS, "evaluate")
RESOURCE_KINDS = ("preprocess", "extract_patches", *EPOCH_KINDS, "evaluate")


def _fail(key: str, problem: str) -> None:
    raise ValueError(f"{key}: {problem}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _table(grid: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = grid.get(key)
    if not isinstance(value, Mapping):
        _fail(key, "missing" if value is None else f"must be an object, got {type(value).__name__}")
    return value


def _list(value: Any, key: str) -> list:
    if not isinstance(value, list):
        _fail(key, f"must be a list, got {value!r}")
    return value


def _folds(grid: Mapping[str, Any]) -> None:
    folds = _list(grid.get("folds"), "folds")
    if not folds:
        _fail("folds", "empty: name at least one fold")
    for i, fold in enumerate(folds):
        if not _is_int(fold) or not 0 <= fold < N_FOLDS:
            _fail(f"folds[{i}]", f"must be an integer 0..{N_FOLDS - 1}, got {fold!r}")
    if len(set(folds)) != len(folds):
        _fail("folds", f"duplicate fold in {folds}")


def _architectures(grid: Mapping[str, Any]) -> None:
    archs = _table(grid, "architectures")
    if not archs:
        _fail("architectures", "empty")
    for arch, spec in archs.items():
        if arch not in arch_names():
            _fail(f"architectures.{arch}", f"unknown architecture (known: {', '.join(arch_names())})")
        if not isinstance(spec, Mapping):
            _fail(f"architectures.{arch}", "must be an object with patch_size and min_lesion_overlap")
        if not _is_int(spec.get("patch_size")) or spec["patch_size"] <= 0:
            _fail(f"architectures.{arch}.patch_size", f"must be a positive integer, got {spec.get('patch_size')!r}")
        overlap = spec.get("min_lesion_overlap")
        if not isinstance(overlap, (int, float)) or isinstance(overlap, bool) or not 0 <= overlap <= 1:
            _fail(f"architectures.{arch}.min_lesion_overlap", f"must be a number in [0, 1], got {overlap!r}")


def _pairs(value: Any, key: str, choices: tuple[tuple[str, ...], ...]) -> None:
    for i, pair in enumerate(_list(value, key)):
        if not isinstance(pair, list) or len(pair) != len(choices):
            _fail(f"{key}[{i}]", f"must be a list of {len(choices)} names, got {pair!r}")
        for j, (item, allowed) in enumerate(zip(pair, choices)):
            if item not in allowed:
                _fail(f"{key}[{i}][{j}]", f"unknown {item!r} (one of {', '.join(allowed)})")
    if len({tuple(p) for p in value}) != len(value):
        _fail(key, "a pair appears twice")


def _arms(grid: Mapping[str, Any]) -> dict[str, set[str]]:
    """Check the ISLES and stroke sections; the run labels of each evaluated dataset."""
    isles, stroke = _table(grid, "isles"), _table(grid, "stroke")
    if isles.get("pretrain_arch") not in grid["architectures"]:
        _fail("isles.pretrain_arch", f"must be one of architectures, got {isles.get('pretrain_arch')!r}")
    _pairs(isles.get("arms"), "isles.arms", (ISLES_STRATEGIES, ISLES_INITS))
    datasets = _list(stroke.get("datasets"), "stroke.datasets")
    for i, name in enumerate(datasets):
        if name not in dataset_names() or dataset_spec(name).brain_key is None:  # train_stroke.py's datasets
            known = [n for n in dataset_names() if dataset_spec(n).brain_key is not None]
            _fail(f"stroke.datasets[{i}]", f"unknown stroke dataset {name!r} (known: {', '.join(known)})")
    if len(set(datasets)) != len(datasets):
        _fail("stroke.datasets", "a dataset appears twice")
    arms = _list(stroke.get("arms"), "stroke.arms")
    for i, arm in enumerate(arms):
        if arm not in STROKE_ARMS:
            _fail(f"stroke.arms[{i}]", f"unknown arm {arm!r} (one of {', '.join(STROKE_ARMS)})")
    labels = {name: {f"{a}_{arm}" for a in grid["architectures"] for arm in arms} for name in datasets}
    if isles["arms"]:
        labels["ISLES2022"] = {f"{s}_{i}" for s, i in isles["arms"]}
    return labels


def _compare(grid: Mapping[str, Any], labels: Mapping[str, set[str]]) -> None:
    for dataset, pairs in grid.get("compare", {}).items():
        key = f"compare.{dataset}"
        if dataset not in labels:
            _fail(key, f"not an evaluated dataset of this grid ({', '.join(labels)})")
        _pairs(pairs, key, (tuple(sorted(labels[dataset])),) * 2)


def _per_arch(section: Mapping[str, Any], kind: str, key: str, archs: Mapping[str, Any], check) -> None:
    value = section.get(kind)
    if isinstance(value, Mapping):
        for arch, item in value.items():
            if arch not in archs:
                _fail(f"{key}.{kind}.{arch}", "not one of architectures")
            check(item, f"{key}.{kind}.{arch}")
    elif value is not None:
        check(value, f"{key}.{kind}")


def _epochs(value: Any, key: str) -> None:
    if not _is_int(value) or value <= 0:
        _fail(key, f"must be a positive integer, got {value!r}")


def _args(value: Any, key: str) -> None:
    for i, arg in enumerate(_list(value, key)):
        if not isinstance(arg, (str, int, float)) or isinstance(arg, bool):
            _fail(f"{key}[{i}]", f"must be a string or number, got {arg!r}")


def _settings(grid: Mapping[str, Any]) -> None:
    """epochs, args and resources: known kinds, values of the right type."""
    archs = grid["architectures"]
    for section, kinds, check in (("epochs", EPOCH_KINDS, _epochs), ("args", ARG_KINDS, _args)):
        table = _table(grid, section) if section == "epochs" else grid.get(section, {})
        for kind in table:
            if kind not in kinds:
                _fail(f"{section}.{kind}", f"unknown stage kind (one of {', '.join(kinds)})")
            _per_arch(table, kind, section, archs, check)
    for kind in EPOCH_KINDS:
        value = grid["epochs"].get(kind)
        if value is None:
            _fail(f"epochs.{kind}", "missing")
        for arch in archs if isinstance(value, Mapping) else ():
            if arch not in value:
                _fail(f"epochs.{kind}.{arch}", "missing: a table per architecture names every architecture")
    resources = _table(grid, "resources")
    for kind in RESOURCE_KINDS:
        res = resources.get(kind)
        if not isinstance(res, Mapping):
            _fail(f"resources.{kind}", "missing")
        for field, minimum in (("gpus", 0), ("cpus", 1)):
            if not _is_int(res.get(field, minimum)) or res.get(field, minimum) < minimum:
                _fail(f"resources.{kind}.{field}", f"must be an integer >= {minimum}, got {res.get(field)!r}")
        for field in ("memory", "time"):
            if not isinstance(res.get(field, ""), str):
                _fail(f"resources.{kind}.{field}", f"must be a string, got {res.get(field)!r}")
        if unknown := sorted(set(res) - {"gpus", "cpus", "memory", "time"}):
            _fail(f"resources.{kind}.{unknown[0]}", "unknown field (gpus, cpus, memory, time)")


def validate_grid(grid: Any) -> None:
    """Raise ValueError naming the first invalid key of the ablation grid ``grid`` (parsed JSON);
    keys starting with ``_`` are comments."""
    if not isinstance(grid, Mapping):
        _fail("(top level)", "must be a JSON object")
    for key in grid:
        if key not in TOP_KEYS and not key.startswith("_"):
            _fail(key, f"unknown key (known: {', '.join(TOP_KEYS)})")
    if not isinstance(grid.get("work_dir"), str):
        _fail("work_dir", f"must be a path, got {grid.get('work_dir')!r}")
    data = _table(grid, "data")
    for key in ("isles", "brats", "foundation_config"):
        if not isinstance(data.get(key), str):
            _fail(f"data.{key}", f"must be a path, got {data.get(key)!r}")
    _folds(grid)
    _architectures(grid)
    _compare(grid, _arms(grid))
    _settings(grid)
