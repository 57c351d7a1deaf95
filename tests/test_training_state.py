"""Unit tests of strokeseg.training.state: RNG states survive a checkpoint round trip, the
per-step seed is a pure function of (seed, epoch, step, rank), and a resume is refused exactly
when a setting that shapes the result differs."""
from __future__ import annotations

import random
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from strokeseg.training.settings import TrainSettings
from strokeseg.training.state import resume_check, restore_rng, rng_state, step_seed


def _settings(**changes) -> TrainSettings:
    values = dict(output_dir=Path("run"), fold=0, epochs=3, batch_size=2, lr=1e-3, weight_decay=0.0, optimizer="adamw", momentum=0.9,
                  schedule="cosine", warmup_epochs=0.0, grad_clip=1.0, loss="gdice", amp="off", seed=7, workers=0, overlap=0.5, sw_batch_size=1)
    return TrainSettings(**{**values, **changes})


def _draws() -> tuple[float, float, float]:
    return float(torch.rand(1)), float(np.random.rand()), random.random()


def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    torch.save({"rng": rng_state()}, tmp_path / "rng.pth")
    expected = _draws()
    _draws()  # move every generator on
    restore_rng(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"])
    assert _draws() == expected


@pytest.mark.parametrize("other", [(8, 0, 0, 0), (7, 1, 0, 0), (7, 0, 1, 0), (7, 0, 0, 1)])
def test_step_seed_is_pure_and_differs_per_argument(other):
    assert step_seed(7, 0, 0, 0) == step_seed(7, 0, 0, 0)
    assert 0 <= step_seed(7, 0, 0, 0) < 2**64
    assert step_seed(*other) != step_seed(7, 0, 0, 0)


def test_resume_check_ignores_resume_free_settings_and_fills_new_defaults():
    stored = asdict(_settings())
    del stored["val_every"]  # a checkpoint older than --val-every: counts with its default
    expected = asdict(_settings(workers=4, device="cpu", resume=True, output_dir=Path("moved")))
    resume_check({"settings": stored}, {"settings": expected}, Path("last.pth"))


@pytest.mark.parametrize("changes, named", [({"lr": 1e-4}, "['lr']"), ({"val_every": 2, "seed": 8}, "['seed', 'val_every']")])
def test_resume_check_names_the_settings_that_differ(changes, named):
    with pytest.raises(ValueError, match=r"last\.pth: cannot resume, .*settings differs in " + re.escape(named)):
        resume_check({"settings": asdict(_settings())}, {"settings": asdict(_settings(**changes))}, Path("last.pth"))


def test_resume_check_refuses_other_validation_cases():
    with pytest.raises(ValueError, match=r"val_cases differs"):
        resume_check({"val_cases": ["a", "b"]}, {"val_cases": ["a", "c"]}, Path("last.pth"))
