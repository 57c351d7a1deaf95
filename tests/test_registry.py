"""Extending the pipeline without changing a module: a toy architecture and a toy dataset,
defined here and registered at run time, go through the real training and evaluation scripts'
``main(argv)``; the registries' look-ups and errors."""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from torch import Tensor, nn

import evaluate
import extract_patches_96x96x96
import models
import models.registry
import preprocess_stroke_foundation
import train_stroke
import strokeseg.datasets.registry
from models.common import ConvNormReLU
from strokeseg.core.io import read_json, write_json
from strokeseg.datasets import synthetic
from strokeseg.datasets.foundation import foundation_dataset
from strokeseg.datasets.registry import dataset_spec, register_dataset
from strokeseg.training.arguments import model_config_from_args

PATCH = 16


@dataclass(frozen=True)
class ToyConfig:
    in_channels: int = 1
    num_classes: int = 2
    width: int = field(default=4, metadata={"help": "hidden channels"})
    norm: str = field(default="instance", metadata={"help": "normalisation", "choices": models.NORMS})
    kernel: int = field(default=3, metadata={"help": "convolution kernel edge in voxels (odd)"})


class ToyNet(nn.Module):
    """One conv-norm-ReLU and a 1x1 head: x (B, C, X, Y, Z) -> 1-tuple of logits (B, K, X, Y, Z)."""

    encoder_prefixes = ("stem.",)
    input_conv_keys = ("stem.0.weight",)
    inference_heads = (0,)

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        self.stem = ConvNormReLU(config.in_channels, config.width, config.kernel, config.norm)
        self.head = nn.Conv3d(config.width, config.num_classes, 1)

    def forward(self, x: Tensor) -> tuple[Tensor]:
        return (self.head(self.stem(x)),)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture
def toy_arch(monkeypatch: pytest.MonkeyPatch) -> models.ArchSpec:
    """'toynet' in the architecture registry for this test only."""
    monkeypatch.setattr(models.registry, "_ARCHS", dict(models.registry._ARCHS))
    return models.register_arch(models.ArchSpec("toynet", ToyConfig, ToyNet, default_patch=PATCH))


@pytest.fixture
def toy_dataset(monkeypatch: pytest.MonkeyPatch) -> strokeseg.datasets.registry.DatasetSpec:
    """'TOY' (a T1w cohort from the foundation stage, scored with the isles22 preset) in the
    dataset registry for this test only."""
    strokeseg.datasets.registry.dataset_names()  # built-ins registered before the registry is copied
    monkeypatch.setattr(strokeseg.datasets.registry, "_DATASETS", dict(strokeseg.datasets.registry._DATASETS))
    return register_dataset(foundation_dataset("TOY", "Toy cohort", preset="isles22"))


@pytest.fixture(scope="module")
def foundation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic ATLAS preprocessed twice by the foundation stage: as ATLAS and as TOY (its own
    case-id marker: ids end before "_ses-"), with 16³ lesion patches for both."""
    root = tmp_path_factory.mktemp("registry_data")
    synthetic.make_atlas(root / "raw", 7, seed=0, shape=(40, 48, 40), empty_every=0)
    patterns = {"image_pattern": "**/*_T1w.nii.gz", "mask_pattern": "**/*_label-L_desc-T1lesion_mask.nii.gz"}
    config = {
        "output_base_dir": str(root / "foundation"),
        "preprocessing": {"target_spacing": [1.0, 1.0, 1.0], "use_gpu": False},
        "datasets": [{"name": "ATLAS", "data_dir": str(root / "raw"), **patterns},
                     {"name": "TOY", "data_dir": str(root / "raw"), **patterns, "id_markers": ["_ses-"]}],
    }
    write_json(root / "config.json", config)
    assert preprocess_stroke_foundation.main(["--config", str(root / "config.json")]) == 0
    assert extract_patches_96x96x96.main(["--input_dir", str(root / "foundation"), "--output_dir", str(root / "foundation"), "--datasets", "ATLAS", "TOY",
                                          "--patch_size", str(PATCH), "--max_patches", "2", "--min_lesion_overlap", "0.0001"]) == 0
    return root / "foundation"


TRAIN = ["--epochs", "1", "--batch-size", "2", "--workers", "0", "--patches-per-volume", "2", "--fold", "0"]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _evaluate(dataset: str, foundation: Path, run: Path, out: Path) -> int:
    return evaluate.main(["--dataset", dataset, "--data-dir", str(foundation), "--run", f"toy={run}", "--output-dir", str(out),
                          "--png", "none", "--bootstrap", "20", "--sw-batch-size", "8"])


def test_toy_architecture_trains_and_evaluates_through_the_scripts(toy_arch, foundation: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    argv = ["--dataset", "ATLAS", "--data-dir", str(foundation), "--arch", "toynet", "--kernel", "1", "--output-dir", str(run), *TRAIN]
    assert train_stroke.main(argv) == 0
    best = models.load_checkpoint(run / "fold_0" / "best_model.pth")
    assert best["model_config"] == {"arch": "toynet", "in_channels": 1, "num_classes": 2, "width": 4, "norm": "instance", "kernel": 1}
    assert best["data_contract"]["window"] == [PATCH] * 3  # the arch's default patch
    assert read_json(run / "fold_0" / "run_args.json")["args"]["kernel"] == 1
    out = tmp_path / "out"
    assert _evaluate("ATLAS", foundation, run, out) == 0
    test_cases = read_json(foundation / "ATLAS" / "ATLAS_splits_5fold.json")["fold_0"]["ATLAS"]["test"]
    assert sorted(r["case_id"] for r in _rows(out / "per_case.csv")) == sorted(test_cases)
    assert read_json(out / "summary.json")["runs"]["toy"]["checkpoints"]["fold_0"]["model_config"]["arch"] == "toynet"


def test_flags_of_another_architecture_are_usage_errors(toy_arch, foundation: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        train_stroke.main(["--dataset", "ATLAS", "--data-dir", str(foundation), "--arch", "toynet", "--layers", "2", "--output-dir", str(tmp_path / "r")])
    assert info.value.code == 2
    assert "--layers: not a flag of toynet (its model flags: --width, --norm, --kernel)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown architecture 'vnet'; known: resnet18, uctransnet3d, resenc_unet, toynet"):
        model_config_from_args("vnet", {}, in_channels=1)


def test_toy_dataset_trains_and_evaluates_through_the_scripts(toy_dataset, foundation: Path, tmp_path: Path) -> None:
    ids = sorted(p.stem for p in (foundation / "TOY").glob("*.npz"))
    assert ids and all("_ses-" not in case_id for case_id in ids)  # its own case-id marker from config.json
    run = tmp_path / "run"
    model = ["--arch", "uctransnet3d", "--width", "4", "--layers", "1", "--heads", "1", "--patch-size", str(PATCH)]
    assert train_stroke.main(["--dataset", "TOY", "--data-dir", str(foundation), *model, "--output-dir", str(run), *TRAIN]) == 0
    contract = models.load_checkpoint(run / "fold_0" / "best_model.pth")["data_contract"]
    assert contract["dataset"] == "TOY" and contract["input_keys"] == ["image"] and contract["mask_key"] == "lesion_mask"
    assert contract["preprocessing"]["source"] == str(foundation / "TOY" / "run_args.json")
    out = tmp_path / "out"
    assert _evaluate("TOY", foundation, run, out) == 0
    summary = read_json(out / "summary.json")
    assert (summary["preset"]["name"], summary["preset"]["connectivity"]) == ("isles22", 26)
    assert "| Toy cohort | Scratch |" in (out / "results.md").read_text()
    assert {r["connectivity"] for r in _rows(out / "per_case.csv")} == {"26"}


def test_dataset_lookup_errors(toy_dataset) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'MYCOHORT'; known: ") as info:
        dataset_spec("MYCOHORT")
    assert sorted(str(info.value).split("known: ")[1].split(", ")) == ["ATLAS", "BraTS2024", "ISLES2022", "ISLES2024", "TOY", "UOA_Private"]
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(toy_dataset)
    assert dataset_spec("BraTS2024").load_eval_case is None and dataset_spec("ATLAS").whole_brain
