"""Geometry and intensity operations: resampling, affines, native mapping, z-score, clipping, bbox."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from strokeseg.core.geometry import (
    c_order_view,
    as_binary_mask,
    as_label_map,
    clip_between,
    clip_percentile,
    crop,
    foreground_bbox,
    percentile_bounds,
    rescale_affine,
    resample_to_shape,
    spacing_to_shape,
    uncrop_to_native,
    zscore,
)
from strokeseg.core.io import CaseError

CPU = torch.device("cpu")  # selects the PyTorch path (the one CUDA runs) on the CPU


def _world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return (affine @ np.append(np.asarray(ijk, dtype=np.float64), 1.0))[:3]


@pytest.mark.parametrize("is_label", [False, True])
def test_resample_same_shape_is_identity(is_label: bool) -> None:
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 3, (7, 9, 5)).astype(np.uint8) if is_label else rng.normal(size=(7, 9, 5)).astype(np.float32)
    out = resample_to_shape(volume, (7, 9, 5), is_label=is_label)
    np.testing.assert_array_equal(out, volume)
    assert out.dtype == (np.uint8 if is_label else np.float32)


@pytest.mark.parametrize("shape", [(14, 18, 10), (5, 6, 3), (11, 13, 7)])
def test_label_resampling_keeps_values_and_dtype(shape: tuple[int, int, int]) -> None:
    labels = np.zeros((7, 9, 5), dtype=np.uint8)
    labels[1:4, 2:6, 1:3] = 1
    labels[4:6, 5:8, 2:5] = 4
    out = resample_to_shape(labels, shape, is_label=True)
    assert out.shape == shape and out.dtype == np.uint8
    assert set(np.unique(out)) <= {0, 1, 4}


@pytest.mark.parametrize("src, dst", [((86, 91, 61), (96, 96, 96)), ((37, 36, 23), (46, 54, 46)), ((20, 24, 18), (7, 9, 5))])
def test_label_resampling_matches_torch_nearest_exact_and_device_path(src, dst) -> None:
    labels = np.random.default_rng(5).integers(0, 5, src).astype(np.uint8)
    ref = torch.nn.functional.interpolate(torch.from_numpy(labels).float()[None, None], size=dst, mode="nearest-exact")
    out = resample_to_shape(labels, dst, is_label=True)
    np.testing.assert_array_equal(out, ref[0, 0].to(torch.uint8).numpy())
    np.testing.assert_array_equal(resample_to_shape(labels, dst, is_label=True, device=CPU), out)
    image = labels.astype(np.float32)
    np.testing.assert_array_equal(resample_to_shape(image, dst, is_label=False, device=CPU), resample_to_shape(image, dst, is_label=False))


def test_nearest_upsampling_by_two_repeats_voxels() -> None:
    labels = np.arange(8, dtype=np.uint8).reshape(2, 2, 2)
    out = resample_to_shape(labels, (4, 4, 4), is_label=True)
    np.testing.assert_array_equal(out, labels.repeat(2, 0).repeat(2, 1).repeat(2, 2))


def test_trilinear_of_linear_ramp_matches_voxel_centres() -> None:
    # Voxel-centre alignment: new voxel j sits at old continuous index (j + 0.5) * 4 / 8 - 0.5.
    ramp = np.broadcast_to(np.arange(4, dtype=np.float32)[:, None, None], (4, 3, 3)).copy()
    out = resample_to_shape(ramp, (8, 3, 3), is_label=False)
    expected = np.clip((np.arange(8) + 0.5) * 0.5 - 0.5, 0, 3)
    np.testing.assert_allclose(out[:, 1, 1], expected, atol=1e-6)


@pytest.mark.parametrize(
    "shape, zooms, target, expected",
    [((100, 100, 50), (1.0, 1.0, 2.0), (1.0, 1.0, 1.0), (100, 100, 100)), ((29, 29, 18), (1.25, 1.5, 2.0), (1.0, 1.0, 1.0), (36, 44, 36))],
)
def test_spacing_to_shape(shape, zooms, target, expected) -> None:
    assert spacing_to_shape(shape, zooms, target) == expected


def test_rescale_affine_keeps_the_field_of_view() -> None:
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([1.25, 1.5, 2.0])
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = rotation, [10.0, -20.0, 5.0]
    old, new = (29, 29, 18), (36, 44, 36)
    out = rescale_affine(affine, old, new)
    # Voxel edges (corner of the field of view) and the volume centre map to the same world point.
    for ijk_old, ijk_new in (((-0.5,) * 3, (-0.5,) * 3), (np.array(old) - 0.5, np.array(new) - 0.5), ((np.array(old) - 1) / 2, (np.array(new) - 1) / 2)):
        np.testing.assert_allclose(_world(out, ijk_new), _world(affine, ijk_old), atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(out[:3, :3], axis=0), [1.25 * 29 / 36, 1.5 * 29 / 44, 2.0 * 18 / 36])


def test_uncrop_to_native_round_trip() -> None:
    native = np.zeros((30, 28, 20), dtype=np.uint8)
    native[10:18, 8:20, 6:12] = 1
    bbox = np.array([[5, 25], [4, 24], [2, 18]])
    cropped = crop(native, bbox)
    small = resample_to_shape(cropped, (40, 40, 32), is_label=True)  # exact 2x upsampling
    back = uncrop_to_native(small, bbox, cropped.shape, native.shape, is_label=True)
    np.testing.assert_array_equal(back, native)
    with pytest.raises(ValueError, match="does not match cropped shape"):
        uncrop_to_native(small, bbox, (1, 2, 3), native.shape, is_label=True)


@pytest.mark.parametrize("device", [None, CPU])
def test_zscore_inside_mask_and_zero_outside(device) -> None:
    rng = np.random.default_rng(1)
    volume = rng.normal(50, 7, (9, 10, 11)).astype(np.float32)
    mask = np.zeros(volume.shape, dtype=np.uint8)
    mask[2:7, 2:8, 3:9] = 1
    out = zscore(volume, mask, device=device)
    inside = out[mask.astype(bool)]
    assert out.dtype == np.float32
    assert abs(inside.mean()) < 1e-5 and abs(inside.std() - 1.0) < 1e-5
    assert not out[~mask.astype(bool)].any()
    ref = (volume[mask.astype(bool)] - volume[mask.astype(bool)].mean()) / volume[mask.astype(bool)].std()
    np.testing.assert_allclose(inside, ref, atol=1e-5)


@pytest.mark.parametrize("device", [None, CPU])
def test_zscore_default_region_constant_and_empty(device) -> None:
    volume = np.zeros((4, 4, 4), dtype=np.float32)
    volume[1:3, 1:3, 1:3] = 5.0
    np.testing.assert_array_equal(zscore(volume, device=device), np.zeros_like(volume))  # centred, not divided by 0
    np.testing.assert_array_equal(zscore(np.zeros((3, 3, 3)), device=device), np.zeros((3, 3, 3)))


@pytest.mark.parametrize("device", [None, CPU])
def test_clip_percentile_bounds_match_numpy(device) -> None:
    rng = np.random.default_rng(2)
    volume = rng.exponential(10.0, (20, 20, 20)).astype(np.float32)
    mask = np.zeros(volume.shape, dtype=bool)
    mask[3:17, 3:17, 3:17] = True
    volume[0, 0, 0] = 1e6  # outside the mask: must not move the bounds
    low, high = np.percentile(volume[mask], [0.5, 99.5])
    bounds = percentile_bounds(volume, mask, 99.5, device=device)
    np.testing.assert_allclose(bounds, (low, high), rtol=1e-6)
    out = clip_percentile(volume, mask, 99.5, device=device)
    assert out.dtype == np.float32 and out.max() <= np.float32(high) and out.min() >= np.float32(low)
    assert out[0, 0, 0] == np.float32(high)  # the whole volume is clipped
    assert (out[mask] == volume[mask]).mean() > 0.98  # only the 1 % tails change


def test_percentiles_equal_numpys_for_ties_tails_and_tiny_arrays() -> None:
    """The tail selection in percentile_bounds is exact: NumPy's 'linear' percentiles."""
    rng = np.random.default_rng(7)
    draws = [lambda n: rng.normal(size=n), lambda n: rng.integers(0, 4, n), lambda n: np.sort(rng.exponential(size=n)), lambda n: rng.lognormal(size=n)]
    for trial in range(240):
        n = int(rng.integers(1, 3000)) if trial % 10 else 300_000
        values = draws[trial % 4](n).astype(np.float32)
        volume, mask = values.reshape(1, 1, n), np.ones((1, 1, n), dtype=np.uint8)
        for percentile in (99.5, 99.0, 90.0, 75.0, 100.0):
            expected = np.percentile(values, [100.0 - percentile, percentile])
            np.testing.assert_allclose(percentile_bounds(volume, mask, percentile), expected, rtol=1e-6, atol=0)


def test_c_order_view_transposes_fortran_volumes_without_copying() -> None:
    volume = np.asfortranarray(np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    view, transposed = c_order_view(volume)
    assert transposed and view.flags.c_contiguous and np.shares_memory(view, volume)
    np.testing.assert_array_equal(view.T, volume)
    c_volume = np.ascontiguousarray(volume)
    assert c_order_view(c_volume)[0] is c_volume and not c_order_view(c_volume)[1]
    strided = c_volume[:, ::2]
    view, transposed = c_order_view(strided)
    assert not transposed and view.flags.c_contiguous
    np.testing.assert_array_equal(view, strided)


def test_clip_then_zscore_keeps_the_max_at_the_clipped_percentile() -> None:
    rng = np.random.default_rng(3)
    volume = rng.lognormal(3.0, 1.0, (16, 16, 16)).astype(np.float32)
    mask = np.ones(volume.shape, dtype=bool)
    high = np.percentile(volume, 99.0)
    clipped = clip_between(volume, *percentile_bounds(volume, mask, 99.0))
    out = zscore(clipped, mask)
    values = clipped.astype(np.float64)
    assert out.max() <= (high - values.mean()) / values.std() + 1e-5


def test_clip_percentile_rejects_bad_percentile_and_keeps_empty_mask() -> None:
    volume = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    with pytest.raises(ValueError, match=r"\(50, 100\], got 40"):
        clip_percentile(volume, np.ones_like(volume), 40)
    np.testing.assert_array_equal(clip_percentile(volume, np.zeros_like(volume), 99), volume)
    assert percentile_bounds(volume, np.zeros_like(volume), 99) is None


def test_foreground_bbox_margin_clipping_and_empty() -> None:
    image = np.zeros((10, 12, 8))
    image[3:5, 4:9, 0:2] = 1.0
    np.testing.assert_array_equal(foreground_bbox(image, margin=0), [[3, 5], [4, 9], [0, 2]])
    np.testing.assert_array_equal(foreground_bbox(image, margin=2), [[1, 7], [2, 11], [0, 4]])
    np.testing.assert_array_equal(foreground_bbox(image, margin=5), [[0, 10], [0, 12], [0, 7]])
    with pytest.raises(CaseError, match="empty brain"):
        foreground_bbox(np.zeros((4, 4, 4)), margin=1, path="x.nii.gz")


def test_label_checks_name_the_bad_values() -> None:
    seg = np.zeros((4, 4, 4), dtype=np.float32)
    seg[0, 0, :4] = [1, 2, 3, 4]
    np.testing.assert_array_equal(as_label_map(seg, (0, 1, 2, 3, 4), "seg.nii.gz"), seg.astype(np.uint8))
    seg[1, 1, 1] = 5
    with pytest.raises(CaseError, match=r"seg.nii.gz: mask values must be 0/1/2/3/4; found other value\(s\) \{5\}"):
        as_label_map(seg, (0, 1, 2, 3, 4), "seg.nii.gz")
    with pytest.raises(CaseError, match=r"mask values must be 0/1; found other value\(s\) \{0.5, nan\}"):
        as_binary_mask(np.array([0, 1, 0.5, np.nan]).reshape(1, 1, 4), "m.nii.gz")
    assert as_binary_mask(np.array([0.0, 1.0]).reshape(1, 1, 2), "m").dtype == np.uint8

