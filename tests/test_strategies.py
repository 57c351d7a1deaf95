"""Tests for models/strategies.py: every strategy over every strategy-capable registered network,
any number of modalities, ResNet checkpoint key names, and a tiny training run per strategy with
the third network (resenc_unet) through train_isles_resnet18.py."""
from __future__ import annotations

import csv
import hashlib
from dataclasses import fields

import pytest
import torch

import models
import train_isles_resnet18
from models.strategies import STRATEGIES, resolve_in_channels
from strokeseg.core.io import read_json
from strokeseg.training.losses import DiceCELoss, multi_head_loss

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# tiny config per network that offers the strategies (its config has a 'variant' field)
TINY = {"resnet18": {"width": 4}, "resenc_unet": {"width": 4, "stages": 3}}
STRATEGY_ARCHS = [n for n in models.arch_names() if "variant" in {f.name for f in fields(models.arch_spec(n).config_cls)}]


def test_every_strategy_capable_network_has_a_tiny_config():
    assert set(STRATEGY_ARCHS) == set(TINY) and train_isles_resnet18.strategy_archs() == tuple(STRATEGY_ARCHS)


@pytest.mark.parametrize("arch", STRATEGY_ARCHS)
@pytest.mark.parametrize(
    "strategy,channels,heads,inference_heads,encoders",
    [
        ("single", 1, 1, (0,), 1),
        ("dwi_only", 1, 1, (0,), 1),
        ("separate", 3, 3, (0,), 3),  # any number of modalities, e.g. NCCT, CBF, CBV, MTT, Tmax
        ("shared", 2, 2, (0, 1), 1),
    ],
)
def test_strategy_layout_and_shapes(arch, strategy, channels, heads, inference_heads, encoders):
    torch.manual_seed(0)
    model = models.build_model({"arch": arch, **TINY[arch], "variant": strategy, "in_channels": channels, "norm": "group"})
    out = model(torch.randn(1, channels, 33, 32, 35))
    assert len(out) == heads and all(o.shape == (1, 2, 33, 32, 35) for o in out)
    assert model.inference_heads == inference_heads
    assert len(model.encoders) == encoders and len(model.decoders) == heads
    stems = [model.state_dict()[key].shape[1] for key in model.input_conv_keys]
    assert stems == ([1] * channels if strategy == "separate" else [channels])
    probability = models.foreground_probability(model.eval(), torch.randn(1, channels, 32, 32, 32))
    assert probability.shape == (1, 1, 32, 32, 32) and 0 <= probability.min() <= probability.max() <= 1


def test_separate_heads_see_only_their_modality():
    torch.manual_seed(0)
    model = models.build_model({"arch": "resenc_unet", **TINY["resenc_unet"], "variant": "separate", "in_channels": 3}).eval()
    x = torch.randn(1, 3, 16, 16, 16)
    changed = x.clone()
    changed[:, 2] += 5.0  # only the third modality changes
    with torch.no_grad():
        before, after = model(x), model(changed)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert not torch.allclose(before[2], after[2])


@pytest.mark.parametrize(
    "strategy,channels,match",
    [("dwi_only", 2, r"in_channels=1"), ("separate", 1, r"in_channels >= 2"), ("shared", 1, r"in_channels >= 2"), ("joint", 1, "variant")],
)
def test_strategy_channel_rules(strategy, channels, match):
    with pytest.raises(ValueError, match=match):
        resolve_in_channels(strategy, channels)
    assert resolve_in_channels("shared", None) == 2 and resolve_in_channels("single", None) == 1


# Key names and shapes of the ResNet-18 U-Net (width 4) before the strategies moved to
# models/strategies.py, so checkpoints written by earlier versions load with strict=True:
# (number of state-dict entries, sha256 of "key:shape" lines, first 16 hex digits).
RESNET_KEYS = {"single": (182, "17af804b0c986c75"), "dwi_only": (182, "17af804b0c986c75"), "separate": (364, "94cac1128f86953a"), "shared": (244, "ae28fe2dc307a1ec")}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resnet_state_dict_keys_unchanged(strategy):
    state = models.build_model({"arch": "resnet18", "variant": strategy, "width": 4}).state_dict()
    lines = [f"{key}:{tuple(tensor.shape)}" for key, tensor in state.items()]
    assert (len(lines), hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]) == RESNET_KEYS[strategy]


def test_transfer_single_source_into_every_branch(tmp_path):
    config = {"arch": "resenc_unet", **TINY["resenc_unet"]}
    torch.manual_seed(1)
    source = models.build_model(config)
    models.save_checkpoint(tmp_path / "brats.pth", source, config)
    target_config = {**config, "variant": "separate", "in_channels": 3}
    target = models.build_model(target_config)
    report = models.load_pretrained(target, target_config, tmp_path / "brats.pth")
    state = target.state_dict()
    for key, value in source.state_dict().items():
        if key.startswith("encoders.0."):
            for i in range(3):
                assert torch.equal(state[key.replace("encoders.0.", f"encoders.{i}.", 1)], value), key
    assert not report.missing and not report.inflated and all(k.startswith("decoders.") for k in report.untouched)


def test_gradients_reach_every_parameter_of_the_shared_third_network():
    torch.manual_seed(0)
    model = models.build_model({"arch": "resenc_unet", **TINY["resenc_unet"], "variant": "shared", "in_channels": 2})
    x = torch.randn(2, 2, 16, 16, 16)
    multi_head_loss(DiceCELoss(), model(x), (torch.rand(2, 1, 16, 16, 16) > 0.7).long()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# --------------------------------------------------------------------------- the training script


@pytest.fixture(scope="module")
def tiny_isles(tmp_path_factory: pytest.TempPathFactory, make_sphere_isles):
    """Six 16³ cases in the ISLES training format: a bright DWI / dark ADC sphere in noise."""
    return make_sphere_isles(tmp_path_factory.mktemp("tiny_isles"), 6, 16)


@pytest.mark.parametrize("strategy,modalities", [("dwi_only", None), ("separate", "dwi_adc"), ("shared", None)])
def test_third_network_learns_every_strategy(tiny_isles, tmp_path, strategy, modalities):
    out = tmp_path / strategy
    argv = ["--isles-dir", str(tiny_isles), "--output-dir", str(out), "--arch", "resenc_unet", "--strategy", strategy]
    argv += ["--width", "4", "--stages", "3", "--patch-size", "16", "--batch-size", "2", "--workers", "0", "--epochs", "6", "--patches-per-volume", "2"]
    argv += ["--lr", "1e-2", "--warmup-epochs", "0", "--schedule", "none", "--augment", "off", "--seed", "0", "--val-every", "6"]
    argv += ["--modalities", modalities] if modalities else []
    assert train_isles_resnet18.main(argv) == 0
    with open(out / "fold_0" / "history.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(row["train_loss"]) for row in rows]
    assert losses[-1] < losses[0] - 0.05, losses  # the loss drops (seed 0: by 0.12 to 0.42)
    assert float(rows[-1]["val_dice"]) > 0.5  # far above the empty prediction's 0 (seed 0: 0.75 to 0.97)
    model, best = models.model_from_checkpoint(out / "fold_0" / "best_model.pth")
    assert best["model_config"]["arch"] == "resenc_unet" and best["model_config"]["variant"] == strategy
    assert best["model_config"]["in_channels"] == (1 if strategy == "dwi_only" else 2)
    assert read_json(out / "fold_0" / "run_args.json")["args"]["arch"] == "resenc_unet"


def test_modalities_choice(tiny_isles, capsys):
    base = ["--isles-dir", str(tiny_isles), "--output-dir", "x"]
    select = train_isles_resnet18.select_modalities
    assert select(None, "shared", ("dwi", "adc")) == ("dwi", "adc") and select(None, "dwi_only", ("dwi", "adc")) == ("dwi",)
    assert select("adc", "dwi_only", ("dwi", "adc")) == ("adc",) and select("all", "separate", ("a", "b", "c")) == ("a", "b", "c")
    perfusion = ("ncct", "cbf", "cbv", "mtt", "tmax")  # a multimodal strategy reads every input by default
    assert select(None, "shared", perfusion) == perfusion and select(None, "dwi_only", perfusion) == ("ncct",)
    assert train_isles_resnet18.parse_args(base).arch == "resnet18"  # the paper's commands are unchanged
    for argv, message in [(["--strategy", "shared", "--modalities", "dwi_only"], "cannot read 1 modalities"),
                          (["--strategy", "dwi_only", "--modalities", "dwi_adc"], "cannot read 2 modalities"),
                          (["--modalities", "dwi,flair"], "input keys of ['dwi', 'adc']"),
                          (["--arch", "uctransnet3d"], "invalid choice")]:
        with pytest.raises(SystemExit) as exc:
            train_isles_resnet18.parse_args(base + argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err
