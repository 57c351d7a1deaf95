"""Tests of strokeseg.training.data (sampling, sharding, loading) and strokeseg.training.augment."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from strokeseg.core.io import CaseError, save_npz
from strokeseg.training.augment import AugmentConfig, augment_preset, augment_sample, random_affine
from strokeseg.training.data import (
    BatchLoader,
    EpochSampler,
    SampleMix,
    TrainingSet,
    VolumeCache,
    case_plan,
    centre_pools,
    epoch_order,
    find_case_files,
    load_case_volume,
    open_npz,
    rank_slice,
    sample_shape,
)
from strokeseg.training.patches import extract_patch

SHAPE = (40, 36, 33)  # odd sizes on purpose


def _volume(rng: np.random.Generator, lesion: bool = True) -> dict[str, np.ndarray]:
    image = rng.standard_normal(SHAPE).astype(np.float32)
    mask = np.zeros(SHAPE, np.uint8)
    if lesion:
        mask[10:16, 20:25, 5:9] = 1
    brain = np.zeros(SHAPE, np.uint8)
    brain[4:36, 4:32, 4:29] = 1
    return {"image": image, "lesion_mask": mask, "brain_mask": brain}


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four foundation-style cases (two uncompressed, two compressed; case3 lesion-free) with
    patch files holding the centres of three 16³ lesion patches each."""
    root = tmp_path_factory.mktemp("volumes")
    rng = np.random.default_rng(0)
    for i in range(4):
        arrays = _volume(rng, lesion=i != 3)
        save_npz(root / "vol" / f"case{i}.npz", arrays, compress=i % 2 == 1)
        centres = np.array([[12, 22, 7], [13, 21, 6], [11, 23, 8]]) if i != 3 else np.zeros((0, 3), np.int64)
        save_npz(root / "patches" / f"case{i}.npz", {"centers": centres, "original_shape": np.array(SHAPE), "patches": np.stack([extract_patch(arrays["image"], c, 16) for c in centres]) if len(centres) else np.zeros((0, 16, 16, 16), np.float32)})
    return root


def _cases(root: Path, patches: bool = True):
    return find_case_files(root / "vol", [f"case{i}" for i in range(4)], ("image",), "lesion_mask", "brain_mask", root / "patches" if patches else None)


# --------------------------------------------------------------------------- order and sharding


def test_epoch_order_is_a_seeded_permutation_grouped_in_chunks():
    order = epoch_order(n_cases=7, per_case=3, seed=5, epoch=2, chunk_cases=2)
    assert sorted(order.tolist()) == list(range(21))
    assert np.array_equal(order, epoch_order(7, 3, 5, 2, 2))
    assert not np.array_equal(order, epoch_order(7, 3, 5, 3, 2))
    # every run of 6 ids (one chunk: 2 cases x 3 samples) holds the samples of exactly 2 cases
    for start in range(0, 18, 6):
        cases = {int(s) // 3 for s in order[start : start + 6]}
        assert len(cases) == 2


@pytest.mark.parametrize("n, world, batch", [(10, 1, 1), (10, 3, 1), (7, 2, 1), (2, 4, 1), (10, 2, 3)])
def test_rank_slices_are_disjoint_equal_and_cover(n, world, batch):
    order = np.arange(100, 100 + n)
    shares = [rank_slice(order, r, world, batch) for r in range(world)]
    assert len({len(s) for s in shares}) == 1
    assert len(shares[0]) == -(-n // (world * batch)) * batch
    union = np.concatenate(shares)
    assert set(union.tolist()) == set(order.tolist())
    assert len(union) - len(set(union.tolist())) == len(union) - n  # only the wrap-around pads repeat


def test_rank_slice_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        rank_slice(np.arange(4), 2, 2)


def test_sampler_skip_resumes_exactly(volumes):
    dataset = TrainingSet(_cases(volumes), 16, SampleMix(lesion=1, stored=1, random=1), None, seed=3)
    sampler = EpochSampler(dataset, batch_size=2, rank=1, world_size=2)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_epoch(4, skip=4)
    assert list(sampler) == full[4:]
    assert len(sampler) == len(full) - 4
    assert all(key[0] == 4 for key in full)



def test_sampler_names_the_cases_of_each_batch(volumes):
    """batch_case_ids(step) are the cases of the keys the sampler yields at that step, resumed or not."""
    dataset = TrainingSet(_cases(volumes), 16, SampleMix(lesion=1, stored=1, random=1), None, seed=3)
    sampler = EpochSampler(dataset, batch_size=2, rank=1, world_size=2)
    sampler.set_epoch(2, skip=2)
    keys = list(sampler)
    for step in range(1, len(keys) // 2 + 1):
        batch = keys[(step - 1) * 2 : step * 2]
        expected = sorted({dataset.cases[sample_id // dataset.samples_per_case].case_id for _, sample_id in batch})
        assert sampler.batch_case_ids(step) == expected


# --------------------------------------------------------------------------- files


def test_open_npz_maps_stored_members_and_decodes_compressed_ones(volumes):
    mapped = open_npz(volumes / "vol" / "case0.npz", ("image", "lesion_mask"))
    decoded = open_npz(volumes / "vol" / "case1.npz", ("image", "lesion_mask"))
    assert isinstance(mapped["image"], np.memmap)
    assert not isinstance(decoded["image"], np.memmap)
    assert mapped["image"].shape == decoded["image"].shape == SHAPE


def test_volume_cache_keeps_the_most_recent(volumes):
    cache = VolumeCache(2)
    paths = [volumes / "vol" / f"case{i}.npz" for i in range(3)]
    first = cache.get(paths[0], ("image",))
    assert cache.get(paths[0], ("image",)) is first
    cache.get(paths[1], ("image",))
    cache.get(paths[2], ("image",))  # evicts case0
    assert cache.get(paths[0], ("image",)) is not first


def test_find_case_files_reports_missing(volumes):
    with pytest.raises(CaseError, match="missing"):
        find_case_files(volumes / "vol", ["case0", "nope"], ("image",), "lesion_mask")


def test_load_case_volume_checks_shapes(tmp_path):
    save_npz(tmp_path / "bad.npz", {"image": np.zeros((4, 4, 4), np.float32), "lesion_mask": np.zeros((4, 4, 5), np.uint8)})
    case = find_case_files(tmp_path, ["bad"], ("image",), "lesion_mask")[0]
    with pytest.raises(CaseError, match="one 3-D shape"):
        load_case_volume(case)


# --------------------------------------------------------------------------- plans and samples


def test_centre_pools_and_plan(volumes):
    case = _cases(volumes)[0]
    arrays = open_npz(case.path, case.keys)
    pools = centre_pools(case, arrays, 16, np.random.default_rng(0))
    mask = arrays["lesion_mask"]
    # every lesion window holds lesion; every random centre lies in the brain (clamped inside the volume)
    assert all(extract_patch(mask, c, 16).any() for c in pools["lesion"])
    assert all(arrays["brain_mask"][tuple(c)] for c in pools["random"])
    assert np.all(pools["random"] >= 8) and np.all(pools["random"] <= np.array(SHAPE) - 8)
    stored = np.array([[12, 22, 7]])
    plan = case_plan(pools, stored, SampleMix(lesion=2, stored=3, random=1), np.random.default_rng(1))
    assert plan.shape == (6, 3)
    assert (plan[2:5] == stored).all()


def test_plan_of_lesion_free_case_without_patches_uses_the_brain(volumes):
    case = _cases(volumes)[3]
    pools = centre_pools(case, open_npz(case.path, case.keys), 16, np.random.default_rng(0))
    assert len(pools["lesion"]) == 0
    plan = case_plan(pools, np.zeros((0, 3), np.int64), SampleMix(lesion=2, stored=2, random=1), np.random.default_rng(0))
    assert plan.shape == (5, 3)
    assert set(map(tuple, plan)) <= set(map(tuple, pools["random"]))


def test_samples_depend_on_the_key_only(volumes):
    dataset = TrainingSet(_cases(volumes), 16, SampleMix(lesion=1, stored=1, random=1), augment_preset("full"), seed=7)
    image, mask = dataset[(2, 5)]
    assert image.shape == (1, 16, 16, 16) and image.dtype == torch.float32
    assert mask.shape == (16, 16, 16) and mask.dtype == torch.uint8
    other = TrainingSet(_cases(volumes), 16, SampleMix(lesion=1, stored=1, random=1), augment_preset("full"), seed=7)
    other[(0, 1)]  # a different history must not change the result
    again_image, again_mask = other[(2, 5)]
    assert torch.equal(image, again_image) and torch.equal(mask, again_mask)
    assert not torch.equal(image, dataset[(3, 5)][0])


def test_stored_sample_equals_the_stored_patch(volumes):
    """Stored patches are cut again from the full volume at their centres: same values."""
    dataset = TrainingSet(_cases(volumes), 16, SampleMix(stored=1, random=0), None, seed=0)
    stored = np.load(volumes / "patches" / "case0.npz")
    image, _ = dataset[(0, 0)]  # case 0, its only slot: a stored patch
    assert any(np.array_equal(image[0].numpy(), p) for p in stored["patches"])


def test_patch_file_of_another_volume_is_refused(volumes, tmp_path):
    save_npz(tmp_path / "case0.npz", {"centers": np.array([[12, 22, 7]]), "original_shape": np.array([40, 36, 34])})
    cases = find_case_files(volumes / "vol", ["case0"], ("image",), "lesion_mask", "brain_mask", tmp_path)
    dataset = TrainingSet(cases, 16, SampleMix(stored=1, random=0), None, seed=0)
    with pytest.raises(CaseError, match="patches cut from a"):
        dataset[(0, 0)]


def test_whole_volume_samples(volumes):
    dataset = TrainingSet(_cases(volumes, patches=False), 64, SampleMix(random=2), None, seed=0)
    assert dataset.sample_shapes() == ((1, *SHAPE), SHAPE)
    image, mask = dataset[(0, 2)]  # case 1, whole volume
    reference = np.load(volumes / "vol" / "case1.npz")
    assert np.array_equal(image[0].numpy(), reference["image"])
    assert np.array_equal(mask.numpy(), reference["lesion_mask"])


def test_loader_batches_identical_with_and_without_workers(volumes):
    """Worker processes write into shared batch slots; the batches equal the in-process ones."""
    dataset = TrainingSet(_cases(volumes), 16, SampleMix(lesion=2, stored=1, random=1), augment_preset("flip"), seed=1, chunk_cases=2)
    batches = {}
    for workers in (0, 2):
        sampler = EpochSampler(dataset, batch_size=3)
        loader = BatchLoader(dataset, sampler, workers=workers)
        assert (loader.buffers is not None) == (workers > 0)
        got = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            got += [(x.clone(), y.clone()) for x, y in loader]
        batches[workers] = got
        del loader
    assert len(batches[0]) == len(batches[2]) == 2 * 6  # 16 samples per epoch, padded to 6 batches of 3
    assert all(x.shape[0] == 3 for x, _ in batches[0])
    for (x0, y0), (x2, y2) in zip(batches[0], batches[2]):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


def test_sample_mix_from_fraction():
    assert SampleMix.from_fraction(10, 0.67, "lesion") == SampleMix(lesion=7, stored=0, random=3)
    assert SampleMix.from_fraction(10, 0.7, "stored") == SampleMix(lesion=0, stored=7, random=3)
    with pytest.raises(ValueError):
        SampleMix.from_fraction(10, 1.5, "lesion")
    with pytest.raises(ValueError):
        SampleMix(random=0)


# --------------------------------------------------------------------------- augmentation


def _sample(rng: np.random.Generator, shape=(2, 12, 12, 12)):
    image = rng.standard_normal(shape).astype(np.float32)
    mask = (rng.random(shape[1:]) < 0.3).astype(np.uint8)
    return image, mask


def test_flip_preset_mirrors_image_and_mask_together():
    image, mask = _sample(np.random.default_rng(0))
    config = AugmentConfig(flip_prob=1.0, affine_prob=0.0, intensity_prob=0.0)
    out_image, out_mask = augment_sample(image, mask, config, np.random.default_rng(0))
    assert np.array_equal(out_image, image[:, ::-1, ::-1, ::-1])
    assert np.array_equal(out_mask, mask[::-1, ::-1, ::-1])


def test_augmentation_is_a_pure_function_of_the_generator():
    image, mask = _sample(np.random.default_rng(1))
    config = augment_preset("full")
    a = augment_sample(image, mask, config, np.random.default_rng(42))
    b = augment_sample(image.copy(), mask.copy(), config, np.random.default_rng(42))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert set(np.unique(a[1])) <= {0, 1}
    assert a[0].shape == image.shape and a[0].dtype == np.float32 and a[1].dtype == np.uint8


def test_quarter_turn_matches_rot90_and_identity_is_identity():
    image, mask = _sample(np.random.default_rng(2), shape=(1, 10, 10, 10))
    same_image, same_mask = random_affine(torch.from_numpy(image), torch.from_numpy(mask), np.zeros(3), 1.0)
    assert np.allclose(same_image.numpy(), image, atol=1e-5) and np.array_equal(same_mask.numpy(), mask)
    # 90° about axis 0: output voxel v samples the input at Rᵀ v, i.e. out[x, y, z] = in[x, z, n-1-y],
    # which is np.rot90 with k=1 over axes (1, 2)
    turned_image, turned_mask = random_affine(torch.from_numpy(image), torch.from_numpy(mask), np.array([np.pi / 2, 0, 0]), 1.0)
    assert np.array_equal(turned_mask.numpy(), np.rot90(mask, k=1, axes=(1, 2)))
    assert np.allclose(turned_image.numpy()[0], np.rot90(image[0], k=1, axes=(1, 2)), atol=1e-4)


def test_zoom_enlarges_content():
    mask = np.zeros((21, 21, 21), np.uint8)
    mask[8:13, 8:13, 8:13] = 1  # a 5³ cube in the middle
    image = mask[None].astype(np.float32)
    _, zoomed = random_affine(torch.from_numpy(image), torch.from_numpy(mask), np.zeros(3), 1.6)
    assert zoomed.sum() > mask.sum() * 2  # (1.6)³ ≈ 4.1 x the volume, up to voxelisation


def test_augment_config_validation():
    with pytest.raises(ValueError, match="zoom"):
        AugmentConfig(zoom_min=1.2, zoom_max=1.1)
    with pytest.raises(ValueError, match="flip_prob"):
        AugmentConfig(flip_prob=2.0)
    with pytest.raises(ValueError, match="augmentation"):
        augment_preset("strong")


@pytest.mark.parametrize(
    "patch, shape, expected",
    [
        (96, (32, 32, 32), (32, 32, 32)),  # the patch covers the volume: whole volume
        (32, (32, 32, 32), (32, 32, 32)),
        (96, (197, 233, 189), (96, 96, 96)),
        (96, (80, 120, 60), (96, 96, 96)),  # one axis longer than the patch: patches (zero-padded)
        ((16, 40, 8), (12, 40, 8), (12, 40, 8)),
        ((16, 40, 8), (12, 41, 8), (16, 40, 8)),
    ],
)
def test_sample_shape_is_the_whole_volume_only_when_the_patch_covers_it(patch, shape, expected):
    assert sample_shape(patch, shape) == expected
