"""Tests for models/: shapes, gradients, parameter counts, inference rule, checkpoints, transfer."""
from __future__ import annotations

import math
import re

import pytest
import torch

import models
from torch import nn

from models import (
    VARIANTS,
    build_model,
    count_parameters,
    foreground_probability,
    load_checkpoint,
    load_pretrained,
    make_norm,
    model_config_defaults,
    model_config_of,
    model_from_checkpoint,
    resolve_model_config,
    save_checkpoint,
)
from models.uctransnet3d import SqueezeExcitation
from strokeseg.training.losses import DiceCELoss, multi_head_loss

TINY_RESNET = {"arch": "resnet18", "width": 4}
TINY_UCT = {"arch": "uctransnet3d", "width": 4, "patch_size": 32, "layers": 1, "heads": 2}


def _resnet(variant: str, **overrides) -> dict:
    return {**TINY_RESNET, "variant": variant, **overrides}


def _build(config: dict, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(config)


# --- shapes -------------------------------------------------------------------------------

SHAPE_CASES = [
    # (config, input shape (B, C, X, Y, Z), number of heads)
    (_resnet("single"), (2, 1, 32, 32, 32), 1),
    (_resnet("dwi_only", norm="group"), (2, 1, 48, 48, 48), 1),
    (_resnet("single", in_channels=3, norm="instance"), (1, 3, 48, 48, 48), 1),
    (_resnet("single", num_classes=1), (2, 1, 33, 40, 35), 1),
    (_resnet("separate"), (2, 2, 32, 32, 32), 2),
    (_resnet("separate", norm="instance"), (1, 2, 48, 48, 48), 2),
    (_resnet("shared", norm="group"), (2, 2, 32, 32, 32), 2),
    (_resnet("shared", norm="batch"), (2, 2, 48, 40, 56), 2),
    (TINY_UCT, (2, 1, 32, 32, 32), 1),
    ({**TINY_UCT, "patch_size": 48, "norm": "batch", "num_classes": 1}, (2, 1, 48, 48, 48), 1),
    ({**TINY_UCT, "norm": "instance", "in_channels": 2}, (1, 2, 32, 32, 32), 1),
]


@pytest.mark.parametrize("config,shape,heads", SHAPE_CASES)
def test_forward_returns_full_resolution_logits_per_head(config, shape, heads):
    model = _build(config)
    out = model(torch.randn(shape))
    num_classes = config.get("num_classes", 2)
    assert isinstance(out, tuple) and len(out) == heads
    for logits in out:
        assert logits.shape == (shape[0], num_classes, *shape[2:])
        assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_uctransnet_rejects_other_patch_size_naming_both():
    model = _build(TINY_UCT)
    with pytest.raises(ValueError, match=r"32x32x32.*48x48x48"):
        model(torch.randn(1, 1, 48, 48, 48))


def test_wrong_input_channels_rejected():
    with pytest.raises(ValueError, match=r"\(B, 2, X, Y, Z\)"):
        _build(_resnet("shared"))(torch.randn(1, 1, 32, 32, 32))


# --- gradients ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config,shape",
    [
        (_resnet("single"), (2, 1, 32, 32, 32)),
        (_resnet("separate", norm="group"), (2, 2, 32, 32, 32)),
        (_resnet("shared"), (2, 2, 32, 32, 32)),
        (TINY_UCT, (2, 1, 32, 32, 32)),
    ],
)
def test_gradients_reach_every_parameter(config, shape):
    model = _build(config)
    for module in model.modules():
        if isinstance(module, SqueezeExcitation):
            # A 1-2 unit SE bottleneck (tiny width) sees near-identical pooled inputs across the
            # batch, so its ReLU is often off for all samples; switch it on (pre-activation 1)
            # so the test checks wiring, not initialisation luck.
            nn.init.zeros_(module.fc[0].weight)
            nn.init.ones_(module.fc[0].bias)
    x = torch.randn(shape)
    target = (torch.rand(shape[0], 1, *shape[2:]) > 0.7).long()
    multi_head_loss(DiceCELoss(), model(x), target).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


# --- sizes and norms ----------------------------------------------------------------------


def test_full_width_parameter_counts_match_paper():
    with torch.device("meta"):
        resnet = count_parameters(build_model({"arch": "resnet18", "variant": "single"}))
        uct = count_parameters(build_model({"arch": "uctransnet3d", "patch_size": 64}))
    assert abs(resnet - 42e6) / 42e6 < 0.05, resnet
    assert abs(uct - 93e6) / 93e6 < 0.05, uct


@pytest.mark.parametrize("config", [{"arch": "resnet18", "variant": "single", "width": 4}, {"arch": "uctransnet3d", "width": 4, "patch_size": 32}])
def test_registered_downsampling_is_the_coarsest_feature_grid(config):
    net, edges = build_model(config).eval(), []

    def record(module, inputs, out):
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        edges.extend(t.shape[-1] for t in outputs if isinstance(t, torch.Tensor) and t.ndim == 5)

    for module in net.modules():
        module.register_forward_hook(record)
    with torch.no_grad():
        net(torch.zeros(1, 1, 32, 32, 32))
    assert 32 // min(edges) == models.arch_spec(config["arch"]).downsampling


def test_group_norm_divides_any_width():
    for channels, groups in [(64, 8), (12, 4), (6, 2), (3, 1), (1, 1)]:
        norm = make_norm("group", channels)
        assert norm.num_groups == groups and norm.num_channels == channels
    with pytest.raises(ValueError, match="layer"):
        make_norm("layer", 8)


# --- factory ------------------------------------------------------------------------------


def test_resolve_fills_defaults_and_derives_channels():
    assert resolve_model_config({"arch": "resnet18", "variant": "shared"}) == {
        "arch": "resnet18", "variant": "shared", "in_channels": 2, "num_classes": 2, "width": 64, "norm": "batch",
    }
    defaults = model_config_defaults("uctransnet3d")
    assert (defaults["patch_size"], defaults["layers"], defaults["heads"], defaults["norm"]) == (64, 4, 4, "group")


def test_checkpoint_with_the_former_resnet_name_loads(tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY_RESNET)
    old = {"format_version": 1, "model_config": {"arch": "resnet18_unet", "variant": "single", "in_channels": 1,
                                                 "num_classes": 2, "width": 4, "norm": "batch"}, "model": model.state_dict()}
    torch.save(old, tmp_path / "old.pth")
    loaded, checkpoint = model_from_checkpoint(tmp_path / "old.pth")
    assert model_config_of(loaded)["arch"] == "resnet18" and checkpoint["model_config"]["arch"] == "resnet18_unet"
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_unknown_architecture_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown architecture 'vnet'; known: resnet18, uctransnet3d"):
        models.arch_spec("vnet")
    with pytest.raises(ValueError, match="already registered"):
        models.register_arch(models.arch_spec("resnet18"))


@pytest.mark.parametrize(
    "config,match",
    [
        ({"arch": "unet"}, "arch"),
        ({"width": 4}, "arch"),
        ({**TINY_RESNET, "patch_size": 96}, r"unknown resnet18 model config key\(s\) \['patch_size'\]"),
        ({**TINY_RESNET, "variant": "joint"}, "variant"),
        ({**TINY_RESNET, "variant": "dwi_only", "in_channels": 2}, "in_channels=1"),
        ({**TINY_RESNET, "norm": "layer"}, "norm"),
        ({**TINY_RESNET, "width": 0}, "width"),
        ({**TINY_RESNET, "width": 4.0}, "width"),
        ({**TINY_UCT, "patch_size": 40}, "divisible by 16"),
        ({**TINY_UCT, "heads": True}, "heads"),
        ({**TINY_UCT, "dropout": 1.5}, "dropout"),
    ],
)
def test_bad_model_configs_raise(config, match):
    with pytest.raises(ValueError, match=match):
        build_model(config)


# --- inference rule -----------------------------------------------------------------------


def test_separate_inference_uses_dwi_channel_only():
    model = _build(_resnet("separate")).eval()
    x = torch.randn(2, 2, 32, 32, 32)
    with torch.no_grad():
        base = foreground_probability(model, x)
        other_adc = x.clone()
        other_adc[:, 1] = torch.randn_like(other_adc[:, 1])
        other_dwi = x.clone()
        other_dwi[:, 0] = torch.randn_like(other_dwi[:, 0])
        assert base.shape == (2, 1, 32, 32, 32)
        assert torch.equal(foreground_probability(model, other_adc), base)
        assert not torch.allclose(foreground_probability(model, other_dwi), base)
        assert torch.allclose(base, torch.softmax(model(x)[0], dim=1)[:, 1:2])


def test_shared_inference_averages_both_heads():
    model = _build(_resnet("shared")).eval()
    x = torch.randn(2, 2, 32, 32, 32)
    with torch.no_grad():
        dwi, adc = model(x)
        expected = (torch.softmax(dwi, dim=1)[:, 1:2] + torch.softmax(adc, dim=1)[:, 1:2]) / 2
        assert not torch.allclose(dwi, adc)
        assert torch.allclose(foreground_probability(model, x), expected, atol=1e-6)


def test_single_logit_model_uses_sigmoid():
    model = _build(_resnet("single", num_classes=1)).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(foreground_probability(model, x), torch.sigmoid(model(x)[0]))


# --- checkpoints --------------------------------------------------------------------------


@pytest.mark.parametrize("config", [_resnet("shared", norm="group"), TINY_UCT])
def test_checkpoint_round_trip_rebuilds_identical_model(tmp_path, config):
    model = _build(config)
    model(torch.randn(2, model.config.in_channels, 32, 32, 32))  # move BatchNorm running stats
    optimizer = torch.optim.AdamW(model.parameters())
    path = tmp_path / "ckpt" / "best.pt"
    save_checkpoint(path, model, config, epoch=3, best_score=0.5, optimizer=optimizer.state_dict(), config={"lr": 1e-3})
    loaded, checkpoint = model_from_checkpoint(path)
    assert checkpoint["epoch"] == 3 and checkpoint["config"] == {"lr": 1e-3}
    assert checkpoint["model_config"] == model_config_of(model)
    x = torch.randn(1, model.config.in_channels, 32, 32, 32)
    with torch.no_grad():
        for a, b in zip(model.eval()(x), loaded.eval()(x)):
            assert torch.equal(a, b)
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]  # no temp files left


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch.compile internals
def test_wrapped_models_saved_without_prefixes(tmp_path):
    model = _build(_resnet("single"))
    for wrapper in (nn.DataParallel(model), torch.compile(model)):
        save_checkpoint(tmp_path / "w.pt", wrapper, _resnet("single"))
        keys = list(load_checkpoint(tmp_path / "w.pt")["model"])
        assert keys == list(model.state_dict())


def test_save_rejects_config_mismatch_and_unloadable_extras(tmp_path):
    model = _build(_resnet("single"))
    with pytest.raises(ValueError, match="does not describe"):
        save_checkpoint(tmp_path / "a.pt", model, _resnet("single", width=8))
    with pytest.raises(ValueError, match=r"extra\['rng'\]\['numpy'\].*ndarray"):
        save_checkpoint(tmp_path / "a.pt", model, _resnet("single"), rng={"numpy": __import__("numpy").zeros(3)})
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "a.pt", model, _resnet("single"), format_version=2)
    assert not (tmp_path / "a.pt").exists()


def test_load_checkpoint_errors(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(missing)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match=r"notes.pt: not a readable checkpoint"):
        load_checkpoint(text)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(ValueError, match=r"tensor.pt: not a checkpoint of this pipeline"):
        load_checkpoint(tensor)


# --- transfer -----------------------------------------------------------------------------


@pytest.fixture()
def resnet_source(tmp_path):
    """A saved 1-channel single ResNet U-Net (width 4, BatchNorm) and its state_dict."""
    source = _build(_resnet("single"), seed=1)
    path = tmp_path / "brats.pt"
    save_checkpoint(path, source, _resnet("single"))
    return path, source.state_dict()


def test_transfer_into_separate_copies_encoder_into_both_unets(resnet_source):
    path, source = resnet_source
    target = _build(_resnet("separate"), seed=2)
    decoder_before = target.state_dict()["decoders.1.head.weight"].clone()
    report = load_pretrained(target, _resnet("separate"), path, scope="encoder")
    state = target.state_dict()
    encoder_keys = [k for k in source if k.startswith("encoders.0.")]
    for key in encoder_keys:
        assert torch.equal(state[key], source[key]), key
        assert torch.equal(state[key.replace("encoders.0.", "encoders.1.", 1)], source[key]), key
    assert torch.equal(state["decoders.1.head.weight"], decoder_before)
    assert len(report.copied) == 2 * len(encoder_keys) and not report.inflated
    assert not report.missing and not report.unexpected and report.untouched
    encoder_parameters = sum(v.numel() for k, v in target.named_parameters() if k.startswith("encoders.0."))
    total = sum(v.numel() for v in target.parameters())
    assert report.parameters_copied == 2 * encoder_parameters and report.parameters_total == total
    assert report.summary().startswith(
        f"transfer from {path} (scope=encoder): copied {2 * len(encoder_keys)} tensors, "
        f"{2 * encoder_parameters:,} of {total:,} parameters ({2 * encoder_parameters / total:.1%})"
    )
    buffers = sum(state[k].numel() for k in report.copied if "running" in k or "num_batches" in k)
    assert buffers > 0  # BatchNorm statistics were copied but are not counted as parameters


def test_transfer_into_shared_inflates_stem(resnet_source):
    path, source = resnet_source
    target = _build(_resnet("shared"), seed=2)
    report = load_pretrained(target, _resnet("shared"), path, scope="all")
    state = target.state_dict()
    stem = source["encoders.0.stem.0.weight"]  # (4, 1, 7, 7, 7)
    assert state["encoders.0.stem.0.weight"].shape == (4, 2, 7, 7, 7)
    assert torch.equal(state["encoders.0.stem.0.weight"], torch.cat([stem, stem], dim=1) / 2)
    assert report.inflated == ["encoders.0.stem.0.weight"]
    for key in source:
        if key.startswith("decoders.0."):
            assert torch.equal(state[key], source[key])
            assert torch.equal(state[key.replace("decoders.0.", "decoders.1.", 1)], source[key])
    assert not report.untouched and not report.missing


@pytest.mark.parametrize("config", [_resnet(v) for v in VARIANTS] + [TINY_UCT])
def test_transfer_metadata_names_real_keys(config):
    model = _build(config)
    keys = model.state_dict()
    separate = config.get("variant") == "separate"
    stem_inputs = [keys[k].shape[1] for k in model.input_conv_keys]  # KeyError if a name is stale
    assert stem_inputs == ([1, 1] if separate else [model.config.in_channels])
    assert sum(k.startswith(model.encoder_prefixes) for k in keys) > 10


def test_transfer_uctransnet_inflates_two_channel_stem(tmp_path):
    source = _build(TINY_UCT, seed=1)
    path = tmp_path / "uct.pt"
    save_checkpoint(path, source, TINY_UCT)
    config2 = {**TINY_UCT, "in_channels": 2}
    target = _build(config2)
    report = load_pretrained(target, config2, path, scope="all")
    stem = source.state_dict()["encoder.0.0.0.weight"]
    assert report.inflated == ["encoder.0.0.0.weight"] and not report.untouched
    assert torch.equal(target.state_dict()["encoder.0.0.0.weight"], stem.repeat(1, 2, 1, 1, 1) / 2)


def test_transfer_uctransnet_encoder_only(tmp_path):
    source = _build(TINY_UCT, seed=1)
    path = tmp_path / "uct.pt"
    save_checkpoint(path, source, TINY_UCT)
    target = _build(TINY_UCT, seed=2)
    transformer_before = target.state_dict()["transformer.embeddings.0.position"].clone()
    report = load_pretrained(target, TINY_UCT, path)
    for key, value in source.state_dict().items():
        if key.startswith("encoder."):
            assert torch.equal(target.state_dict()[key], value), key
    assert torch.equal(target.state_dict()["transformer.embeddings.0.position"], transformer_before)
    assert report.copied and not report.missing and not report.unexpected
    encoder = sum(v.numel() for k, v in target.named_parameters() if k.startswith("encoder."))
    total = sum(v.numel() for v in target.parameters())
    assert report.parameters_copied == encoder < total and report.parameters_total == total
    everything = load_pretrained(_build(TINY_UCT, seed=3), TINY_UCT, path, scope="all")
    assert everything.parameters_copied == everything.parameters_total == total


@pytest.mark.parametrize(
    "target_config,match",
    [
        (
            _resnet("single", width=8),
            r"shape mismatch for encoders\.0\.stem\.0\.weight: checkpoint \(4, 1, 7, 7, 7\), target \(8, 1, 7, 7, 7\)",
        ),
        (_resnet("single", norm="group"), r"norm 'batch' differs from target norm 'group'"),
        (TINY_UCT, r"arch 'resnet18' differs from target arch 'uctransnet3d'"),
    ],
)
def test_transfer_errors_leave_model_unchanged(resnet_source, target_config, match):
    path, _ = resnet_source
    target = _build(target_config)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        load_pretrained(target, target_config, path)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_transfer_patch_size_and_file_errors(tmp_path):
    path = tmp_path / "uct.pt"
    save_checkpoint(path, _build(TINY_UCT), TINY_UCT)
    config48 = {**TINY_UCT, "patch_size": 48}
    with pytest.raises(ValueError, match=r"patch_size 32 differs from target patch_size 48"):
        load_pretrained(_build(config48), config48, path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_pretrained(_build(TINY_UCT), TINY_UCT, tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="junk.pt: not a readable checkpoint"):
        load_pretrained(_build(TINY_UCT), TINY_UCT, junk)
    with pytest.raises(ValueError, match="scope"):
        load_pretrained(_build(TINY_UCT), TINY_UCT, path, scope="decoder")


def test_transfer_wrong_target_config_rejected(resnet_source):
    path, _ = resnet_source
    with pytest.raises(ValueError, match="does not describe the target"):
        load_pretrained(_build(_resnet("single")), _resnet("shared"), path)


def test_inflation_preserves_response_to_equal_channels(resnet_source):
    path, source_state = resnet_source
    source = _build(_resnet("single"))
    source.load_state_dict(source_state)
    target = _build(_resnet("shared"))
    load_pretrained(target, _resnet("shared"), path)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        a = source.encoders[0].stem[0](x)
        b = target.encoders[0].stem[0](x.repeat(1, 2, 1, 1, 1))
    assert torch.allclose(a, b, atol=1e-5)
    inflated_sum = float(target.encoders[0].stem[0].weight.detach().sum())
    assert math.isclose(inflated_sum, float(source_state["encoders.0.stem.0.weight"].sum()), rel_tol=1e-5)


def test_checkpoint_weights_digest_and_finiteness_are_checked_at_load(tmp_path, capsys):
    model = _build(_resnet("single"))
    path = tmp_path / "best.pt"
    save_checkpoint(path, model, _resnet("single"), epoch=1)
    stored = torch.load(path, weights_only=True)
    assert stored[models.DIGEST_KEY] == models.weights_digest(model.state_dict()) == models.weights_digest(load_checkpoint(path)["model"])
    key = next(k for k, v in stored["model"].items() if v.dim() == 5)
    stored["model"][key].view(-1)[0] = 1.1e37  # finite: only the digest catches it
    torch.save(stored, path)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: weights differ from the digest recorded when it was saved"):
        load_checkpoint(path)
    del stored[models.DIGEST_KEY]  # written before digests: loads, with one NOTE however often it is read
    torch.save(stored, path)
    load_checkpoint(path)
    model_from_checkpoint(path)
    notes = [line for line in capsys.readouterr().out.splitlines() if "NOTE" in line]
    assert len(notes) == 1 and f"NOTE {path}: written before checkpoints recorded a weights digest" in notes[0]
    stored["model"][key].view(-1)[0] = float("inf")  # ... but its weights must still be finite
    torch.save(stored, path)
    with pytest.raises(ValueError, match=rf"non-finite weights \(NaN or inf\) in tensor '{re.escape(key)}'"):
        load_checkpoint(path)
