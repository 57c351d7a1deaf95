"""The checkpoint files of a fold folder: ``last.pth`` (everything needed to resume,
:func:`save_last`, read back by :func:`restore_training_state`), ``best_model.pth`` (the weights
of the best validated epoch, :func:`save_best`) and ``run_args.json`` (:func:`save_run_args`).
All are written atomically by ``models.save_checkpoint`` / ``write_run_args``, rank 0 only."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import models

from ..core.runner import get_logger, write_run_args
from .fold_folder import replace_previous_run
from .state import Progress, Run, restore_rng, rng_state

__all__ = ["best_checkpoint_missing", "restore_training_state", "save_run_args", "save_last", "save_best"]


def best_checkpoint_missing(path: Path, state: "Progress") -> bool:
    """True when last.pth closes the best epoch but best_model.pth does not hold that epoch
    (a kill between the two writes): the resumed weights are then exactly the best ones."""
    if state.step != 0 or state.best_epoch == 0 or state.best_epoch != state.epoch:
        return False
    return not path.is_file() or models.load_checkpoint(path).get("epoch") != state.best_epoch


def restore_training_state(run: Run, checkpoint: dict) -> None:
    """Optimiser, loss scaler, RNG states and progress from ``last.pth`` (already checked)."""
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scaler.load_state_dict(checkpoint["scaler"])
    restore_rng(checkpoint["rng"])
    run.state = Progress(**checkpoint["progress"])
    state = run.state
    get_logger().info(f"resumed {run.settings.fold_dir / 'last.pth'}: epoch {state.epoch + 1}, step {state.step}, best Dice {state.best_dice:.4f}")
    if checkpoint.get("world_size") != run.ctx.world_size and state.step:
        raise ValueError(f"cannot resume mid-epoch with {run.ctx.world_size} ranks: last.pth was written by {checkpoint.get('world_size')}")


def save_run_args(run: Run) -> None:
    """run_args.json of the fold folder: the script's arguments, the resolved model config, the
    init record and the world size."""
    records = run.records
    write_run_args(run.settings.fold_dir, {**records.config, "model_config": records.model_config, "init": records.init, "world_size": run.ctx.world_size})


def save_last(run: Run) -> None:
    """last.pth (rank 0 only): weights, optimiser, schedule position, scaler, progress, RNG
    states, and the records."""
    if not run.ctx.is_main:
        return
    s, state, records = run.settings, run.state, run.records
    if run.replacing:
        replace_previous_run(s.fold_dir)
    schedule = {"schedule": s.schedule, "base_lr": s.lr, "warmup_steps": run.warmup_steps, "total_steps": run.total_steps,
                "step": state.epoch * run.steps + state.step, "lr": run.lr}
    models.save_checkpoint(
        s.fold_dir / "last.pth", run.model, records.model_config,
        optimizer=run.optimizer.state_dict(), scheduler=schedule, scaler=run.scaler.state_dict(),
        epoch=state.epoch, best_score=state.best_dice, history=state.history, progress=asdict(state), rng=rng_state(),
        config=records.config, init=records.init, data_contract=records.data_contract, world_size=run.ctx.world_size,
        **records.identity,
    )
    if run.replacing:
        save_run_args(run)
        run.replacing = False


def save_best(run: Run) -> None:
    """best_model.pth: the weights of the best epoch so far (called right after it ends)."""
    state, records = run.state, run.records
    models.save_checkpoint(
        run.settings.fold_dir / "best_model.pth", run.model, records.model_config,
        epoch=state.best_epoch, best_score=state.best_dice, history=state.history,
        config=records.config, init=records.init, val_cases=records.identity["val_cases"], data_contract=records.data_contract,
    )
