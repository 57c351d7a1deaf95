"""Tests of strokeseg.inference.inferer and strokeseg.inference.precision: the window rule, window
stitching against one whole-volume pass, mirror TTA, the precision table and the brain crop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from strokeseg.inference.inferer import Inferer, inference_window
from strokeseg.inference.precision import autocast_dtype, resolve_precision


def _volume(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _pointwise_net(in_channels: int = 2, seed: int = 0) -> torch.nn.Module:
    """A 1x1x1 network: exactly translation-equivariant, so no window edge changes its output."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(in_channels, 4, 1), torch.nn.Tanh(), torch.nn.Conv3d(4, 1, 1), torch.nn.Sigmoid()).eval()


def _asymmetric_net(seed: int = 0) -> torch.nn.Module:
    """A 3x3x3 network with random (not mirror-symmetric) kernels."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(3, 1, 3, padding=1), torch.nn.Sigmoid()).eval()


class _Recorder:
    """A predictor that records the spatial shape of every batch it sees."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net, self.shapes = net, []

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(batch.shape[2:]))
        return self.net(batch)


# --------------------------------------------------------------------------- window rule


@pytest.mark.parametrize(
    "window, shape, fixed, expected",
    [
        (96, (32, 40, 24), False, (32, 40, 24)),  # covered: the whole volume, as in training
        (96, (197, 233, 189), False, (96, 96, 96)),
        (96, (96, 96, 96), False, (96, 96, 96)),
        (96, (97, 40, 24), False, (96, 96, 96)),  # one axis longer than the window: windows
        ((16, 12, 8), (15, 11, 7), False, (15, 11, 7)),
        ((16, 12, 8), (15, 13, 7), False, (16, 12, 8)),
        (16, (12, 12, 12), True, (16, 16, 16)),  # a fixed-input-size network: always its window
        ((16, 12, 8), (40, 40, 40), True, (16, 12, 8)),
    ],
)
def test_inference_window_is_the_whole_volume_only_when_the_window_covers_it(window, shape, fixed, expected) -> None:
    assert inference_window(window, shape, fixed) == expected


def test_the_inferer_runs_one_whole_volume_pass_or_windows() -> None:
    net = _pointwise_net(1)
    small, large = _volume((1, 11, 9, 7)), _volume((1, 21, 9, 7))
    seen = _Recorder(net)
    Inferer()(small, seen, 16)
    assert seen.shapes == [(11, 9, 7)]  # not a zero-padded 16³ window
    seen = _Recorder(net)
    Inferer()(small, seen, 16, fixed_input_size=True)
    assert seen.shapes == [(16, 16, 16)]
    seen = _Recorder(net)
    Inferer(overlap=0.5)(large, seen, 12)
    assert set(seen.shapes) == {(12, 12, 12)} and len(seen.shapes) == 1  # 3 x 1 x 1 windows, one batch of 3


# --------------------------------------------------------------------------- stitching and TTA


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_windows_equal_one_whole_volume_pass_for_a_translation_equivariant_net(mode: str, overlap: float) -> None:
    net, volume = _pointwise_net(), _volume((2, 23, 19, 17), seed=1)
    whole = Inferer()(volume, net, (23, 19, 17))
    windowed = Inferer(overlap=overlap, mode=mode, sw_batch_size=3)(volume, net, (8, 7, 6))
    with torch.no_grad():
        direct = net(torch.from_numpy(volume)[None])[0, 0].numpy()
    assert windowed.shape == whole.shape == (23, 19, 17) and windowed.dtype == np.float32
    np.testing.assert_allclose(whole, direct, atol=1e-6)
    np.testing.assert_allclose(windowed, whole, atol=1e-5)


def test_mirror_tta_makes_the_prediction_flip_equivariant() -> None:
    net, volume = _asymmetric_net(), _volume((1, 10, 9, 8), seed=2)
    flipped = volume[:, ::-1, :, ::-1].copy()
    plain = Inferer()
    assert np.abs(plain(flipped, net, 16) - plain(volume, net, 16)[::-1, :, ::-1]).max() > 1e-3  # the net alone is not
    tta = Inferer(mirror_tta=True)
    np.testing.assert_allclose(tta(flipped, net, 16), tta(volume, net, 16)[::-1, :, ::-1], atol=1e-5)


def test_the_inferer_takes_a_tensor_as_training_validation_passes_it() -> None:
    net, volume = _pointwise_net(), _volume((2, 13, 12, 11))
    np.testing.assert_array_equal(Inferer()(torch.from_numpy(volume), net, 8), Inferer()(volume, net, 8))


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize(
    "requested, device, cpu_bf16, cuda_bf16, expected",
    [
        (None, "cpu", False, False, "fp32"),
        (None, "cpu", True, False, "fp32"),  # the default stays reproducible on any CPU
        (None, "cuda", False, True, "bf16"),
        (None, "cuda", False, False, "fp16"),
        ("auto", "cpu", False, False, "fp32"),
        ("auto", "cpu", True, False, "bf16"),
        ("auto", "cuda", False, True, "bf16"),
        ("auto", "cuda", False, False, "fp16"),
        ("fp32", "cpu", True, True, "fp32"),
        ("fp32", "cuda", True, True, "fp32"),
        ("bf16", "cpu", False, False, "bf16"),
        ("bf16", "cuda", False, False, "bf16"),
    ],
)
def test_precision_resolution_table(monkeypatch: pytest.MonkeyPatch, requested, device, cpu_bf16, cuda_bf16, expected) -> None:
    monkeypatch.setattr("strokeseg.inference.precision.cpu_supports_bf16", lambda: cpu_bf16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    assert resolve_precision(requested, torch.device(device)) == expected
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    assert autocast_dtype(torch.device(device), requested) == dtypes[expected]
    assert Inferer(device=torch.device(device), precision=requested).resolved_precision == expected


@pytest.mark.parametrize("bad", [{"precision": "fp16"}, {"precision": "float32"}, {"overlap": 1.0}, {"overlap": -0.1}, {"mode": "mean"}, {"sw_batch_size": 0}])
def test_invalid_settings_raise_value_error(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        Inferer(**bad)


def test_the_inferer_runs_the_network_at_its_precision() -> None:
    net, volume = _asymmetric_net(), _volume((1, 9, 8, 7))
    dtypes = []
    net[0].register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    fp32 = Inferer(precision="fp32")(volume, net, 16)
    bf16 = Inferer(precision="bf16")(volume, net, 16)
    assert dtypes == [torch.float32, torch.bfloat16]
    assert 0 < np.abs(bf16 - fp32).max() < 2e-2


# --------------------------------------------------------------------------- brain crop


def test_the_brain_crop_runs_the_brain_box_only_and_maps_back_to_the_full_grid() -> None:
    net = _pointwise_net(1)
    volume = np.zeros((1, 30, 28, 26), dtype=np.float32)
    volume[:, 9:17, 11:20, 5:13] = _volume((1, 8, 9, 8), seed=3)
    seen = _Recorder(net)
    cropped = Inferer(brain_crop=True)(volume, seen, 12, downsampling=4)
    whole = Inferer()(volume, net, 12, downsampling=4)
    # the box grown to multiples of gcd(12, 6, 4) = 2: x 8..18, y 10..20, z 4..14 (stops counted from the end)
    box = (slice(8, 18), slice(10, 20), slice(4, 14))
    assert seen.shapes == [(10, 10, 10)] and cropped.shape == volume.shape[1:]
    np.testing.assert_allclose(cropped[box], whole[box], atol=1e-6)
    outside = np.ones(cropped.shape, dtype=bool)
    outside[box] = False
    assert not cropped[outside].any() and whole[outside].min() > 0  # background, where the net alone says otherwise


def test_the_brain_crop_of_an_empty_volume_runs_it_whole() -> None:
    net = _pointwise_net(1)
    volume = np.zeros((1, 10, 9, 8), dtype=np.float32)
    np.testing.assert_array_equal(Inferer(brain_crop=True)(volume, net, 16), Inferer()(volume, net, 16))


# --------------------------------------------------------------------------- training validation


@pytest.mark.parametrize("amp, precision", [("auto", None), ("off", "fp32")])
def test_training_validation_runs_the_same_inferer(amp: str, precision: str | None) -> None:
    from pathlib import Path

    from strokeseg.training.settings import TrainSettings
    from strokeseg.training.validation import validation_inferer

    values = dict(output_dir=Path("run"), fold=0, epochs=1, batch_size=1, lr=1e-3, weight_decay=0.0, optimizer="adamw", momentum=0.9,
                  schedule="cosine", warmup_epochs=0.0, grad_clip=1.0, loss="gdice", amp=amp, seed=0, workers=0, overlap=0.25, sw_batch_size=3)
    inferer = validation_inferer(TrainSettings(**values), torch.device("cpu"))
    assert inferer == Inferer(overlap=0.25, sw_batch_size=3, precision=precision)
    assert inferer.resolved_precision == "fp32"  # validation on the CPU is reproducible whatever --amp says
