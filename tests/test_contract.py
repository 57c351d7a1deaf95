"""The checkpoint data contract: stored by the training scripts, read by evaluation, which
refuses data preprocessed with other settings; checkpoints written before contracts."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import evaluate
import models
import preprocess_isles_WITH_BBOX
import preprocess_v2_isles
import train_isles_resnet18
from strokeseg.datasets.contract import THRESHOLD, DataContract, preprocessing_differences, read_contract
from strokeseg.core.io import CaseError, read_json
from strokeseg.datasets import synthetic

SHAPE = ["32", "32", "32"]


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def isles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic ISLES preprocessed for training (32³, margin 4) and a one-epoch DWI-only run."""
    root = tmp_path_factory.mktemp("contract")
    synthetic.make_isles(root / "raw", 8, layout="B", seed=0, shape=(40, 40, 24))
    assert preprocess_v2_isles.main(["--isles-dir", str(root / "raw"), "--output-dir", str(root / "train"), "--target-shape", *SHAPE]) == 0
    argv = ["--isles-dir", str(root / "train"), "--output-dir", str(root / "run"), "--epochs", "1", "--width", "4", "--patch-size", "32",
            "--batch-size", "2", "--workers", "0", "--strategy", "dwi_only"]
    assert train_isles_resnet18.main(argv) == 0
    return root


def _eval_data(isles: Path, name: str, *flags: str) -> Path:
    out = isles / name
    if not out.is_dir():
        assert preprocess_isles_WITH_BBOX.main(["--isles-dir", str(isles / "raw"), "--output-dir", str(out), *flags]) == 0
    return out


def _evaluate(data: Path, checkpoints: list[Path], out: Path, *extra: str) -> int:
    return evaluate.main(["--dataset", "ISLES2022", "--data-dir", str(data), "--checkpoints", *map(str, checkpoints),
                          "--output-dir", str(out), "--png", "none", "--bootstrap", "20", *extra])


def test_every_checkpoint_holds_the_contract(isles: Path) -> None:
    splits = read_json(isles / "train" / "isles2022_splits_5fold.json")["fold_0"]["ISLES2022"]
    expected = {
        "dataset": "ISLES2022", "input_keys": ["dwi"], "mask_key": "mask", "window": [32, 32, 32], "threshold": THRESHOLD,
        "preprocessing": {"source": str(isles / "train" / "run_args.json"), "target_shape": [32, 32, 32], "margin": 4},
        "acquisition": {"dwi_b_value": 1000.0, "adc_unit": 1e-3},  # the ISLES 2022 spec's
        "fold": 0, "train_cases": splits["train"], "val_cases": splits["val"],
        "fingerprint": read_json(isles / "train" / "dataset_fingerprint.json")["summary"],  # the stage's, copied by the trainer
    }
    for name in ("best_model.pth", "last.pth"):
        assert models.load_checkpoint(isles / "run" / "fold_0" / name)["data_contract"] == expected
    contract = read_contract(isles / "run" / "fold_0" / "best_model.pth")
    assert isinstance(contract, DataContract) and not contract.derived
    assert (contract.input_keys, contract.window, contract.fold, contract.val_cases) == (("dwi",), (32, 32, 32), 0, tuple(splits["val"]))


def test_evaluation_data_with_the_training_settings_is_scored_without_a_splits_flag(isles: Path, tmp_path: Path) -> None:
    data = _eval_data(isles, "eval_same", "--target-shape", *SHAPE)
    # preprocess_isles_WITH_BBOX.py wrote the training preprocessing's splits file beside its output
    assert read_json(data / "isles2022_splits_5fold.json") == read_json(isles / "train" / "isles2022_splits_5fold.json")
    assert _evaluate(data, [isles / "run" / "fold_0" / "best_model.pth"], tmp_path / "out") == 0
    test = read_json(isles / "train" / "isles2022_splits_5fold.json")["fold_0"]["ISLES2022"]["test"]
    assert read_json(tmp_path / "out" / "summary.json")["n_done"] == len(test)


@pytest.mark.parametrize("name,flags,difference", [
    ("eval_24", ["--target-shape", "24", "24", "24"], "target_shape [32, 32, 32] vs [24, 24, 24]"),
    ("eval_margin", ["--target-shape", *SHAPE, "--margin", "2"], "margin 4 vs 2"),
])
def test_evaluation_refuses_other_preprocessing(isles: Path, tmp_path: Path, capsys: pytest.CaptureFixture, name: str, flags: list[str], difference: str) -> None:
    data = _eval_data(isles, name, *flags)
    checkpoint = isles / "run" / "fold_0" / "best_model.pth"
    assert _evaluate(data, [checkpoint], tmp_path / "out") == 1
    (error,) = [line for line in capsys.readouterr().out.splitlines() if "ERROR" in line]
    assert f"{checkpoint}: trained on data preprocessed with other settings than {data}: {difference}" in error
    assert f"training {isles / 'train' / 'run_args.json'}, evaluation {data / 'run_args.json'}" in error
    assert not (tmp_path / "out" / "per_case.csv").exists()


def _strip_contract(source: Path, target: Path, run_config: dict | None = None) -> Path:
    """The checkpoint as this project wrote it before data contracts (and, optionally, another run config)."""
    checkpoint = torch.load(source, weights_only=True)
    del checkpoint["data_contract"]
    if run_config is not None:
        checkpoint["config"] = run_config
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, target)
    return target


def test_older_checkpoint_loads_with_a_note_and_a_derived_contract(isles: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    old = _strip_contract(isles / "run" / "fold_0" / "best_model.pth", tmp_path / "old" / "fold_0" / "best_model.pth")
    contract = read_contract(old)
    assert contract.derived and contract.preprocessing == {} and contract.train_cases is None
    assert (contract.dataset, contract.input_keys, contract.window, contract.fold) == ("ISLES2022", ("dwi",), (32, 32, 32), 0)
    data = _eval_data(isles, "eval_24", "--target-shape", "24", "24", "24")
    splits = str(isles / "train" / "isles2022_splits_5fold.json")
    assert _evaluate(data, [old], tmp_path / "out", "--splits-file", splits) == 0  # settings unknown: scored, with the note
    notes = [line for line in capsys.readouterr().out.splitlines() if "NOTE" in line and str(old) in line]
    assert notes and "written before data contracts" in notes[0] and "preprocessing settings unknown, not checked" in notes[0]


def test_older_checkpoint_without_a_dataset_is_refused(isles: Path, tmp_path: Path) -> None:
    old = _strip_contract(isles / "run" / "fold_0" / "best_model.pth", tmp_path / "old.pth", run_config={"fold": 0})
    with pytest.raises(CaseError, match=r"old.pth: no data_contract and its run config names no dataset"):
        read_contract(old)


def test_preprocessing_differences_compare_only_settings_on_both_sides() -> None:
    trained = {"source": "a/run_args.json", "target_shape": [96, 96, 96], "margin": 4}
    assert preprocessing_differences(trained, {"source": "b", "target_shape": (96, 96, 96), "margin": 4}) == []
    assert preprocessing_differences(trained, {"margin": 3}) == ["margin 4 vs 3"]
