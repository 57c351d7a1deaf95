"""The fast inference path (models.prepare_for_inference: BatchNorm folded into the convolutions)
gives the probabilities of the network as trained: <= 1e-5 at fp32, <= 1e-3 at bf16 (issue 25)."""
from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from torch import nn

import models
from strokeseg.inference.sliding_window import sliding_window_inference


def _trained_like(config: dict, seed: int = 0) -> nn.Module:
    """A tiny network whose BatchNorm running statistics and affine weights are far from their
    initial values (a fold of the identity statistics would hide mistakes), in eval mode."""
    torch.manual_seed(seed)
    model = models.build_model(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm3d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _probabilities(model: nn.Module, volume: np.ndarray, precision: str) -> np.ndarray:
    predictor = functools.partial(models.foreground_probability, model)
    return sliding_window_inference(volume, predictor, 32, overlap=0.5, sw_batch_size=2, precision=precision)


# (config, precisions): bf16 is emulated (slowly) on CPUs without AVX512-BF16/AMX, so only the
# network with the most folded BatchNorms is also checked in bf16.
CASES = [
    ({"arch": "resnet18", "variant": "shared", "width": 4}, ("fp32", "bf16")),
    ({"arch": "uctransnet3d", "patch_size": 32, "width": 4, "norm": "batch", "layers": 1}, ("fp32",)),
]
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-3}


@pytest.mark.parametrize("config, precisions", CASES, ids=["resnet18", "uctransnet3d"])
def test_folded_network_equals_network_as_trained(config: dict, precisions: tuple[str, ...]) -> None:
    model = _trained_like(config)
    before = model.to(memory_format=torch.channels_last_3d)  # today's path: eval, channels-last
    after = models.prepare_for_inference(copy.deepcopy(model))
    assert not any(isinstance(m, nn.BatchNorm3d) for m in after.modules())
    volume = np.random.default_rng(0).standard_normal((model.config.in_channels, 34, 32, 32)).astype(np.float32)
    for precision in precisions:
        expected, got = _probabilities(before, volume, precision), _probabilities(after, volume, precision)
        assert np.abs(got - expected).max() <= TOLERANCE[precision], precision


def test_fold_batchnorm_by_hand() -> None:
    """A (Conv3d, BatchNorm3d) pair and a ``conv_norm_pairs`` pair fold to conv(x) * scale + shift,
    with scale = gamma / sqrt(var + eps) and shift = beta - mean * scale, computed here by hand."""
    torch.manual_seed(1)
    conv = nn.Conv3d(2, 3, 1, bias=False)
    norm = nn.BatchNorm3d(3).eval()
    norm.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    norm.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, -1.0]))
        norm.bias.copy_(torch.tensor([0.0, 1.0, 3.0]))
    x = torch.randn(1, 2, 3, 3, 3)
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    expected = (conv(x) - norm.running_mean.view(1, 3, 1, 1, 1)) * scale.view(1, 3, 1, 1, 1) + norm.bias.view(1, 3, 1, 1, 1)

    class Block(nn.Module):
        conv_norm_pairs = (("conv", "norm"),)

        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm = copy.deepcopy(conv), copy.deepcopy(norm)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.conv(x))

    for model in (nn.Sequential(copy.deepcopy(conv), copy.deepcopy(norm)).eval(), Block().eval()):
        assert models.fold_batchnorm(model) == 1
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)


def test_fold_batchnorm_refuses_training_mode() -> None:
    with pytest.raises(ValueError, match="eval-mode"):
        models.fold_batchnorm(nn.Sequential(nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2)))


def test_no_window_batch_of_one_when_more_are_left() -> None:
    """5 windows at sw_batch_size 4 run as batches of 3 and 2, not 4 and 1 (a batch-1 3-D
    convolution falls back to PyTorch's slow native loop), with unchanged probabilities."""
    sizes = []

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        sizes.append(batch.shape[0])
        return torch.sigmoid(batch.sum(dim=1, keepdim=True))

    volume = np.random.default_rng(0).standard_normal((2, 24, 8, 8)).astype(np.float32)  # 5 windows of 8³ along x
    batched = sliding_window_inference(volume, predictor, 8, overlap=0.5, sw_batch_size=4)
    assert sorted(sizes) == [2, 3]
    sizes.clear()
    single = sliding_window_inference(volume, predictor, 8, overlap=0.5, sw_batch_size=1)
    assert sizes == [1] * 5
    np.testing.assert_allclose(batched, single, atol=1e-6)
