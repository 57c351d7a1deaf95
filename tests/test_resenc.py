"""Tests for models/resenc_unet.py (the third network): shapes at odd sizes and tiny widths,
input-size and config errors, the nnU-Net ResEnc M size, BatchNorm folding, checkpoints."""
from __future__ import annotations

import pytest
import torch

import models
from models import ResEncUNetConfig, build_model, count_parameters, model_from_checkpoint, save_checkpoint

TINY = {"arch": "resenc_unet", "width": 4, "stages": 3}


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.mark.parametrize(
    "config,shape",
    [
        # (model config, input shape (B, C, X, Y, Z)); logits come back on the input grid
        (TINY, (2, 1, 16, 16, 16)),
        ({**TINY, "num_classes": 1, "norm": "batch"}, (2, 1, 17, 19, 21)),
        ({**TINY, "in_channels": 3, "norm": "group"}, (1, 3, 4, 9, 5)),  # the smallest edge, 2^(3-1)
        ({**TINY, "stages": 2}, (1, 1, 3, 2, 7)),
        ({**TINY, "stages": 4, "width": 2}, (1, 1, 24, 8, 13)),
    ],
)
def test_forward_shapes(config, shape):
    torch.manual_seed(0)
    model = build_model(config)
    (logits,) = model(torch.randn(shape))
    assert logits.shape == (shape[0], config.get("num_classes", 2), *shape[2:])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_input_smaller_than_the_coarsest_grid_is_one_line_value_error():
    model = build_model({**TINY, "stages": 4})
    with pytest.raises(ValueError, match=r"^ResEncUNet with 4 stages needs input edges >= 8 voxels, got 16x7x16$"):
        model(torch.randn(1, 1, 16, 7, 16))
    with pytest.raises(ValueError, match=r"expected input \(B, 1, X, Y, Z\), got \(1, 2, 16, 16, 16\)"):
        model(torch.randn(1, 2, 16, 16, 16))


@pytest.mark.parametrize(
    "config,match",
    [({**TINY, "stages": 7}, "at most 6"), ({**TINY, "stages": 1}, "stages"), ({**TINY, "width": 0}, "width"),
     ({**TINY, "norm": "layer"}, "norm"), ({**TINY, "variant": "shared", "in_channels": 1}, "in_channels >= 2"),
     ({**TINY, "patch_size": 96}, "unknown resenc_unet model config")],
)
def test_bad_configs_raise(config, match):
    with pytest.raises(ValueError, match=match):
        build_model(config)


def test_default_is_the_resenc_m_layout():
    config = ResEncUNetConfig()
    assert config.stage_widths() == (32, 64, 128, 256, 320, 320) and config.norm == "instance"
    with torch.device("meta"):
        model = build_model({"arch": "resenc_unet"})
    blocks = [len(stage) for stage in model.encoders[0].stages]
    assert blocks == [1, 3, 4, 6, 6, 6]
    assert 95e6 < count_parameters(model) < 110e6  # 102.3 M (python -m models)
    assert models.arch_spec("resenc_unet").downsampling == 2 ** (config.stages - 1)


def test_coarsest_grid_is_the_last_stage():
    model = build_model({**TINY, "stages": 4}).eval()
    with torch.no_grad():
        features = model.encoders[0](torch.zeros(1, 1, 24, 24, 24))
    assert [f.shape[-1] for f in features] == [24, 12, 6, 3]
    assert [f.shape[1] for f in features] == [4, 8, 16, 32]


def test_batchnorm_folding_keeps_outputs():
    torch.manual_seed(0)
    model = build_model({**TINY, "norm": "batch"})
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 1, 16, 16, 16))  # running statistics
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        reference = models.foreground_probability(model.eval(), x)
        folded = models.foreground_probability(models.prepare_for_inference(model), x)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())
    assert torch.allclose(reference, folded, atol=1e-5)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    config = {**TINY, "variant": "shared", "in_channels": 2}
    model = build_model(config)
    save_checkpoint(tmp_path / "m.pth", model, config)
    loaded, checkpoint = model_from_checkpoint(tmp_path / "m.pth")
    assert checkpoint["model_config"] == models.resolve_model_config(config) == models.model_config_of(loaded)
    x = torch.randn(1, 2, 8, 8, 8)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model.eval()(x), loaded.eval()(x)))


def test_python_m_models_lists_every_registered_network(capsys):
    from models.__main__ import main

    main(["--width", "4", "--patch-size", "32"])
    out = capsys.readouterr().out
    for name in models.arch_names():
        assert f"\n{name} " in out, name
    assert "resenc_unet shared (2 ch, 2 decoders)" in out and "resnet18 separate (2 x 1 ch)" in out
    assert "uctransnet3d (1 ch) at 32^3" in out
