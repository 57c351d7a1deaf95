"""Tests of strokeseg.inference.sliding_window: stitching against a plain reference loop, padding, TTA, ensembles."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from strokeseg.inference.precision import autocast_dtype
from strokeseg.inference.sliding_window import (
    crop_alignment,
    ensemble_predictors,
    importance_map,
    nonzero_box,
    sliding_window_inference,
)


def _tiny_net(in_channels: int = 1, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv3d(in_channels, 3, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv3d(3, 1, 3, padding=1),
        torch.nn.Sigmoid(),
    ).eval()


def _volume(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _reference_gaussian(window: int, sigma_scale: float = 0.125) -> np.ndarray:
    centre = (window - 1) / 2.0
    g = np.exp(-((np.arange(window) - centre) ** 2) / (2 * (sigma_scale * window) ** 2))
    weights = g[:, None, None] * g[None, :, None] * g[None, None, :]
    return np.maximum(weights, max(weights.min(), 1e-3))


def _reference_starts(size: int, window: int, step: int) -> list[int]:
    starts, start = [], 0
    while True:
        starts.append(min(start, size - window))
        if start + window >= size:
            return starts
        start += step


def _reference_inference(volume: torch.Tensor, net: torch.nn.Module, window: int, step: int, mode: str) -> np.ndarray:
    """One window at a time, numpy accumulation; the volume is at least the window in every axis."""
    shape = volume.shape[1:]
    weights = _reference_gaussian(window) if mode == "gaussian" else np.ones((window,) * 3)
    total, norm = np.zeros(shape), np.zeros(shape)
    for x, y, z in itertools.product(*(_reference_starts(s, window, step) for s in shape)):
        patch = volume[None, :, x : x + window, y : y + window, z : z + window]
        with torch.no_grad():
            prob = net(patch)[0, 0].numpy().astype(np.float64)
        total[x : x + window, y : y + window, z : z + window] += weights * prob
        norm[x : x + window, y : y + window, z : z + window] += weights
    return total / norm


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("shape", [(1, 23, 30, 19), (2, 17, 33, 16)])
def test_matches_reference_loop(mode, shape):
    net = _tiny_net(in_channels=shape[0])
    volume = _volume(shape)
    out = sliding_window_inference(volume, net, window=16, overlap=0.5, mode=mode, sw_batch_size=3)
    assert out.dtype == np.float32 and out.shape == shape[1:]
    np.testing.assert_allclose(out, _reference_inference(volume, net, 16, 8, mode), rtol=0, atol=1e-5)


def test_overlap_zero_and_large_overlap_match_reference():
    net = _tiny_net()
    volume = _volume((1, 21, 18, 20), seed=1)
    # overlap 0.75 -> step 2; overlap 0 -> step 8 (windows only meet at the flush last one)
    for overlap, step in [(0.75, 2), (0.0, 8)]:
        out = sliding_window_inference(volume, net, window=8, overlap=overlap, mode="gaussian")
        np.testing.assert_allclose(out, _reference_inference(volume, net, 8, step, "gaussian"), atol=1e-5)


def test_single_window_equals_forward_pass():
    net = _tiny_net()
    volume = _volume((1, 12, 10, 14))
    with torch.no_grad():
        direct = net(volume[None])[0, 0].numpy()
    for mode in ("gaussian", "constant"):
        out = sliding_window_inference(volume, net, window=(12, 10, 14), mode=mode)
        np.testing.assert_allclose(out, direct, rtol=0, atol=1e-6)


def test_windows_are_channels_last_and_a_channels_last_model_gives_the_same_result():
    net = _tiny_net(in_channels=2)
    volume = _volume((2, 20, 17, 22), seed=3)
    layouts = []

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        layouts.append(batch.is_contiguous(memory_format=torch.channels_last_3d) and not batch.is_contiguous())
        return net(batch)

    contiguous = sliding_window_inference(volume, predictor, window=12, overlap=0.5, sw_batch_size=3)
    assert layouts and all(layouts)
    fast = sliding_window_inference(volume, net.to(memory_format=torch.channels_last_3d), window=12, overlap=0.5, sw_batch_size=3)
    np.testing.assert_allclose(fast, contiguous, rtol=0, atol=1e-6)
    np.testing.assert_allclose(fast, _reference_inference(volume, _tiny_net(in_channels=2), 12, 6, "gaussian"), atol=1e-5)


def test_volume_smaller_than_window_is_padded_and_cropped():
    net = _tiny_net()
    volume = _volume((1, 9, 12, 5))
    # window 12: pad X by 3 (1 before, 2 after), Y by 0, Z by 7 (3 before, 4 after)
    padded = torch.nn.functional.pad(volume, (3, 4, 0, 0, 1, 2))
    with torch.no_grad():
        direct = net(padded[None])[0, 0, 1:10, :, 3:8].numpy()
    out = sliding_window_inference(volume, net, window=12, overlap=0.5)
    assert out.shape == (9, 12, 5) and out.flags.c_contiguous
    np.testing.assert_allclose(out, direct, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "window, overlap, mode", [(5, 0.5, "gaussian"), ((4, 7, 3), 0.3, "constant"), (6, 0.9, "gaussian")]
)
def test_pointwise_predictor_is_reproduced(window, overlap, mode):
    # Every window agrees with every other, so any blending must give back the pointwise result:
    # catches uncovered voxels and weights that do not normalise.
    volume = _volume((1, 11, 13, 9))
    out = sliding_window_inference(volume, torch.sigmoid, window, overlap=overlap, mode=mode, sw_batch_size=5)
    np.testing.assert_allclose(out, torch.sigmoid(volume[0]).numpy(), rtol=0, atol=1e-5)


def test_mirror_tta_with_flip_equivariant_predictor_equals_no_tta():
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():  # symmetrise the kernel under all flips -> the conv commutes with flips
        kernel = conv.weight
        conv.weight.copy_(sum(kernel.flip(dims) for k in range(4) for dims in itertools.combinations((2, 3, 4), k)) / 8)
    net = torch.nn.Sequential(conv, torch.nn.Sigmoid()).eval()
    volume = _volume((1, 15, 13, 11))
    plain = sliding_window_inference(volume, net, window=8, mirror_tta=False)
    tta = sliding_window_inference(volume, net, window=8, mirror_tta=True)
    np.testing.assert_allclose(tta, plain, rtol=0, atol=1e-6)


def test_mirror_tta_averages_flipped_back_predictions():
    net = _tiny_net()
    volume = _volume((1, 10, 8, 6))
    with torch.no_grad():
        flips = [dims for k in range(4) for dims in itertools.combinations((2, 3, 4), k)]
        expected = sum(net(volume[None].flip(d)).flip(d) for d in flips)[0, 0].numpy() / 8
        plain = net(volume[None])[0, 0].numpy()
    out = sliding_window_inference(volume, net, window=(10, 8, 6), mirror_tta=True)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    assert np.abs(out - plain).max() > 1e-4  # the tiny net is not flip-equivariant


def test_ensemble_is_mean_of_members():
    nets = [_tiny_net(seed=1), _tiny_net(seed=2)]
    batch = _volume((2, 1, 6, 7, 5))
    with torch.no_grad():
        expected = (nets[0](batch) + nets[1](batch)) / 2
        got = ensemble_predictors(nets)(batch)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)
    out = sliding_window_inference(batch[0], ensemble_predictors(nets), window=(6, 7, 5))
    np.testing.assert_allclose(out, expected[0, 0].numpy(), rtol=0, atol=1e-6)


def test_importance_map_shape_peak_and_floor():
    weights = importance_map(9, "gaussian", sigma_scale=0.125)
    assert weights.shape == (9, 9, 9) and weights.dtype == torch.float32
    assert weights[4, 4, 4].item() == pytest.approx(1.0)
    assert weights.min().item() == pytest.approx(1e-3)  # corners are far below the floor
    np.testing.assert_allclose(weights.numpy(), _reference_gaussian(9), rtol=1e-6)
    assert torch.equal(importance_map((2, 3, 4), "constant"), torch.ones(2, 3, 4))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"overlap": 1.0}, "overlap"),
        ({"overlap": -0.1}, "overlap"),
        ({"window": 0}, "window"),
        ({"window": (8, 8)}, "window"),
        ({"window": (8, 8.0, 8)}, "window"),
        ({"window": 8.0}, "window"),
        ({"mode": "median"}, "mode"),
        ({"sw_batch_size": 0}, "sw_batch_size"),
        ({"sigma_scale": 0.0}, "sigma_scale"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    args = {"window": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        sliding_window_inference(_volume((1, 9, 9, 9)), torch.sigmoid, **args)


def test_bad_volume_predictor_and_ensemble_raise():
    with pytest.raises(ValueError, match=r"\(C, X, Y, Z\)"):
        sliding_window_inference(_volume((9, 9, 9)), torch.sigmoid, 8)
    with pytest.raises(ValueError, match=r"shape \(1, 1, 8, 8, 8\)"):
        sliding_window_inference(_volume((1, 9, 9, 9)), lambda x: x[:, :, :4], 8, sw_batch_size=1)
    with pytest.raises(ValueError, match="callable"):
        sliding_window_inference(_volume((1, 9, 9, 9)), None, 8)
    with pytest.raises(ValueError, match="non-empty"):
        ensemble_predictors([])


# --------------------------------------------------------------------------- precision and brain crop


def test_precision_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, None) is None and autocast_dtype(cpu, "fp32") is None
    assert autocast_dtype(cpu, "bf16") == torch.bfloat16
    monkeypatch.setattr("strokeseg.inference.precision.cpu_supports_bf16", lambda: False)
    assert autocast_dtype(cpu, "auto") is None
    monkeypatch.setattr("strokeseg.inference.precision.cpu_supports_bf16", lambda: True)
    assert autocast_dtype(cpu, "auto") == torch.bfloat16
    with pytest.raises(ValueError, match="precision must be one of"):
        sliding_window_inference(_volume((1, 8, 8, 8)), lambda x: x.sigmoid(), 8, precision="fp16")


def test_bf16_runs_the_network_in_bfloat16_and_stays_close_to_fp32() -> None:
    net, volume = _tiny_net(), _volume((1, 20, 18, 16))
    dtypes = []
    net[0].register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    fp32 = sliding_window_inference(volume, net, 12, precision="fp32")
    bf16 = sliding_window_inference(volume, net, 12, precision="bf16")
    assert set(dtypes[: len(dtypes) // 2]) == {torch.float32} and set(dtypes[len(dtypes) // 2 :]) == {torch.bfloat16}
    assert bf16.dtype == np.float32 and 0 < np.abs(bf16 - fp32).max() < 2e-2


def test_nonzero_box_spans_every_channel() -> None:
    volume = np.zeros((2, 10, 11, 12), dtype=np.float32)
    volume[0, 2, 3, 4] = 1.0
    volume[1, 6, 8, 5] = -2.0
    assert nonzero_box(volume) == (slice(2, 7), slice(3, 9), slice(4, 6))
    assert nonzero_box(np.zeros((1, 4, 4, 4))) is None


def test_nonzero_box_grows_to_starts_and_distances_from_the_end_that_are_multiples_of_the_alignment() -> None:
    volume = np.zeros((1, 30, 26, 21), dtype=np.float32)
    volume[0, 5:19, 9:17, 3:20] = 1.0
    assert nonzero_box(volume, 8) == (slice(0, 22), slice(8, 18), slice(0, 21))  # 30 - 22 = 8, 26 - 18 = 8
    assert nonzero_box(volume, (2, 4, 1)) == (slice(4, 20), slice(8, 18), slice(3, 20))
    assert nonzero_box(volume, 1) == nonzero_box(volume) == (slice(5, 19), slice(9, 17), slice(3, 20))


def test_crop_alignment_is_the_common_divisor_of_window_step_and_network_grid() -> None:
    assert crop_alignment(96, 0.5, 32) == (16, 16, 16)  # step 48
    assert crop_alignment(48, 0.5, 32) == (8, 8, 8)  # step 24
    assert crop_alignment((64, 64, 48), 0.5, 16) == (16, 16, 8)
    assert crop_alignment(96, 0.25, 32) == (8, 8, 8)  # step 72
    assert crop_alignment(96, 0.5, 1) == (1, 1, 1)
    with pytest.raises(ValueError, match="downsampling"):
        crop_alignment(96, 0.5, 0)


def test_an_aligned_crop_predicts_what_the_whole_volume_does() -> None:
    # A network that sees its input on a 2-voxel grid (block mean, then back to full size): its
    # answer at a voxel depends on whether its window starts at an even or an odd voxel.
    grid_net = torch.nn.Sequential(torch.nn.AvgPool3d(2), torch.nn.Upsample(scale_factor=2), torch.nn.Sigmoid())
    volume = np.zeros((1, 24, 20, 16), dtype=np.float32)
    volume[0, 3:21, 5:17, 3:13] = np.random.default_rng(0).standard_normal((18, 12, 10))
    whole = sliding_window_inference(volume, grid_net, 8)  # windows at even starts only (step 4, last at 16)
    for align, exact in ((crop_alignment(8, 0.5, 2), True), (1, False)):
        box = nonzero_box(volume, align)
        cropped = sliding_window_inference(volume[(slice(None), *box)], grid_net, 8)
        assert np.allclose(cropped, whole[box], atol=1e-6) is exact, align
