"""Shared pytest fixtures: the real ISLES sample and tiny synthetic datasets (one per session).

Synthetic datasets (all written by :mod:`strokeseg.datasets.synthetic`, seconds in total):
- ``synthetic_isles_a``: layout A, 6 cases sub-strokecase0001..0006, DWI grid about 40x40x24,
  sub-strokecase0006 has an empty mask.
- ``synthetic_isles_b``: layout B, 6 cases, same sizes, seed 1, no empty mask.
- ``synthetic_atlas``: 6 cases 48x56x44 (R001: 4 subjects, R002: 2), sub-r002s002 empty.
- ``synthetic_uoa``: 4 cases UOA001..UOA004 on 46x54x46 at 1 mm, except UOA004 at
  1.25 x 1.5 x 2.0 mm (37x36x23 voxels).
- ``synthetic_brats``: 4 patients 48x48x32 (00005, 00007, 00009, 00011); 00007 and 00011 also
  have visit -101 (6 visits in all).
Treat them as read-only: they are shared by every test in the session.

``make_sphere_isles`` writes an easy set in the ISLES training format (bright DWI, dark ADC
sphere in noise); ``one_intra_op_thread`` runs a module's tests with one intra-op thread.
"""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from typing import Callable

import numpy as np
import pytest
import torch

from strokeseg.core.io import save_npz, write_json
from strokeseg.datasets import synthetic
from strokeseg.datasets.splits import make_splits

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2 (the README's test command): one core per
    os.environ["OMP_NUM_THREADS"] = "1"    # worker, in-process and in the scripts it runs; more
    torch.set_num_threads(1)               # threads than free cores only spin-wait


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "slow(seconds): a test of ten seconds or more (a chain of scripts or processes) and its rough "
        "duration on one busy core; files holding them run first, the slowest first, so that the two "
        "workers of `pytest -n 2 --dist loadfile --no-loadscope-reorder` finish together. "
        "`-m 'not slow'` skips them.",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files ordered by the seconds of their slow tests, most first; each file's tests stay
    together and in order (the sort is stable), so a module fixture is built once per worker."""
    seconds: dict[Path, float] = defaultdict(float)
    for item in items:
        marker = item.get_closest_marker("slow")
        seconds[item.path] += float(marker.args[0]) if marker else 0.0
    items.sort(key=lambda item: -seconds[item.path])


ISLES_SAMPLE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isles22_sample"


@pytest.fixture(scope="session")
def isles_sample_dir() -> Path:
    """Root of the real ISLES 2022 case (layout B, sub-strokecase0009); skips when absent."""
    if not ISLES_SAMPLE_DIR.is_dir():
        pytest.skip(f"real ISLES sample not found at {ISLES_SAMPLE_DIR} (clone shared/ beside the repository)")
    return ISLES_SAMPLE_DIR


@pytest.fixture(scope="session")
def synthetic_isles_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("isles_a")
    synthetic.make_isles(root, 6, layout="A", seed=0, shape=(40, 40, 24), empty_every=6)
    return root


@pytest.fixture(scope="session")
def synthetic_isles_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("isles_b")
    synthetic.make_isles(root, 6, layout="B", seed=1, shape=(40, 40, 24))
    return root


@pytest.fixture(scope="session")
def synthetic_atlas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("atlas")
    synthetic.make_atlas(root, 6, seed=0, shape=(48, 56, 44), empty_every=6)
    return root


@pytest.fixture(scope="session")
def synthetic_uoa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("uoa")
    synthetic.make_uoa(root, 4, seed=0, shape=(46, 54, 46), spacing_every=4)
    return root


@pytest.fixture(scope="session")
def synthetic_brats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("brats")
    synthetic.make_brats(root, 4, seed=0, shape=(48, 48, 32), second_visit_every=2)
    return root


@pytest.fixture(scope="session")
def brats_seven(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """7 patients (enough for a test set plus 5 folds), 3 of them with a second visit: 10 visits."""
    root = tmp_path_factory.mktemp("brats7")
    synthetic.make_brats(root, 7, seed=3, shape=(32, 32, 24), second_visit_every=2)
    return root


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """One intra-op torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures(
    "one_intra_op_thread")``): tiny steps on a busy machine slow down when threads spin-wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write_sphere_isles(root: Path, cases: int, edge: int) -> Path:
    """``cases`` volumes edge³ in the ISLES training format (<case>.npz with float32 dwi, adc and
    uint8 mask, plus isles2022_splits_5fold.json without a test set): a sphere of radius
    3/16..5/16 of the edge, DWI +3 and ADC -2 inside, unit Gaussian noise; seed 0."""
    rng = np.random.default_rng(0)
    grid = np.indices((edge,) * 3)
    volumes = {}
    for i in range(cases):
        centre, radius = rng.integers(edge * 5 // 16, edge * 11 // 16, 3), rng.integers(edge * 3 // 16, edge * 5 // 16)
        mask = (((grid - centre[:, None, None, None]) ** 2).sum(0) <= radius**2).astype(np.uint8)
        dwi = (rng.standard_normal(mask.shape) + 3 * mask).astype(np.float32)
        adc = (rng.standard_normal(mask.shape) - 2 * mask).astype(np.float32)
        save_npz(root / f"case{i:02d}.npz", {"dwi": dwi, "adc": adc, "mask": mask})
        volumes[f"case{i:02d}"] = float(mask.sum())
    write_json(root / "isles2022_splits_5fold.json", make_splits(volumes, "ISLES2022", test_fraction=0.0))
    return root


@pytest.fixture(scope="session")
def make_sphere_isles() -> Callable[[Path, int, int], Path]:
    """``make(root, cases, edge)``: an easy ISLES-format set (see :func:`_write_sphere_isles`)."""
    return _write_sphere_isles
