"""The training loop shared by train_brats_uctransnet3d.py, train_isles_resnet18.py and
train_stroke.py: one loop, one checkpoint format, one resume and preemption protocol.

Per fold, ``<output-dir>/fold_<k>/`` receives ``best_model.pth`` (highest mean whole-volume
validation Dice), ``last.pth`` (everything needed to resume), ``history.csv``, ``curves.png``
and ``run_args.json``; every file is written atomically.

:func:`fit` names the phases: start or resume (:func:`_start`), then per epoch the training
steps (:func:`_train_epoch`), validation (:mod:`strokeseg.training.validation`) and the end of
the epoch (:func:`_end_epoch`). The concerns around the loop have their own modules:
``settings`` (:class:`TrainSettings`, :class:`InitSpec`), ``arguments`` (the shared flags),
``optimization`` (optimiser, learning-rate schedule, one step), ``distributed`` (DDP set-up),
``preemption`` (signals, exit status 75 for requeueing), ``fold_folder`` (the lock, resume or
fresh start), ``state`` (progress, RNG, the exact-resume check), ``checkpointing``
(last.pth, best_model.pth, run_args.json) and ``history`` (history.csv, curves.png,
TensorBoard).
"""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import asdict
from typing import Any, Callable, Mapping, NoReturn, Sequence

import torch
import torch.distributed as dist
from torch import nn

import models

from ..core.io import CaseError, one_line
from ..core.runner import get_logger, progress
from ..datasets.contract import check_pretrained
from ..inference.precision import autocast_dtype, training_precision
from .checkpointing import best_checkpoint_missing, restore_training_state, save_best, save_last, save_run_args
from .data import BatchLoader, CaseFiles, EpochSampler, TrainingSet
from .distributed import DistContext, all_sum, check_replicas_agree, setup_distributed, teardown_distributed
from .fold_folder import fold_lock, prepare_fold_dir
from .history import TENSORBOARD_DIR, TensorBoard, plot_curves, write_history
from .losses import build_loss
from .optimization import make_grad_scaler, make_optimizer, train_step
from .preemption import EXIT_PREEMPTED, StopFlag
from .settings import InitSpec, TrainSettings
from .state import Progress, Records, Run, jsonable, resume_check, step_seed
from .validation import validate, validation_due

__all__ = ["fit", "run_guarded"]


# --------------------------------------------------------------------------- phase: start or resume


def _init_model(resolved: dict, init: InitSpec, seed: int, checkpoint: dict | None, val_cases: Sequence[str]) -> tuple[nn.Module, dict]:
    """The network with its starting weights (resumed, pretrained or seeded scratch), and the
    init record every checkpoint stores (label, checkpoint, scope, transfer report). A
    pretrained checkpoint is checked first (its dataset; leakage of ``val_cases`` and the test cases)."""
    torch.manual_seed(seed)  # identical initial weights on every rank
    model = models.build_model(resolved)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"], strict=True)
        return model, checkpoint["init"]
    record = {"label": init.label, "checkpoint": str(init.checkpoint) if init.checkpoint else None, "scope": init.scope, "transfer": None, "source_fold": None,
              "parameters_transferred": 0, "parameters_total": None}
    if init.checkpoint is not None:
        check_pretrained(init.checkpoint, init.label, init.source_dataset, val_cases, init.test_cases, init.fold, init.allow_fold_mismatch)
        report = models.load_pretrained(model, resolved, init.checkpoint, init.scope)
        record["transfer"], record["source_fold"] = report.summary(), report.source_fold
        record["parameters_transferred"], record["parameters_total"] = report.parameters_copied, report.parameters_total
        get_logger().info(report.summary())
    elif init.label != "scratch":
        raise ValueError(f"init {init.label!r} needs a pretrained checkpoint")
    return model, record


def _assemble(settings: TrainSettings, ctx: DistContext, model: nn.Module, records: Records, train_set: TrainingSet, val_cases: Sequence[CaseFiles]) -> Run:
    """Move the model to the device and build optimiser, loss scaler, DDP wrapper, sampler and
    loader: a run at epoch 0, step 0."""
    memory_format = torch.channels_last_3d if settings.channels_last else torch.contiguous_format
    model.to(ctx.device, memory_format=memory_format)
    amp_dtype = autocast_dtype(ctx.device, training_precision(settings.amp))
    optimizer = make_optimizer(model, settings)
    scaler = make_grad_scaler(amp_dtype)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    train_model = nn.parallel.DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None) if ctx.distributed else model
    sampler = EpochSampler(train_set, settings.batch_size, ctx.rank, ctx.world_size)
    steps = sampler.per_rank() // settings.batch_size
    return Run(
        settings, ctx, records, model, train_model, optimizer, scaler, amp_dtype, memory_format, build_loss(settings.loss),
        sampler, BatchLoader(train_set, sampler, settings.workers), steps, round(settings.warmup_epochs * steps),
        val_cases, train_set.patch_size, Progress(),
    )


def _start(settings: TrainSettings, ctx: DistContext, model_config: dict, train_set: TrainingSet, val_cases: Sequence[CaseFiles],
           run_config: Mapping[str, Any], init: InitSpec, data_contract: Mapping[str, Any] | None) -> Run:
    """Phase 1, start or resume: check the fold folder and (when resuming) that last.pth was
    configured alike, build the model with its starting weights (every input is checked before
    anything in the folder changes), restore the state or write run_args.json (when replacing
    a previous run: with the first last.pth), and log the run's sizes."""
    resolved = models.resolve_model_config(model_config)
    tensorboard = TensorBoard(settings.fold_dir / TENSORBOARD_DIR) if settings.tensorboard and ctx.is_main else None
    resuming, replacing = prepare_fold_dir(settings)
    identity = jsonable({"settings": asdict(settings), "data": train_set.describe(), "val_cases": [c.case_id for c in val_cases]})
    checkpoint = None
    if resuming:
        checkpoint = models.load_checkpoint(settings.fold_dir / "last.pth")
        resume_check(checkpoint, {"model_config": resolved, **identity}, settings.fold_dir / "last.pth")
    model, init_record = _init_model(resolved, init, settings.seed, checkpoint, identity["val_cases"])
    contract = jsonable(dict(data_contract)) if data_contract is not None else None
    records = Records(resolved, jsonable(dict(run_config)), init_record, contract, identity)
    run = _assemble(settings, ctx, model, records, train_set, val_cases)
    run.tensorboard = tensorboard
    if checkpoint is not None:
        restore_training_state(run, checkpoint)
        if ctx.is_main and best_checkpoint_missing(settings.fold_dir / "best_model.pth", run.state):
            get_logger().info(f"best_model.pth of epoch {run.state.best_epoch} was not written (killed after last.pth): rewritten from last.pth")
            save_best(run)
    elif replacing:
        run.replacing = True  # the previous run stays until this one writes its first last.pth
    elif ctx.is_main:
        save_run_args(run)
    state = run.state
    run.lr = run.lr_of_step(max(state.epoch * run.steps + state.step - 1, 0))  # what history reports when a resumed epoch only validates
    _log_start(run, train_set)
    return run


def _log_start(run: Run, train_set: TrainingSet) -> None:
    ctx, amp = run.ctx, run.amp_dtype
    get_logger().info(
        f"{len(train_set.cases)} training cases x {train_set.samples_per_case} samples = {len(train_set)} per epoch "
        f"({run.steps} steps per rank), {len(run.val_cases)} validation volumes; {models.count_parameters(run.model) / 1e6:.2f} M parameters; "
        f"device {ctx.device} x {ctx.world_size} rank(s), {'autocast ' + str(amp).replace('torch.', '') if amp else 'float32'}"
    )


# --------------------------------------------------------------------------- phase: one epoch


def _step(run: Run, images: torch.Tensor, masks: torch.Tensor, stop: StopFlag) -> bool:
    """One optimiser step at (epoch, step) of ``run.state``, with that step's learning rate and
    seed; adds the loss to the epoch's sums. True when any rank has received a signal."""
    state, s = run.state, run.settings
    run.lr = run.lr_of_step(state.epoch * run.steps + state.step)
    for group in run.optimizer.param_groups:
        group["lr"] = run.lr
    torch.manual_seed(step_seed(s.seed, state.epoch, state.step, run.ctx.rank))
    # In the model's layout; the loader's buffer is reused only after this step.
    images, masks = images.to(run.ctx.device, memory_format=run.memory_format), masks.to(run.ctx.device)
    loss = train_step(run.train_model, images, masks, run.optimizer, run.scaler, run.loss_fn, run.amp_dtype, s.grad_clip)
    n = images.shape[0]
    loss_sum, count, signalled = all_sum([float(loss) * n, n, 1.0 if stop.signal_name else 0.0], run.ctx)
    if not math.isfinite(loss_sum):  # on every rank at once (a sum): none waits for another
        _diverged(run, float(loss))
    state.loss_sum += loss_sum
    state.loss_count += count
    state.step += 1
    return signalled > 0


def _diverged(run: Run, loss: float) -> NoReturn:
    """Raise FloatingPointError naming the step and the cases of the batch whose ``loss`` (this
    rank's) was not finite. The inputs were checked finite when their volumes were read, so the
    training diverged."""
    state = run.state
    batch = f"cases {', '.join(run.sampler.batch_case_ids(state.step))}" if not math.isfinite(loss) else "a batch of another rank"
    raise FloatingPointError(
        f"training diverged: the loss became {loss if not math.isfinite(loss) else 'not finite'} at step {state.step + 1} "
        f"of epoch {state.epoch + 1} ({batch}; inputs are finite): lower --lr or --grad-clip"
    )


def _train_epoch(run: Run, stop: StopFlag) -> bool:
    """Phase 2, one epoch: the steps of epoch ``run.state.epoch`` not yet done (a resumed epoch
    skips exactly the batches already trained on). False when a preemption signal arrived (the
    state then stands after the last completed step); RuntimeError when the loader ends early,
    FloatingPointError naming the batch's cases when the loss is not finite."""
    state = run.state
    run.epoch_started = time.perf_counter() - state.seconds
    run.train_model.train()
    if state.step >= run.steps:  # resumed after its last step: only validation is left
        return True
    run.sampler.set_epoch(state.epoch, skip=state.step * run.settings.batch_size)
    batches = stop.batches(run.loader)
    if run.ctx.is_main:
        batches = progress(batches, total=run.steps - state.step, desc=f"epoch {state.epoch + 1}")
    for images, masks in batches:
        signalled = _step(run, images, masks, stop)
        state.seconds = time.perf_counter() - run.epoch_started
        if signalled:
            return False
    if state.step < run.steps:
        if stop.signal_name:  # a DataLoader worker died with the signal: end here
            return False
        raise RuntimeError(f"the data loader ended after {state.step} of {run.steps} steps")
    return True


# --------------------------------------------------------------------------- phase: end of epoch


def _end_epoch(run: Run, val_dice: float | None) -> None:
    """Phase 3, end of epoch: the history row, the best score (``val_dice`` None: the epoch was
    not validated), the state of the next epoch; then (rank 0) last.pth first (a kill before
    best_model.pth is written is repaired on resume), best_model.pth when improved,
    history.csv, curves.png, TensorBoard and the log line."""
    state = run.state
    state.seconds = time.perf_counter() - run.epoch_started
    row = {"epoch": state.epoch + 1, "train_loss": state.loss_sum / max(state.loss_count, 1), "val_dice": val_dice, "lr": run.lr, "seconds": state.seconds}
    state.history.append(row)
    improved = val_dice is not None and val_dice > state.best_dice
    if improved:
        state.best_dice, state.best_epoch = val_dice, state.epoch + 1
    state.epoch, state.step, state.loss_sum, state.loss_count, state.seconds = state.epoch + 1, 0, 0.0, 0.0, 0.0
    if not run.ctx.is_main:
        return
    save_last(run)
    if improved:
        save_best(run)
    fold_dir = run.settings.fold_dir
    write_history(fold_dir / "history.csv", state.history)
    plot_curves(fold_dir / "curves.png", state.history)
    if run.tensorboard is not None:
        run.tensorboard.log(row)
    get_logger().info(
        f"epoch {row['epoch']}/{run.settings.epochs}  train_loss {row['train_loss']:.4f}  val_dice {'-' if val_dice is None else f'{val_dice:.4f}'}  "
        f"best {state.best_dice:.4f} (epoch {state.best_epoch})  lr {run.lr:.2e}  {row['seconds']:.1f} s"
    )


# --------------------------------------------------------------------------- exits


def _preempted(run: Run, stop: StopFlag) -> int:
    """Save last.pth where the run stands and return :data:`EXIT_PREEMPTED`."""
    save_last(run)
    if run.tensorboard is not None:
        run.tensorboard.close()
    if run.ctx.distributed:
        dist.barrier()  # keep every rank alive until rank 0 has written last.pth
    state = run.state
    get_logger().info(f"{stop.signal_name or 'signal on another rank'}: saved {run.settings.fold_dir / 'last.pth'} at epoch {state.epoch + 1} step {state.step}; exit {EXIT_PREEMPTED}")
    return EXIT_PREEMPTED


def _finish(run: Run, stop: StopFlag) -> int:
    """Check that every rank holds the same weights, log the best epoch, return 0 (also when a
    signal arrived after the last epoch's last.pth: nothing is left to resume)."""
    log = get_logger()
    if stop.signal_name:
        log.info(f"{stop.signal_name} after the last epoch was saved: the run is complete")
    if run.tensorboard is not None:
        run.tensorboard.close()
    digest = check_replicas_agree(run.model, run.ctx)
    if run.ctx.distributed:
        log.info(f"final weights identical on all {run.ctx.world_size} ranks (parameter and buffer sha256 {digest})")
        dist.barrier()
    log.info(f"done: best validation Dice {run.state.best_dice:.4f} at epoch {run.state.best_epoch}; {run.settings.fold_dir / 'best_model.pth'}")
    return 0


# --------------------------------------------------------------------------- the loop


def fit(
    settings: TrainSettings,
    model_config: dict,
    train_set: TrainingSet,
    val_cases: Sequence[CaseFiles],
    run_config: Mapping[str, Any],
    init: InitSpec,
    data_contract: Mapping[str, Any] | None = None,
) -> int:
    """Train one fold; returns 0 when done, :data:`EXIT_PREEMPTED` (75) after a preemption save.

    model_config: a models.build_model dict (its patch size, if any, must match the data's);
    train_set: the training samples; val_cases: whole validation volumes; run_config: the
    script's arguments (stored in run_args.json and every checkpoint); init: scratch or a
    pretrained checkpoint (loaded with models.load_pretrained, which fails loudly on a missing
    file, a norm mismatch or a shape mismatch; never a silent fallback to scratch);
    data_contract: what the model expects of its input data (dataset, input keys, window,
    threshold, preprocessing settings, training and validation case ids), JSON-able; stored
    verbatim under ``"data_contract"`` in last.pth and best_model.pth.

    The phases: start or resume (:func:`_start`), then per epoch the training steps
    (:func:`_train_epoch`), validation (:func:`validate`, every ``settings.val_every``
    epochs and after the last) and the end of the epoch
    (:func:`_end_epoch`); a preemption signal ends any of them with :func:`_preempted`.
    The fold folder is locked for the whole run (:func:`fold_lock`), and the signal handlers
    are installed before the start, so a signal at any point leaves a resumable last.pth.
    """
    if not val_cases:
        raise ValueError("no validation cases")
    ctx = setup_distributed(settings.device)
    with fold_lock(settings.fold_dir, ctx), StopFlag() as stop:
        run = _start(settings, ctx, model_config, train_set, val_cases, run_config, init, data_contract)
        if stop.agreed(ctx):  # signalled during the start
            return _preempted(run, stop)
        while run.state.epoch < settings.epochs:
            if not _train_epoch(run, stop):
                return _preempted(run, stop)
            validated = validation_due(settings, run.state.epoch)
            val_dice = validate(run, stop) if validated else None
            if validated and val_dice is None:
                return _preempted(run, stop)
            _end_epoch(run, val_dice)
        return _finish(run, stop)


def run_guarded(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``run(args)``, turning bad-input errors (CaseError, ValueError, FileNotFoundError: a
    missing or mismatched checkpoint, a bad split file) and a diverged training
    (FloatingPointError) into one logged line and exit status 2; the process group is torn
    down in any case."""
    if int(os.environ.get("RANK", "0")) != 0:
        get_logger().setLevel("WARNING")  # only rank 0 logs, from the first line on
    try:
        return run(args)
    except (CaseError, ValueError, FileNotFoundError, FloatingPointError) as err:
        get_logger().error(f"ERROR: {one_line(err)}")
        return 2
    finally:
        teardown_distributed()
