"""Atomic writes and pickle-free readers."""
from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from strokeseg.core.io import NotMemoryMappable, CaseError, atomic_path, load_nifti, load_npz, load_npz_mmap, read_json, save_nifti, save_npz, write_json


def test_atomic_path_leaves_old_file_when_the_writer_fails(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_npz_round_trip_and_refusals(tmp_path: Path) -> None:
    arrays = {"image": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "ids": np.array(["a", "bc"])}
    save_npz(tmp_path / "x.npz", arrays)
    back = load_npz(tmp_path / "x.npz")
    np.testing.assert_array_equal(back["image"], arrays["image"])
    assert back["ids"].tolist() == ["a", "bc"]
    assert list(load_npz(tmp_path / "x.npz", keys=("ids",))) == ["ids"]
    with pytest.raises(CaseError, match=r"x\.npz: missing key"):
        load_npz(tmp_path / "x.npz", keys=("mask",))
    with pytest.raises(TypeError, match="object"):
        save_npz(tmp_path / "o.npz", {"bad": np.array([{"a": 1}], dtype=object)})
    (tmp_path / "broken.npz").write_bytes((tmp_path / "x.npz").read_bytes()[:40])
    with pytest.raises(CaseError, match=r"broken\.npz: unreadable"):
        load_npz(tmp_path / "broken.npz")


def test_json_round_trip_with_numpy_values(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {"shape": np.array([1, 2]), "v": np.float32(0.5), "p": tmp_path})
    assert read_json(tmp_path / "a.json") == {"shape": [1, 2], "v": 0.5, "p": str(tmp_path)}
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CaseError, match=r"bad\.json: unreadable JSON"):
        read_json(tmp_path / "bad.json")
    with pytest.raises(CaseError, match="file not found"):
        read_json(tmp_path / "missing.json")


def test_outputs_follow_the_umask(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {})
    assert (tmp_path / "a.json").stat().st_mode & 0o044 == 0o044  # group/other readable under umask 022


def test_nifti_round_trip_and_validation(tmp_path: Path) -> None:
    affine = np.array([[2.0, 0.1, 0, -90], [0, 2.0, 0, -100], [0, 0, 5.0, -60], [0, 0, 0, 1]])
    data = np.random.default_rng(0).random((5, 6, 4)).astype(np.float32)
    save_nifti(tmp_path / "v.nii.gz", data, affine)
    vol = load_nifti(tmp_path / "v.nii.gz")
    np.testing.assert_allclose(vol.data, data, rtol=1e-6)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5)
    assert vol.zooms == pytest.approx((2.0, 2.0025, 5.0), abs=1e-3)  # column norms of the affine
    nib.save(nib.Nifti1Image(data[..., None], affine), str(tmp_path / "single.nii.gz"))
    assert load_nifti(tmp_path / "single.nii.gz").data.shape == (5, 6, 4)
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), affine), str(tmp_path / "four.nii.gz"))
    with pytest.raises(CaseError, match=r"four\.nii\.gz: expected a 3-D volume"):
        load_nifti(tmp_path / "four.nii.gz")
    with pytest.raises(CaseError, match="file not found"):
        load_nifti(tmp_path / "none.nii.gz")


def test_memory_mapped_members_equal_loaded_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arrays = {"image": rng.random((17, 9, 11), dtype=np.float32), "lesion_mask": (rng.random((17, 9, 11)) > 0.5).astype(np.uint8)}
    save_npz(tmp_path / "u.npz", arrays, compress=False)
    mapped = load_npz_mmap(tmp_path / "u.npz", ("image", "lesion_mask"))
    for key, value in arrays.items():
        assert isinstance(mapped[key], np.memmap)
        np.testing.assert_array_equal(mapped[key], value)
    save_npz(tmp_path / "c.npz", arrays)
    with pytest.raises(NotMemoryMappable, match="compressed"):
        load_npz_mmap(tmp_path / "c.npz", ("image",))
    with pytest.raises(CaseError, match="missing key"):
        load_npz_mmap(tmp_path / "u.npz", ("brain_mask",))


def test_temporary_files_never_look_like_outputs(tmp_path: Path) -> None:
    seen = []
    with atomic_path(tmp_path / "case.npz") as tmp:
        seen.append(tmp.name)
        tmp.write_bytes(b"x")
        assert list(tmp_path.glob("*.npz")) == []  # a kill -9 here leaves nothing a stage would read
    assert seen[0].startswith(".case.npz.") and seen[0].endswith(".partial")


def test_identical_arrays_give_byte_identical_npz(tmp_path: Path) -> None:
    arrays = {"image": np.linspace(0, 1, 60, dtype=np.float32).reshape(3, 4, 5), "mask": np.eye(3, dtype=np.uint8)}
    for compress in (True, False):
        save_npz(tmp_path / "a.npz", arrays, compress=compress)
        save_npz(tmp_path / "b.npz", arrays, compress=compress)
        assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
        with np.load(tmp_path / "a.npz", allow_pickle=False) as data:  # plain numpy reads it
            np.testing.assert_array_equal(data["image"], arrays["image"])


def test_memory_mapped_members_are_checked_once_per_file_version(tmp_path: Path) -> None:
    image = np.linspace(-1, 1, 4000, dtype=np.float32).reshape(10, 20, 20)
    save_npz(tmp_path / "u.npz", {"image": image}, compress=False)
    path = tmp_path / "u.npz"
    assert load_npz_mmap(path, ("image",))["image"][5, 10, 10] == image[5, 10, 10]
    stat = path.stat()
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    load_npz_mmap(path, ("image",))  # same (path, mtime, size): verified already, not re-read
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    with pytest.raises(CaseError, match=r"u\.npz: member 'image' is corrupt \(CRC-32"):
        load_npz_mmap(path, ("image",))
    image[0, 0, :3] = np.nan
    save_npz(tmp_path / "n.npz", {"image": image}, compress=False)
    with pytest.raises(CaseError, match=r"n\.npz: member 'image' holds 3 NaN/Inf value\(s\)"):
        load_npz_mmap(tmp_path / "n.npz", ("image",))


def _strict_loads(text: str) -> object:
    """json.loads refusing the non-standard constants NaN, Infinity and -Infinity."""
    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def test_json_is_strict_nan_and_inf_become_null(tmp_path: Path) -> None:
    summary = {"metrics": {"dice": {"fold_std": float("nan"), "ci95": [np.float32("nan"), np.inf]}, "n": np.int64(3)},
               "icc": np.float64("-inf"), "values": np.array([1.5, np.nan]), "path": tmp_path, "ok": 0.25}
    write_json(tmp_path / "summary.json", summary)
    text = (tmp_path / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = _strict_loads(text)
    assert back == {"metrics": {"dice": {"fold_std": None, "ci95": [None, None]}, "n": 3}, "icc": None, "values": [1.5, None],
                    "path": str(tmp_path), "ok": 0.25}
    assert read_json(tmp_path / "summary.json") == back


def test_a_rerun_removes_partial_files_a_killed_writer_left(tmp_path: Path) -> None:
    import subprocess
    import sys
    # A writer killed (SIGKILL) between writing its temporary file and renaming it onto the output.
    child = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, signal\n"
        "from strokeseg.core.io import atomic_path\n"
        f"with atomic_path({str(tmp_path / 'summary.json')!r}) as tmp:\n"
        "    tmp.write_text('{half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")], cwd=Path(__file__).resolve().parents[1])
    child.wait()
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert len(leftovers) == 1 and leftovers[0].startswith(".summary.json.") and leftovers[0].endswith(".partial")
    live = tmp_path / (leftovers[0].replace(f"-{child.pid}.", f"-{os.getpid()}."))  # a live writer's (this process)
    live.write_text("in progress")
    old = tmp_path / ".old.json.k3j2h1.partial"  # an older version's name, a day old
    old.write_text("x")
    os.utime(old, (0, 0))
    write_json(tmp_path / "other.json", {"a": 1})  # the rerun's first write into the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "other.json"])
