"""Patch sampling (pure functions) and the patch extraction stage on foundation outputs."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import extract_patches_96x96x96
import preprocess_stroke_foundation
from strokeseg.core.io import load_npz, read_json, write_json
from strokeseg.training.data import find_case_files, read_stored_centres
from strokeseg.training.patches import (
    CENTERS_ONLY_KEYS,
    PATCH_KEYS,
    best_window_center,
    case_rng,
    clamp_centers,
    extract_patch,
    extract_patches,
    lesion_centers,
    lesion_fraction,
    random_centers,
    tissue_centers,
    window_counts,
)

REPO = Path(__file__).resolve().parents[1]
P, OVERLAP = 16, 0.08  # one synthetic lesion (242 voxels) is too small for a 16³ patch at 8 %: its fallback
EMPTY_CASE = "sub-r002s002_ses-1"  # the synthetic ATLAS case with an empty lesion mask


def _brute_fraction(mask: np.ndarray, center: np.ndarray, p: int) -> float:
    return float(extract_patch(mask, center, p).sum()) / p**3


# --------------------------------------------------------------------------- pure functions


def test_case_rng_is_stable_and_per_case() -> None:
    # Fixed value: a change of the derivation (or Python's salted hash) would move every patch.
    assert case_rng(42, "sub-r001s001_ses-1").integers(1 << 30) == case_rng(42, "sub-r001s001_ses-1").integers(1 << 30)
    assert int(case_rng(42, "UOA001").integers(1 << 30)) == 642396663
    assert case_rng(42, "UOA001").integers(1 << 30) != case_rng(42, "UOA002").integers(1 << 30)
    assert case_rng(42, "UOA001").integers(1 << 30) != case_rng(43, "UOA001").integers(1 << 30)


@pytest.mark.parametrize(
    "center, shape, p, expected",
    [
        ((0, 0, 0), (10, 12, 8), 4, (2, 2, 2)),
        ((9, 11, 7), (10, 12, 8), 4, (8, 10, 6)),
        ((5, 6, 4), (10, 12, 8), 4, (5, 6, 4)),
        ((0, 11, 3), (10, 12, 8), 5, (2, 9, 3)),
        ((9, 0, 7), (10, 12, 8), 16, (5, 6, 4)),  # axes shorter than P: volume centred in the window
    ],
)
def test_clamp_centers(center, shape, p, expected) -> None:
    assert clamp_centers(np.array([center]), shape, p).tolist() == [list(expected)]


def test_lesion_fraction_matches_brute_force_including_borders() -> None:
    rng = np.random.default_rng(0)
    mask = (rng.random((23, 19, 17)) < 0.2).astype(np.uint8)
    mask[:3] = 0
    centers = np.concatenate([rng.integers(-4, 26, (40, 3)), [[0, 0, 0], [22, 18, 16]]])
    for p in (1, 4, 7, 30):
        expected = [_brute_fraction(mask, c, p) for c in centers]
        np.testing.assert_allclose(lesion_fraction(mask, centers, p), expected, atol=1e-12)


def _blob_mask(shape=(40, 36, 30)) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[8:20, 10:22, 6:15] = 1
    mask[30:33, 2:5, 25:28] = 1
    return mask


@pytest.mark.parametrize("n, p, min_overlap", [(5, 8, 0.3), (20, 12, 0.05), (3, 16, 0.0), (50, 8, 0.5)])
def test_lesion_centers_meet_the_overlap_rule(n: int, p: int, min_overlap: float) -> None:
    mask = _blob_mask()
    centers, fallback = lesion_centers(mask, n, p, min_overlap, np.random.default_rng(1))
    assert not fallback and 1 <= len(centers) <= n and centers.dtype == np.int64
    assert len({tuple(c) for c in centers}) == len(centers)  # distinct
    assert all(_brute_fraction(mask, c, p) >= min_overlap for c in centers)
    assert np.array_equal(centers, clamp_centers(centers, mask.shape, p))  # windows inside the volume
    if min_overlap == 0.0:
        assert len(centers) == n


def test_lesion_centers_fallback_centres_a_small_focus() -> None:
    mask = np.zeros((30, 30, 30), dtype=np.uint8)
    mask[10:12, 14:16, 20:22] = 1  # 8 voxels: no 16^3 window reaches 1 %
    centers, fallback = lesion_centers(mask, 10, 16, 0.01, np.random.default_rng(0))
    # centroid (10.5, 14.5, 20.5): of the 8 equally near centres the first in C order
    assert fallback and centers.tolist() == [[10, 14, 20]]
    with pytest.raises(ValueError, match="no lesion voxel"):
        lesion_centers(np.zeros((5, 5, 5)), 1, 4, 0.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="no lesion voxel"):
        best_window_center(np.zeros((5, 5, 5)), 4)


def test_multifocal_fallback_holds_a_whole_focus_at_atlas_size() -> None:
    """Issue 13: two 512-voxel foci at x 20-27 and 170-177 of a 197x233x189 volume, 96^3 at 1 %
    (8,847 voxels needed). The centroid of all lesion voxels (x 98.5) gave a window with no lesion."""
    mask = np.zeros((197, 233, 189), dtype=np.uint8)
    mask[20:28, 100:108, 90:98] = 1
    mask[170:178, 100:108, 90:98] = 1
    centroid = np.round(np.argwhere(mask).mean(axis=0)).astype(np.int64)
    assert extract_patch(mask, centroid, 96).sum() == 0  # the old fallback window
    centers, fallback = lesion_centers(mask, 20, 96, 0.01, np.random.default_rng(0))
    assert fallback and extract_patch(mask, centers[0], 96).sum() == 512
    # x: the focus (centroid 23.5) wants centre 23, clamped to 48 (window [0, 96)); y, z centred
    assert centers.tolist() == [[48, 103, 93]]


def _brute_counts(mask: np.ndarray, p: int) -> dict[tuple[int, ...], int]:
    """Lesion voxels of every window clamp_centers allows, by centre, one extract_patch each."""
    axes = [range(p // 2, s - p + p // 2 + 1) if s >= p else [p // 2 - (p - s) // 2] for s in mask.shape]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    return {tuple(c): int(extract_patch(mask, c, p).sum()) for c in grid}


@pytest.mark.parametrize("shape, p, density", [((13, 11, 9), 4, 0.05), ((12, 7, 10), 8, 0.01), ((9, 9, 9), 5, 0.002), ((6, 14, 3), 5, 0.1)])
def test_window_counts_and_best_window_match_brute_force(shape, p, density) -> None:
    rng = np.random.default_rng(p)
    for _ in range(5):
        mask = (rng.random(shape) < density).astype(np.uint8)
        mask[tuple(rng.integers(0, s) for s in shape)] = 1
        brute = _brute_counts(mask, p)
        counts, start = window_counts(mask, p)
        for index in np.ndindex(counts.shape):
            centre = tuple(int(v) for v in start + index + p // 2)
            assert counts[index] == brute[centre]  # every computed window is an allowed one
        assert sum(v > 0 for v in brute.values()) == np.count_nonzero(counts)  # none that touches lesion left out
        best = best_window_center(mask, p)
        assert best.dtype == np.int64 and brute[tuple(best.tolist())] == max(brute.values())


def test_best_window_prefers_the_larger_focus_and_centres_it() -> None:
    mask = np.zeros((60, 40, 40), dtype=np.uint8)
    mask[5:7, 18:20, 18:20] = 1  # 8 voxels
    mask[40:43, 10:13, 25:28] = 1  # 27 voxels, centroid (41, 11, 26)
    assert best_window_center(mask, 12).tolist() == [41, 11, 26]


def test_lesion_centers_are_not_biased_to_low_indices() -> None:
    """Two equal blobs, one near index 0 and one near the end: both are picked equally often
    (the original code sorted candidates and almost always took the first blob)."""
    mask = np.zeros((40, 40, 40), dtype=np.uint8)
    mask[4:8, 4:8, 4:8] = 1
    mask[32:36, 32:36, 32:36] = 1
    first_low = [lesion_centers(mask, 1, 8, 0.05, case_rng(0, f"c{i}"))[0][0, 0] < 20 for i in range(400)]
    assert 0.42 < np.mean(first_low) < 0.58


def test_tissue_and_random_centers() -> None:
    brain = np.zeros((30, 32, 28), dtype=np.uint8)
    brain[8:22, 9:24, 7:20] = 1
    centers = tissue_centers(brain, 12, 10, np.random.default_rng(2))
    assert centers.shape == (12, 3) and centers.dtype == np.int64
    assert all(brain[tuple(c)] for c in centers) and len({tuple(c) for c in centers}) == 12
    with pytest.raises(ValueError, match="brain mask is empty"):
        tissue_centers(np.zeros_like(brain), 3, 10, np.random.default_rng(0))
    starts = random_centers((30, 32, 28), 200, 10, np.random.default_rng(3)) - 5
    assert starts.min() >= 0 and (starts + 10 <= np.array([30, 32, 28])).all()
    assert random_centers((30, 32, 8), 5, 10, np.random.default_rng(3))[:, 2].tolist() == [4] * 5


def test_extract_patch_interior_border_and_channels() -> None:
    volume = np.arange(10 * 12 * 8, dtype=np.float32).reshape(10, 12, 8) + 1
    np.testing.assert_array_equal(extract_patch(volume, (5, 6, 4), 4), volume[3:7, 4:8, 2:6])
    odd = extract_patch(volume, (5, 6, 4), 5)
    np.testing.assert_array_equal(odd, volume[3:8, 4:9, 2:7])
    padded = extract_patch(volume, (0, 0, 0), 4)  # window [-2, 2) on every axis
    assert padded.shape == (4, 4, 4) and not padded[:2].any()
    np.testing.assert_array_equal(padded[2:, 2:, 2:], volume[:2, :2, :2])
    small = extract_patch(volume, clamp_centers(np.array([[0, 0, 0]]), volume.shape, 16)[0], 16)
    np.testing.assert_array_equal(small[3:13, 2:14, 4:12], volume)  # volume centred, 0 around it
    assert small.sum() == volume.sum()
    stacked = extract_patches(np.stack([volume, -volume]), np.array([[5, 6, 4], [1, 1, 1]]), 4)
    assert stacked.shape == (2, 2, 4, 4, 4)
    np.testing.assert_array_equal(stacked[0, 1], -volume[3:7, 4:8, 2:6])
    assert not extract_patch(volume, (50, 50, 50), 4).any()


# --------------------------------------------------------------------------- the stage script


@pytest.fixture(scope="module")
def foundation_root(synthetic_atlas: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("patches_foundation")
    raw = json.loads((REPO / "config.json").read_text())
    raw["preprocessing"]["use_gpu"] = False
    (tmp / "config.json").write_text(json.dumps(raw))
    argv = ["--config", str(tmp / "config.json"), "--output-base-dir", str(tmp / "found"), "--data-dir", f"ATLAS={synthetic_atlas}", "--datasets", "ATLAS"]
    assert preprocess_stroke_foundation.main(argv) == 0
    return tmp / "found"


def _args(input_dir: Path, output_dir: Path, dashed: bool = False) -> list[str]:
    flags = ["--input_dir", "--output_dir", "--patch_size", "--max_patches", "--min_lesion_overlap"]
    if dashed:
        flags = [f.replace("_", "-") for f in flags]
    values = [str(input_dir), str(output_dir), str(P), "6", str(OVERLAP)]
    return [x for pair in zip(flags, values) for x in pair] + ["--datasets", "ATLAS", "--seed", "7"]


@pytest.fixture(scope="module")
def patch_out(foundation_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("patches_out")
    assert extract_patches_96x96x96.main(_args(foundation_root, out)) == 0
    return out / f"ATLAS_patches_{P}"


def test_patch_files_keys_dtypes_and_reproducible_centres(patch_out: Path, foundation_root: Path) -> None:
    kinds = {}
    for path in sorted(patch_out.glob("*.npz")):
        data = load_npz(path)
        full = load_npz(foundation_root / "ATLAS" / path.name)
        n = len(data["centers"])
        assert set(data) == set(PATCH_KEYS) and 1 <= n <= 6
        assert data["patches"].shape == (n, P, P, P) and data["patches"].dtype == np.float32
        assert data["masks"].shape == (n, P, P, P) and data["masks"].dtype == np.uint8
        assert data["centers"].shape == (n, 3) and data["centers"].dtype == np.int64
        assert data["original_shape"].tolist() == [48, 56, 44] and data["spacing"].tolist() == [1.0, 1.0, 1.0]
        assert int(data["lesion_volume"]) == int(full["lesion_mask"].sum())
        assert data["patient_id"].dtype.kind == "U" and str(data["patient_id"]) == path.stem
        np.testing.assert_array_equal(data["patches"], extract_patches(full["image"], data["centers"], P))
        np.testing.assert_array_equal(data["masks"], extract_patches(full["lesion_mask"], data["centers"], P))
        kind = kinds[path.stem] = str(data["patch_kind"])
        fractions = data["masks"].reshape(n, -1).mean(axis=1)
        if kind == "lesion":
            assert (fractions >= OVERLAP).all()
        elif kind == "fallback":
            assert n == 1 and full["lesion_mask"].sum() > 0
            assert data["masks"].sum() == max(_brute_counts(full["lesion_mask"], P).values()) > 0
        else:
            assert kind == "tissue" and not data["masks"].any()
            assert all(full["brain_mask"][tuple(c)] for c in data["centers"])
    assert kinds[EMPTY_CASE] == "tissue" and "lesion" in kinds.values() and "fallback" in kinds.values()
    summary = read_json(patch_out / f"ATLAS_{P}_summary.json")
    assert summary["lesion_free"] == [EMPTY_CASE]
    assert summary["fallback"] == sorted(c for c, k in kinds.items() if k == "fallback")
    assert summary["n_done"] == 6 and summary["patch_size"] == P
    assert read_json(patch_out / "patient_ids.json") == sorted(kinds)


def _same_outputs(a: Path, b: Path, cases: list[str]) -> None:
    for case in cases:
        x, y = load_npz(a / f"{case}.npz"), load_npz(b / f"{case}.npz")
        for key in PATCH_KEYS:
            np.testing.assert_array_equal(x[key], y[key])


def test_same_patches_alone_in_a_batch_and_with_two_workers(patch_out: Path, foundation_root: Path, tmp_path: Path) -> None:
    cases = sorted(p.stem for p in patch_out.glob("*.npz"))
    splits = tmp_path / "one.json"
    write_json(splits, {"fold_0": {"ATLAS": {"train": cases[:2], "val": [cases[3]], "test": []}}})
    alone = tmp_path / "alone"
    assert extract_patches_96x96x96.main(_args(foundation_root, alone) + ["--splits_file", str(splits), "--fold", "0", "--split", "val"]) == 0
    assert sorted(p.stem for p in (alone / f"ATLAS_patches_{P}").glob("*.npz")) == [cases[3]]
    _same_outputs(patch_out, alone / f"ATLAS_patches_{P}", [cases[3]])
    workers = tmp_path / "workers"
    assert extract_patches_96x96x96.main(_args(foundation_root, workers, dashed=True) + ["--workers", "2"]) == 0
    _same_outputs(patch_out, workers / f"ATLAS_patches_{P}", cases)


def test_centers_only_writes_what_training_reads(patch_out: Path, foundation_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "centres"
    assert extract_patches_96x96x96.main(_args(foundation_root, out) + ["--centers-only"]) == 0
    folder = out / f"ATLAS_patches_{P}"
    cases = sorted(p.stem for p in patch_out.glob("*.npz"))
    assert sorted(p.stem for p in folder.glob("*.npz")) == cases
    train = find_case_files(foundation_root / "ATLAS", cases, ("image",), "lesion_mask", "brain_mask", patch_dir=folder)
    for case in train:
        small, full = load_npz(case.patch_path), load_npz(patch_out / case.patch_path.name)
        assert set(small) == set(CENTERS_ONLY_KEYS) == {"centers", "original_shape", "patch_kind"}
        for key in CENTERS_ONLY_KEYS:  # the same draw as the paper's keys: the same training samples
            np.testing.assert_array_equal(small[key], full[key])
        centres, shape = read_stored_centres(case)  # what training reads
        np.testing.assert_array_equal(centres, full["centers"])
        assert shape == (48, 56, 44) and case.patch_path.stat().st_size < 2000
    summary = read_json(folder / f"ATLAS_{P}_summary.json")
    assert summary["centers_only"] is True and summary["keys"] == list(CENTERS_ONLY_KEYS)
    assert summary["lesion_free"] == [EMPTY_CASE] and summary["fallback"] == read_json(patch_out / f"ATLAS_{P}_summary.json")["fallback"]
    # Another setting: a re-run without --centers-only is refused before any case (files kept) until --overwrite
    stamp = (folder / f"{cases[0]}.npz").stat().st_mtime_ns
    capsys.readouterr()
    assert extract_patches_96x96x96.main(_args(foundation_root, out)) == 1
    assert f"ERROR {folder}: holds outputs made with other settings (centers_only: true there, false now)" in capsys.readouterr().out
    assert (folder / f"{cases[0]}.npz").stat().st_mtime_ns == stamp
    assert extract_patches_96x96x96.main(_args(foundation_root, out) + ["--overwrite"]) == 0
    assert set(load_npz(folder / f"{cases[0]}.npz")) == set(PATCH_KEYS)
    assert extract_patches_96x96x96.main(_args(foundation_root, out) + ["--centers-only"]) == 1  # and the reverse


def test_split_needs_a_splits_file(foundation_root: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        extract_patches_96x96x96.main(_args(foundation_root, tmp_path) + ["--split", "train"])


def test_bad_inputs_reported_and_others_written(foundation_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "in"
    shutil.copytree(foundation_root / "ATLAS", root / "ATLAS")
    cases = sorted(p.stem for p in (root / "ATLAS").glob("*.npz"))
    (root / "ATLAS" / f"{cases[0]}.npz").write_bytes(b"not a zip")
    (root / "ATLAS" / f"{cases[1]}_metadata.json").unlink()
    splits = tmp_path / "s.json"
    write_json(splits, {"fold_0": {"ATLAS": {"train": cases + ["sub-r099s001_ses-1"], "val": ["x"], "test": []}}})
    out = tmp_path / "out"
    status = extract_patches_96x96x96.main(_args(root, out) + ["--splits_file", str(splits), "--fold", "0", "--split", "train"])
    assert status == 1
    summary = read_json(out / f"ATLAS_patches_{P}" / f"ATLAS_{P}_summary.json")
    failed = {f["case_id"]: f["reason"] for f in summary["failed"]}
    assert re.search("unreadable .npz", failed[cases[0]])
    assert re.search("_metadata.json: file not found", failed[cases[1]])
    assert re.search("listed in the splits file but no sub-r099s001_ses-1.npz", failed["sub-r099s001_ses-1"])
    assert summary["n_done"] == len(cases) - 2
    assert not [p for p in (out / f"ATLAS_patches_{P}").iterdir() if p.name.startswith(".")]


def test_missing_dataset_folder_and_rerun(foundation_root: Path, tmp_path: Path) -> None:
    argv = _args(foundation_root, tmp_path)
    assert extract_patches_96x96x96.main(argv[:-4] + ["--datasets", "ATLAS", "UOA_Private", "--seed", "7"]) == 1
    folder = tmp_path / f"ATLAS_patches_{P}"
    target = next(folder.glob("*.npz"))
    stamp = target.stat().st_mtime_ns
    assert extract_patches_96x96x96.main(argv) == 0
    summary = read_json(folder / f"ATLAS_{P}_summary.json")
    assert summary["n_skipped"] == 6 and target.stat().st_mtime_ns == stamp
    assert summary["lesion_free"] == [EMPTY_CASE]  # flags survive a skipped re-run
    assert extract_patches_96x96x96.main(argv + ["--overwrite"]) == 0
    assert read_json(folder / f"ATLAS_{P}_summary.json")["n_done"] == 6 and target.stat().st_mtime_ns != stamp
