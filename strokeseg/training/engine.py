"""The training engine shared by train_brats_uctransnet3d.py, train_isles_resnet18.py and
train_stroke.py: one loop, one checkpoint format, one resume and preemption protocol.

Per fold, ``<output-dir>/fold_<k>/`` receives ``best_model.pth`` (highest mean whole-volume
validation Dice), ``last.pth`` (everything needed to resume), ``history.csv``, ``curves.png``
and ``run_args.json``; every file is written atomically.

Exact resume. The data order and every sample are pure functions of (seed, epoch, sample id)
(:mod:`strokeseg.training.data`), and the torch generator is reseeded from (seed, epoch, step, rank)
before every step (dropout), so replaying from a checkpoint gives the same batches and random
numbers. ``last.pth`` holds the model, optimiser, schedule position, GradScaler, the epoch and
the number of steps of it already done, the running loss sums, best score, history and RNG
states. On CPU a resumed run ends with bit-identical weights; on CUDA, cuDNN's nondeterministic
kernels make runs (resumed or not) agree only to rounding.

Preemption. SIGTERM or SIGUSR1 (SLURM's ``--signal=B:USR1@120``; the time limit and
``scancel`` send SIGTERM to the whole process group, DataLoader workers ignore both) only sets
a flag, from the start of :func:`fit` on. The loop checks it once the run is set up, after
every training step and after every validation case (a signal while the epoch's files are
written is seen after the next step); all ranks agree on it,
``last.pth`` is written *mid-epoch* with the number of steps done, and the process exits with
status 75 (EX_TEMPFAIL), which the sbatch scripts turn into ``scontrol requeue``. Mid-epoch
rather than end-of-epoch state because an ATLAS epoch (thousands of 96³ steps) can outlast the
warning period: saving at the next step boundary loses at most one step, and since the sampler
skips exactly the batches already trained on, the resumed epoch continues as if never stopped.
A signal during validation saves the state "all steps done" and the resumed run validates again.

One run per fold folder. ``fit`` holds an exclusive ``flock`` on ``fold_<k>/.lock`` (host and
pid inside) while it runs; a second training into the folder fails at once naming the holder.
``--overwrite`` checks every input first and keeps the previous run's files until the new run
writes its first ``last.pth``.

Distributed. Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the environment) the model is
wrapped in DistributedDataParallel (NCCL on CUDA, gloo on CPU), each rank trains on a disjoint
slice of every epoch, validation cases are split between ranks and the Dice sums all-reduced,
and only rank 0 writes files and logs. Before validation every rank takes rank 0's buffers
(BatchNorm running statistics, which each rank otherwise updates from its own batches), so
every rank validates the model rank 0 saves. At the end the ranks compare a hash of their
parameters and buffers.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import functools
import hashlib
import json
import math
import os
import random
import shutil
import signal
import socket
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NoReturn, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import models

from ..datasets.contract import THRESHOLD, check_pretrained
from ..core.io import CaseError, atomic_path, one_line
from ..core.runner import get_logger, progress, write_run_args
from ..core.metrics import dice
from ..inference.sliding_window import AMP_MODES, autocast_dtype, sliding_window_inference, training_precision
from .augment import AUGMENT_PRESETS
from .data import BatchLoader, CaseFiles, EpochSampler, TrainingSet, load_case_volume, sample_shape
from .losses import LOSS_NAMES, build_loss, multi_head_loss

__all__ = [
    "EXIT_PREEMPTED",
    "TRAINING_DEFAULTS",
    "TrainSettings",
    "InitSpec",
    "DistContext",
    "add_training_arguments",
    "add_model_arguments",
    "resolve_model_arguments",
    "add_transfer_scope_argument",
    "add_fold_mismatch_argument",
    "resolve_transfer_scope",
    "parse_training_arguments",
    "model_config_from_args",
    "lr_at",
    "make_optimizer",
    "make_grad_scaler",
    "train_step",
    "setup_distributed",
    "teardown_distributed",
    "write_history",
    "plot_curves",
    "fit",
    "run_guarded",
]

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"; the sbatch scripts requeue on it
TRANSFER_SCOPES = ("encoder", "all")  # what a pretrained checkpoint gives (default: the architecture's, models.registry)

# Defaults of the shared flags; each script overrides some via add_training_arguments(defaults).
TRAINING_DEFAULTS: dict[str, Any] = {
    "epochs": 100,  # passes over the training cases
    "batch_size": 4,  # samples per step and per rank
    "lr": 1e-4,  # peak learning rate
    "weight_decay": 1e-5,
    "optimizer": "adamw",  # 'adamw' | 'sgd' (Nesterov)
    "momentum": 0.99,  # SGD only
    "schedule": "cosine",  # 'cosine' | 'poly' (power 0.9) | 'none', after linear warmup
    "warmup_epochs": 2.0,  # linear warmup length in epochs (0: none)
    "grad_clip": 1.0,  # max global gradient L2 norm (0: off)
    "loss": "gdice",  # 'gdice' (generalized Dice) | 'dice_ce'
    "amp": "auto",  # 'auto': bf16 (or fp16 + GradScaler) on CUDA, fp32 on CPU | 'off'
    "augment": "flip",  # 'off' | 'flip' | 'full' (flips, rotation, zoom, intensity)
    "seed": 42,
    "workers": 4,  # DataLoader worker processes (0: load in the main process)
    "chunk_cases": 8,  # cases whose samples are interleaved (per-worker volume cache size)
    "overlap": 0.5,  # sliding-window overlap of validation
    "sw_batch_size": 4,  # windows per forward pass in validation
    "val_every": 1,  # whole-volume validation every N epochs (and always after the last)
}
_POLY_POWER = 0.9
# Settings that may change between a run and its resume without changing the result.
_RESUME_FREE = ("output_dir", "workers", "device", "resume", "resume_if_exists", "overwrite", "tensorboard")


@dataclass(frozen=True)
class TrainSettings:
    """Everything the engine needs besides the model config and the data (see TRAINING_DEFAULTS)."""

    output_dir: Path
    fold: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    optimizer: str
    momentum: float
    schedule: str
    warmup_epochs: float
    grad_clip: float
    loss: str
    amp: str
    seed: int
    workers: int
    overlap: float
    sw_batch_size: int
    channels_last: bool = True
    val_every: int = 1
    tensorboard: bool = False
    device: str = "auto"
    resume: bool = False
    resume_if_exists: bool = False
    overwrite: bool = False

    @staticmethod
    def from_args(values: Mapping[str, Any]) -> "TrainSettings":
        """The settings among parsed arguments ``values`` (``vars(args)``)."""
        return TrainSettings(**{f.name: values[f.name] for f in fields(TrainSettings)})

    @property
    def fold_dir(self) -> Path:
        return Path(self.output_dir) / f"fold_{self.fold}"


@dataclass(frozen=True)
class InitSpec:
    """How the weights start: label ('scratch', 'brats', 'transfer', 'finetune'), and for a
    pretrained start the checkpoint, the scope copied ('encoder' | 'all'), the dataset it must
    have been trained on (source_dataset, a registry name; None: any) and this fold's test case
    ids, which, like its validation cases, it must not have seen; fold: this run's fold, which a
    source checkpoint recording its fold must share unless allow_fold_mismatch
    (:func:`strokeseg.datasets.contract.check_pretrained`, before anything is written)."""

    label: str = "scratch"
    checkpoint: Path | None = None
    scope: str = "encoder"
    source_dataset: str | None = None
    test_cases: tuple[str, ...] = ()
    fold: int | None = None
    allow_fold_mismatch: bool = False


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# --------------------------------------------------------------------------- arguments


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _non_negative(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value

    return parse


def _overlap(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def add_training_arguments(parser: argparse.ArgumentParser, defaults: Mapping[str, Any]) -> None:
    """Add the flags every training script shares; ``defaults`` overrides TRAINING_DEFAULTS
    (unknown keys are an error, so a typo cannot silently keep a default)."""
    unknown = sorted(set(defaults) - set(TRAINING_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown training default(s) {unknown}; known: {sorted(TRAINING_DEFAULTS)}")
    d = {**TRAINING_DEFAULTS, **defaults}
    g = parser.add_argument_group("training")
    g.add_argument("--output-dir", type=Path, required=True, help="run folder; this fold writes <output-dir>/fold_<k>/")
    g.add_argument("--fold", type=_non_negative(int), default=0, help="cross-validation fold (0-4) of --splits-file (default 0)")
    g.add_argument("--epochs", type=_positive(int), default=d["epochs"], help=f"training epochs (default {d['epochs']})")
    g.add_argument("--batch-size", type=_positive(int), default=d["batch_size"], help=f"samples per step per GPU (default {d['batch_size']})")
    g.add_argument("--lr", type=_positive(float), default=d["lr"], help=f"peak learning rate (default {d['lr']:g})")
    g.add_argument("--weight-decay", type=_non_negative(float), default=d["weight_decay"], help=f"weight decay (default {d['weight_decay']:g})")
    g.add_argument("--optimizer", choices=("adamw", "sgd"), default=d["optimizer"], help=f"optimiser; sgd is Nesterov SGD (default {d['optimizer']})")
    g.add_argument("--momentum", type=_non_negative(float), default=d["momentum"], help=f"SGD momentum (default {d['momentum']})")
    g.add_argument("--schedule", choices=("cosine", "poly", "none"), default=d["schedule"], help=f"learning-rate decay per step after warmup; poly has power 0.9 (default {d['schedule']})")
    g.add_argument("--warmup-epochs", type=_non_negative(float), default=d["warmup_epochs"], help=f"linear warmup length in epochs (default {d['warmup_epochs']})")
    g.add_argument("--grad-clip", type=_non_negative(float), default=d["grad_clip"], help=f"max global gradient L2 norm, 0 = off (default {d['grad_clip']})")
    g.add_argument("--loss", choices=LOSS_NAMES, default=d["loss"], help=f"loss on the logits, summed over heads (default {d['loss']})")
    g.add_argument("--amp", choices=AMP_MODES, default=d["amp"], help="training and validation: auto: bfloat16 autocast on CUDA (float16 + GradScaler without bf16 support), float32 on CPU; off: float32 (default auto)")
    g.add_argument("--augment", choices=AUGMENT_PRESETS, default=d["augment"], help=f"training augmentation: off, flip (mirroring), full (flips, rotation ±10°, zoom 0.9-1.1, intensity jitter) (default {d['augment']})")
    g.add_argument("--seed", type=_non_negative(int), default=d["seed"], help=f"seed of initialisation, data order, patches and augmentation (default {d['seed']})")
    g.add_argument("--workers", type=_non_negative(int), default=d["workers"], help=f"DataLoader worker processes per GPU, 0 = main process (default {d['workers']})")
    g.add_argument("--chunk-cases", type=_positive(int), default=d["chunk_cases"], help=f"cases whose patches are interleaved in the epoch order; each worker caches that many volumes (default {d['chunk_cases']})")
    g.add_argument("--overlap", type=_overlap, default=d["overlap"], help=f"sliding-window overlap in [0, 1) for whole-volume validation (default {d['overlap']})")
    g.add_argument("--sw-batch-size", type=_positive(int), default=d["sw_batch_size"], help=f"validation windows per forward pass (default {d['sw_batch_size']})")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="weights and batches in channels-last memory format: 1.1-2x faster 3-D convolutions on CPU (oneDNN, most at small widths); "
                        "--no-channels-last keeps the contiguous layout (default on)")
    g.add_argument("--val-every", type=_positive(int), default=d["val_every"],
                   help=f"whole-volume validation every N epochs and always after the last; best_model.pth is chosen among the validated epochs, "
                        f"history.csv leaves val_dice empty for the others (default {d['val_every']})")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files (train loss, val Dice, learning rate per epoch) to fold_<k>/tensorboard/; "
                        "needs the optional package tensorboard (pip install tensorboard)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available (under torchrun cuda:LOCAL_RANK), else CPU")
    resume = g.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue exactly from fold_<k>/last.pth; an error when it does not exist")
    resume.add_argument("--resume-if-exists", action="store_true", help="continue from fold_<k>/last.pth when it exists, else start fresh (for requeued batch jobs)")
    resume.add_argument("--overwrite", action="store_true", help="start fresh even though fold_<k>/ already holds a run (its files are replaced)")


def _flag_fields() -> dict[str, list[tuple[str, Any]]]:
    """Model flag name -> [(arch, field)] over every registered architecture."""
    found: dict[str, list[tuple[str, Any]]] = {}
    for name in models.arch_names():
        spec = models.arch_spec(name)
        for f in fields(spec.config_cls):
            if f.name in spec.flag_fields() and f.name != "patch_size":
                found.setdefault(f.name, []).append((name, f))
    return found


def _defaults_text(pairs: Sequence[tuple[str, Any]]) -> str:
    values = {arch: f.default for arch, f in pairs}
    if len(set(map(repr, values.values()))) == 1:
        return f"default {next(iter(values.values()))}"
    return "default " + ", ".join(f"{value} for {arch}" for arch, value in values.items())


def add_model_arguments(parser: argparse.ArgumentParser, default_arch: str, archs: Sequence[str] | None = None) -> None:
    """--arch (when more than one architecture is offered), --patch-size and one flag per
    config field of the registered architectures (``models.registry``; all fields but those the
    script sets, e.g. --width, --norm, --layers), each defaulting to the chosen architecture's
    dataclass default. ``archs``: the architectures offered (None: every registered one). Parse
    with :func:`parse_training_arguments`, which fills the defaults."""
    offered = tuple(archs) if archs is not None else models.arch_names()
    for name in (default_arch, *offered):
        models.arch_spec(name)  # unknown: ValueError listing the registered ones
    g = parser.add_argument_group("model")
    if len(offered) > 1:
        g.add_argument("--arch", choices=offered, default=default_arch, help=f"network, one of the registered architectures (default {default_arch})")
    else:
        parser.set_defaults(arch=default_arch)
    patches = ", ".join(f"{models.arch_spec(a).default_patch} for {a}" for a in offered)
    g.add_argument("--patch-size", type=_positive(int), default=None, help=f"cubic training patch edge in voxels, also the validation window (default {patches})")
    for name, pairs in _flag_fields().items():
        pairs = [(arch, f) for arch, f in pairs if arch in offered]
        if not pairs:
            continue
        f = pairs[0][1]
        kind = type(f.default)
        owners = "" if len(pairs) == len(offered) else f"{', '.join(arch for arch, _ in pairs)} only; "
        help_text = f"{f.metadata.get('help', name)} ({owners}{_defaults_text(pairs)})"
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            g.add_argument(flag, type=kind, choices=f.metadata.get("choices"), default=None, help=help_text)


def resolve_model_arguments(arch: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The model flags of ``arch`` from parsed ``values`` (``vars(args)``) with its defaults
    filled in: ``{"patch_size": ..., <flag field>: ...}``. A flag of another architecture that
    was given is a ValueError, as is an unknown ``arch``."""
    spec = models.arch_spec(arch)
    mine = spec.flag_fields()
    foreign = sorted(name for name in _flag_fields() if name not in mine and values.get(name) is not None)
    if foreign:
        flags = ", ".join("--" + name.replace("_", "-") for name in foreign)
        raise ValueError(f"{flags}: not a flag of {arch} (its model flags: {', '.join('--' + n.replace('_', '-') for n in mine)})")
    defaults = spec.defaults()
    out = {"patch_size": values.get("patch_size") or spec.default_patch}
    for name in mine:
        if name != "patch_size":
            out[name] = values[name] if values.get(name) is not None else defaults[name]
    return out


def add_transfer_scope_argument(parser: argparse.ArgumentParser) -> None:
    """--transfer-scope for scripts that take a pretrained checkpoint; resolve it with
    :func:`resolve_transfer_scope`."""
    parser.add_argument(
        "--transfer-scope", choices=TRANSFER_SCOPES, default=None,
        help="what the pretrained checkpoint gives: encoder (the CNN encoder(s) only) or all (every tensor); "
        "default the architecture's (the paper's): " + ", ".join(f"{models.arch_spec(a).transfer_scope} for {a}" for a in models.arch_names()),
    )


def add_fold_mismatch_argument(parser: argparse.ArgumentParser) -> None:
    """--allow-fold-mismatch for scripts that transfer from a BraTS fold checkpoint."""
    parser.add_argument("--allow-fold-mismatch", action="store_true", help="start fold k from a --pretrain-ckpt that records another fold "
                        "(default: refused; the paper pairs each stroke fold with the same BraTS fold)")


def resolve_transfer_scope(arch: str, scope: str | None, pretrained: bool) -> str | None:
    """The transfer scope of a run: ``scope`` if given, else the architecture's default
    (its registry spec's ``transfer_scope``); None without a pretrained checkpoint. Raises ValueError
    for a scope given without a checkpoint or an unknown scope."""
    if not pretrained:
        if scope is not None:
            raise ValueError(f"--transfer-scope {scope} needs a pretrained checkpoint (--pretrain-ckpt)")
        return None
    if scope is not None and scope not in TRANSFER_SCOPES:
        raise ValueError(f"transfer scope must be one of {TRANSFER_SCOPES}, got {scope!r}")
    return scope if scope is not None else models.arch_spec(arch).transfer_scope


def parse_training_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with the model flags resolved for the chosen --arch
    (:func:`resolve_model_arguments`), so run_args.json records the values used; a bad
    combination is a usage error (exit status 2)."""
    args = parser.parse_args(argv)
    try:
        vars(args).update(resolve_model_arguments(args.arch, vars(args)))
    except ValueError as err:
        parser.error(str(err))
    return args


def model_config_from_args(arch: str, values: Mapping[str, Any], in_channels: int, fixed: Mapping[str, Any] | None = None) -> dict:
    """The models.build_model config of ``arch`` from resolved model flag ``values`` (see
    :func:`resolve_model_arguments`), ``in_channels`` and the config fields the script sets
    (``fixed``, e.g. {"variant": "shared"}). An unknown ``arch`` is a ValueError."""
    spec = models.arch_spec(arch)
    return {"arch": spec.name, **{name: values[name] for name in spec.flag_fields()}, "in_channels": in_channels, **dict(fixed or {})}


# --------------------------------------------------------------------------- schedule


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int, schedule: str) -> float:
    """Learning rate of optimiser step ``step`` (0-based), a pure function of the step.

    Linear warmup from base_lr / warmup_steps to base_lr over ``warmup_steps`` steps, then
    'cosine' (half cosine to 0 at ``total_steps``), 'poly' (base_lr · (1 - t)^0.9) or 'none'
    (constant), with t the fraction of the post-warmup steps done.
    """
    if schedule not in ("cosine", "poly", "none"):
        raise ValueError(f"schedule must be 'cosine', 'poly' or 'none', got {schedule!r}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "poly":
        return base_lr * (1.0 - t) ** _POLY_POWER
    return base_lr


# --------------------------------------------------------------------------- distributed


def setup_distributed(device: str) -> DistContext:
    """Rank, world size and device from torchrun's environment; joins the process group when
    WORLD_SIZE > 1 (NCCL for CUDA, gloo for CPU). Selects cuda:LOCAL_RANK with
    ``torch.cuda.set_device``; CUDA_VISIBLE_DEVICES is never touched. Ranks other than 0 log
    warnings and errors only."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if rank != 0:
        get_logger().setLevel("WARNING")
    return DistContext(rank, world_size, local_rank, target)


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _all_sum(values: Sequence[float], ctx: DistContext) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64; identity on one process)."""
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def _weights_digest(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of the bytes of all parameters and buffers (BatchNorm running
    statistics included: :func:`_broadcast_buffers` makes them equal before validation)."""
    h = hashlib.sha256()
    net = models.unwrap_model(model)
    for tensor in [*net.parameters(), *net.buffers()]:
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _broadcast_buffers(model: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank, in place."""
    if ctx.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def _check_replicas_agree(model: nn.Module, ctx: DistContext) -> str:
    """Gather every rank's parameter digest; raise RuntimeError when they differ."""
    digest = _weights_digest(model)
    if not ctx.distributed:
        return digest
    mine = torch.tensor([int(digest[:15], 16)], dtype=torch.int64, device=ctx.device)
    gathered = [torch.zeros_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, mine)
    values = [int(t.item()) for t in gathered]
    if len(set(values)) != 1:
        raise RuntimeError(f"ranks ended with different weights: digests {[f'{v:015x}' for v in values]}")
    return digest


# --------------------------------------------------------------------------- preemption


class _StopFlag:
    """Set by SIGTERM / SIGUSR1; the handlers are installed for the duration of a ``with``."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "_StopFlag":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def batches(self, loader: Any) -> Iterator[Any]:
        """``loader``'s batches; when a signal to the whole process group (``kill -TERM -PGID``,
        ``scancel`` without ``--batch``) has also killed a DataLoader worker, the epoch just
        ends early and the loop saves the last completed step instead of crashing."""
        try:
            yield from loader
        except RuntimeError:
            if self.signal_name is None:
                raise

    def agreed(self, ctx: DistContext) -> bool:
        """True on every rank as soon as any rank received a signal."""
        return _all_sum([1.0 if self.signal_name else 0.0], ctx)[0] > 0


# --------------------------------------------------------------------------- outputs


def write_history(path: Path, history: Sequence[Mapping[str, float | None]]) -> None:
    """history.csv: epoch (1-based), train_loss (mean over samples), val_dice (mean whole-volume
    Dice at p >= 0.5; empty for an epoch not validated, see --val-every), lr (at the epoch's
    last step), seconds (wall time of the epoch)."""
    columns = ("epoch", "train_loss", "val_dice", "lr", "seconds")
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in history:
            val = "" if row["val_dice"] is None else f"{row['val_dice']:.6f}"
            writer.writerow([row["epoch"], f"{row['train_loss']:.6f}", val, f"{row['lr']:.6g}", f"{row['seconds']:.1f}"])


def plot_curves(path: Path, history: Sequence[Mapping[str, float | None]]) -> None:
    """curves.png: training loss, validation Dice (validated epochs) and learning rate against epoch."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(12, 3.5))
    for ax, key, title in zip(fig.subplots(1, 3), ("train_loss", "val_dice", "lr"), ("training loss", "validation Dice (whole volumes)", "learning rate")):
        points = [(row["epoch"], row[key]) for row in history if row[key] is not None]
        ax.plot([e for e, _ in points], [v for _, v in points], marker="o" if len(points) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


class _TensorBoard:
    """TensorBoard event files in ``log_dir`` (the optional package ``tensorboard``): per epoch
    (1-based step) ``train/loss``, ``val/dice`` (validated epochs only) and ``lr``. The writer
    opens when this process ends its first epoch and drops the events a preempted process left
    from that epoch on (``purge_step``), so a resumed run shows each epoch once."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ValueError(f"--tensorboard needs the optional package tensorboard (pip install tensorboard): {err}") from err
        self._writer_class = SummaryWriter
        self._writer: Any = None
        self.log_dir = log_dir

    def log(self, row: Mapping[str, float | None]) -> None:
        epoch = int(row["epoch"])
        if self._writer is None:
            self._writer = self._writer_class(log_dir=str(self.log_dir), purge_step=epoch)
        for tag, key in (("train/loss", "train_loss"), ("val/dice", "val_dice"), ("lr", "lr")):
            if row[key] is not None:
                self._writer.add_scalar(tag, row[key], epoch)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _jsonable(value: Any) -> Any:
    """Plain JSON types only (paths → str), as checkpoints and run_args.json need."""
    return json.loads(json.dumps(value, default=str))


# --------------------------------------------------------------------------- state


@dataclass
class _Progress:
    """Where training stands: ``epoch`` in progress (0-based) and its ``step``s already done."""

    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    loss_count: float = 0.0
    seconds: float = 0.0
    best_dice: float = -1.0
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, step, rank]).generate_state(1, dtype=np.uint64)[0])


def _resume_check(checkpoint: dict, expected: dict, path: Path) -> None:
    """Raise ValueError when the run being resumed was configured differently."""
    problems = []
    for key, value in expected.items():
        stored = checkpoint.get(key)
        if key == "settings":  # a setting newer than the checkpoint counts with its default
            defaults = {f.name: f.default for f in fields(TrainSettings) if f.default is not MISSING}
            stored = {k: v for k, v in {**defaults, **(stored or {})}.items() if k not in _RESUME_FREE}
            value = {k: v for k, v in value.items() if k not in _RESUME_FREE}
        if _jsonable(stored) != _jsonable(value):
            if isinstance(value, dict) and isinstance(stored, dict):
                diff = sorted(k for k in set(value) | set(stored) if _jsonable(value.get(k)) != _jsonable(stored.get(k)))
                problems.append(f"{key} differs in {diff}")
            else:
                problems.append(f"{key} differs")
    if problems:
        raise ValueError(f"{path}: cannot resume, the run was configured differently: {'; '.join(problems)}")


def _best_checkpoint_missing(path: Path, state: "_Progress") -> bool:
    """True when last.pth closes the best epoch but best_model.pth does not hold that epoch
    (a kill between the two writes): the resumed weights are then exactly the best ones."""
    if state.step != 0 or state.best_epoch == 0 or state.best_epoch != state.epoch:
        return False
    return not path.is_file() or models.load_checkpoint(path).get("epoch") != state.best_epoch


def _prepare_fold_dir(settings: TrainSettings) -> tuple[bool, bool]:
    """Decide between resuming and starting fresh: (resume, replace), replace meaning a fresh
    start over a previous run (--overwrite), whose files stay until this run's first last.pth
    (:func:`_replace_previous_run`). Deletes nothing. Raises CaseError when --resume finds no
    last.pth, or a fresh start would replace a run without --overwrite."""
    last = settings.fold_dir / "last.pth"
    if settings.resume and not last.is_file():
        raise CaseError(f"--resume: {last} not found (start without --resume, or use --resume-if-exists)")
    if settings.resume or (settings.resume_if_exists and last.is_file()):
        return True, False
    existing = [settings.fold_dir / n for n in ("last.pth", "best_model.pth") if (settings.fold_dir / n).exists()]
    if existing and not settings.overwrite:
        raise CaseError(f"{settings.fold_dir} already holds a run ({existing[0].name}); pass --resume to continue or --overwrite to start over")
    return False, bool(existing)


def _replace_previous_run(fold_dir: Path) -> None:
    """Remove what a previous run left beside last.pth (its best model, history, curves and
    arguments, TensorBoard events), just before this run's first last.pth replaces the old one."""
    for name in ("best_model.pth", "history.csv", "curves.png", "run_args.json"):
        (fold_dir / name).unlink(missing_ok=True)
    shutil.rmtree(fold_dir / TENSORBOARD_DIR, ignore_errors=True)


TENSORBOARD_DIR = "tensorboard"  # --tensorboard: event files in fold_<k>/tensorboard/
LOCK_NAME = ".lock"  # in every fold folder: "host <name> pid <n>" of the training holding it


@contextlib.contextmanager
def _fold_lock(fold_dir: Path, ctx: DistContext) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``fold_dir/.lock`` (rank 0, for the duration of the
    ``with``; the kernel releases it when the process ends, however it ends) and record the
    holder's host and pid in it. Raises CaseError on every rank when another process holds it:
    two trainings must never write into one fold folder."""
    handle, holder = None, None
    if ctx.is_main:
        fold_dir.mkdir(parents=True, exist_ok=True)
        handle = open(fold_dir / LOCK_NAME, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "holder not recorded yet"
            handle.close()
    if _all_sum([1.0 if holder else 0.0], ctx)[0] > 0:
        raise CaseError(f"{fold_dir} is in use by another training ({holder or 'rank 0 could not lock it'}); "
                        f"wait for it, or give this run another --fold / --output-dir")
    try:
        if handle is not None:
            handle.truncate(0)
            handle.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
            handle.flush()
        yield
    finally:
        if handle is not None:
            handle.close()


def make_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """AdamW or Nesterov SGD over all parameters, as ``settings`` says."""
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum, nesterov=True, weight_decay=settings.weight_decay)
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {settings.optimizer!r}")


def make_grad_scaler(amp_dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling, enabled only for float16 autocast (bfloat16 and float32 need none)."""
    return torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loss_fn: nn.Module,
    amp_dtype: torch.dtype | None,
    grad_clip: float,
) -> torch.Tensor:
    """One optimiser step on a batch: images float32 (B, C, X, Y, Z), masks integer labels
    (B, X, Y, Z), both on the model's device. Forward under autocast when ``amp_dtype`` is set,
    loss summed over the model's heads, scaled backward, gradient clipping to ``grad_clip``
    (global L2 norm; 0 = off). Returns the detached scalar loss."""
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = multi_head_loss(loss_fn, model(images), masks)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


# --------------------------------------------------------------------------- the run's state


@dataclass(frozen=True)
class _Records:
    """What every checkpoint stores beside the weights and the training state (JSON-able):
    the resolved model config, the script's arguments, how the weights started, the data
    contract, and the run's identity (settings, data, validation case ids), which a resume must
    match."""

    model_config: dict
    config: dict
    init: dict
    data_contract: dict | None
    identity: dict


@dataclass
class _Run:
    """Everything the phases of :func:`fit` share: the fixed set-up and the training state.

    ``model`` is the bare network (saved, validated), ``train_model`` the one trained (``model``
    or its DistributedDataParallel wrapper). ``steps``: optimiser steps per epoch and rank.
    ``lr``: the rate of the last step done. ``epoch_started``: perf_counter() value at which
    the current epoch would have started had it run without a break (the epoch's wall time is
    kept across a resume)."""

    settings: TrainSettings
    ctx: DistContext
    records: _Records
    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    loss_fn: nn.Module
    sampler: EpochSampler
    loader: BatchLoader
    steps: int
    warmup_steps: int
    val_cases: Sequence[CaseFiles]
    window: int
    state: _Progress
    lr: float = 0.0
    epoch_started: float = 0.0
    replacing: bool = False  # a previous run's files are still in the fold folder (--overwrite)
    tensorboard: _TensorBoard | None = None  # rank 0 with --tensorboard

    @property
    def total_steps(self) -> int:
        return self.steps * self.settings.epochs

    def lr_of_step(self, step: int) -> float:
        """Learning rate of global optimiser step ``step`` (0-based) of this run."""
        s = self.settings
        return lr_at(step, self.total_steps, s.lr, self.warmup_steps, s.schedule)


# --------------------------------------------------------------------------- validation


def _validation_due(settings: TrainSettings, epoch: int) -> bool:
    """Whether 0-based ``epoch`` ends with whole-volume validation: every ``val_every``-th
    epoch and the last one."""
    return (epoch + 1) % settings.val_every == 0 or epoch + 1 == settings.epochs


def _validate(run: _Run, stop: _StopFlag) -> float | None:
    """Mean Dice (p >= 0.5) over whole validation volumes by sliding-window inference with
    windows of the training sample shape (:func:`sample_shape`: the training patch, or the whole
    volume when the patch covers it); cases are split over ranks and the sums all-reduced.
    Returns None when a preemption signal arrives (checked after every case, on all ranks)."""
    ctx, settings, cases = run.ctx, run.settings, run.val_cases
    net = run.model  # not DDP's forward, which would broadcast buffers: ranks see different case counts
    _broadcast_buffers(net, ctx)  # every rank validates the model rank 0 saves
    net.eval()
    predictor = functools.partial(models.foreground_probability, net)
    total, count = 0.0, 0
    try:
        for first in range(0, len(cases), ctx.world_size):
            index = first + ctx.rank
            if index < len(cases):
                image, mask = load_case_volume(cases[index])
                prob = sliding_window_inference(
                    torch.from_numpy(image), predictor, sample_shape(run.window, image.shape[1:]), overlap=settings.overlap,
                    sw_batch_size=settings.sw_batch_size, device=ctx.device, precision=training_precision(settings.amp),
                )
                total += dice(prob >= THRESHOLD, mask)
                count += 1
            if stop.agreed(ctx):
                return None
    finally:
        net.train()
    total, count = _all_sum([total, count], ctx)
    return total / count


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


def _restore(run: _Run, checkpoint: dict) -> None:
    """Optimiser, loss scaler, RNG states and progress from ``last.pth`` (already checked)."""
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scaler.load_state_dict(checkpoint["scaler"])
    _restore_rng(checkpoint["rng"])
    run.state = _Progress(**checkpoint["progress"])
    state = run.state
    get_logger().info(f"resumed {run.settings.fold_dir / 'last.pth'}: epoch {state.epoch + 1}, step {state.step}, best Dice {state.best_dice:.4f}")
    if checkpoint.get("world_size") != run.ctx.world_size and state.step:
        raise ValueError(f"cannot resume mid-epoch with {run.ctx.world_size} ranks: last.pth was written by {checkpoint.get('world_size')}")


def _assemble(settings: TrainSettings, ctx: DistContext, model: nn.Module, records: _Records, train_set: TrainingSet, val_cases: Sequence[CaseFiles]) -> _Run:
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
    return _Run(
        settings, ctx, records, model, train_model, optimizer, scaler, amp_dtype, memory_format, build_loss(settings.loss),
        sampler, BatchLoader(train_set, sampler, settings.workers), steps, round(settings.warmup_epochs * steps),
        val_cases, train_set.patch_size, _Progress(),
    )


def _start(settings: TrainSettings, ctx: DistContext, model_config: dict, train_set: TrainingSet, val_cases: Sequence[CaseFiles],
           run_config: Mapping[str, Any], init: InitSpec, data_contract: Mapping[str, Any] | None) -> _Run:
    """Phase 1, start or resume: check the fold folder and (when resuming) that last.pth was
    configured alike, build the model with its starting weights (every input is checked before
    anything in the folder changes), restore the state or write run_args.json (when replacing
    a previous run: with the first last.pth), and log the run's sizes."""
    resolved = models.resolve_model_config(model_config)
    tensorboard = _TensorBoard(settings.fold_dir / TENSORBOARD_DIR) if settings.tensorboard and ctx.is_main else None
    resuming, replacing = _prepare_fold_dir(settings)
    identity = _jsonable({"settings": asdict(settings), "data": train_set.describe(), "val_cases": [c.case_id for c in val_cases]})
    checkpoint = None
    if resuming:
        checkpoint = models.load_checkpoint(settings.fold_dir / "last.pth")
        _resume_check(checkpoint, {"model_config": resolved, **identity}, settings.fold_dir / "last.pth")
    model, init_record = _init_model(resolved, init, settings.seed, checkpoint, identity["val_cases"])
    contract = _jsonable(dict(data_contract)) if data_contract is not None else None
    records = _Records(resolved, _jsonable(dict(run_config)), init_record, contract, identity)
    run = _assemble(settings, ctx, model, records, train_set, val_cases)
    run.tensorboard = tensorboard
    if checkpoint is not None:
        _restore(run, checkpoint)
        if ctx.is_main and _best_checkpoint_missing(settings.fold_dir / "best_model.pth", run.state):
            get_logger().info(f"best_model.pth of epoch {run.state.best_epoch} was not written (killed after last.pth): rewritten from last.pth")
            _save_best(run)
    elif replacing:
        run.replacing = True  # the previous run stays until this one writes its first last.pth
    elif ctx.is_main:
        _write_run_args(run)
    state = run.state
    run.lr = run.lr_of_step(max(state.epoch * run.steps + state.step - 1, 0))  # what history reports when a resumed epoch only validates
    _log_start(run, train_set)
    return run


def _write_run_args(run: _Run) -> None:
    records = run.records
    write_run_args(run.settings.fold_dir, {**records.config, "model_config": records.model_config, "init": records.init, "world_size": run.ctx.world_size})


def _log_start(run: _Run, train_set: TrainingSet) -> None:
    ctx, amp = run.ctx, run.amp_dtype
    get_logger().info(
        f"{len(train_set.cases)} training cases x {train_set.samples_per_case} samples = {len(train_set)} per epoch "
        f"({run.steps} steps per rank), {len(run.val_cases)} validation volumes; {models.count_parameters(run.model) / 1e6:.2f} M parameters; "
        f"device {ctx.device} x {ctx.world_size} rank(s), {'autocast ' + str(amp).replace('torch.', '') if amp else 'float32'}"
    )


# --------------------------------------------------------------------------- phase: one epoch


def _step(run: _Run, images: torch.Tensor, masks: torch.Tensor, stop: _StopFlag) -> bool:
    """One optimiser step at (epoch, step) of ``run.state``, with that step's learning rate and
    seed; adds the loss to the epoch's sums. True when any rank has received a signal."""
    state, s = run.state, run.settings
    run.lr = run.lr_of_step(state.epoch * run.steps + state.step)
    for group in run.optimizer.param_groups:
        group["lr"] = run.lr
    torch.manual_seed(_step_seed(s.seed, state.epoch, state.step, run.ctx.rank))
    # In the model's layout; the loader's buffer is reused only after this step.
    images, masks = images.to(run.ctx.device, memory_format=run.memory_format), masks.to(run.ctx.device)
    loss = train_step(run.train_model, images, masks, run.optimizer, run.scaler, run.loss_fn, run.amp_dtype, s.grad_clip)
    n = images.shape[0]
    loss_sum, count, signalled = _all_sum([float(loss) * n, n, 1.0 if stop.signal_name else 0.0], run.ctx)
    if not math.isfinite(loss_sum):  # on every rank at once (a sum): none waits for another
        _diverged(run, float(loss))
    state.loss_sum += loss_sum
    state.loss_count += count
    state.step += 1
    return signalled > 0


def _diverged(run: _Run, loss: float) -> NoReturn:
    """Raise FloatingPointError naming the step and the cases of the batch whose ``loss`` (this
    rank's) was not finite. The inputs were checked finite when their volumes were read, so the
    training diverged."""
    state = run.state
    batch = f"cases {', '.join(run.sampler.batch_case_ids(state.step))}" if not math.isfinite(loss) else "a batch of another rank"
    raise FloatingPointError(
        f"training diverged: the loss became {loss if not math.isfinite(loss) else 'not finite'} at step {state.step + 1} "
        f"of epoch {state.epoch + 1} ({batch}; inputs are finite): lower --lr or --grad-clip"
    )


def _train_epoch(run: _Run, stop: _StopFlag) -> bool:
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


def _end_epoch(run: _Run, val_dice: float | None) -> None:
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
    _save_last(run)
    if improved:
        _save_best(run)
    fold_dir = run.settings.fold_dir
    write_history(fold_dir / "history.csv", state.history)
    plot_curves(fold_dir / "curves.png", state.history)
    if run.tensorboard is not None:
        run.tensorboard.log(row)
    get_logger().info(
        f"epoch {row['epoch']}/{run.settings.epochs}  train_loss {row['train_loss']:.4f}  val_dice {'-' if val_dice is None else f'{val_dice:.4f}'}  "
        f"best {state.best_dice:.4f} (epoch {state.best_epoch})  lr {run.lr:.2e}  {row['seconds']:.1f} s"
    )


def _save_last(run: _Run) -> None:
    """last.pth (rank 0 only): weights, optimiser, schedule position, scaler, progress, RNG
    states, and the records."""
    if not run.ctx.is_main:
        return
    s, state, records = run.settings, run.state, run.records
    if run.replacing:
        _replace_previous_run(s.fold_dir)
    schedule = {"schedule": s.schedule, "base_lr": s.lr, "warmup_steps": run.warmup_steps, "total_steps": run.total_steps,
                "step": state.epoch * run.steps + state.step, "lr": run.lr}
    models.save_checkpoint(
        s.fold_dir / "last.pth", run.model, records.model_config,
        optimizer=run.optimizer.state_dict(), scheduler=schedule, scaler=run.scaler.state_dict(),
        epoch=state.epoch, best_score=state.best_dice, history=state.history, progress=asdict(state), rng=_rng_state(),
        config=records.config, init=records.init, data_contract=records.data_contract, world_size=run.ctx.world_size,
        **records.identity,
    )
    if run.replacing:
        _write_run_args(run)
        run.replacing = False


def _save_best(run: _Run) -> None:
    """best_model.pth: the weights of the best epoch so far (called right after it ends)."""
    state, records = run.state, run.records
    models.save_checkpoint(
        run.settings.fold_dir / "best_model.pth", run.model, records.model_config,
        epoch=state.best_epoch, best_score=state.best_dice, history=state.history,
        config=records.config, init=records.init, val_cases=records.identity["val_cases"], data_contract=records.data_contract,
    )


# --------------------------------------------------------------------------- exits


def _preempted(run: _Run, stop: _StopFlag) -> int:
    """Save last.pth where the run stands and return :data:`EXIT_PREEMPTED`."""
    _save_last(run)
    if run.tensorboard is not None:
        run.tensorboard.close()
    if run.ctx.distributed:
        dist.barrier()  # keep every rank alive until rank 0 has written last.pth
    state = run.state
    get_logger().info(f"{stop.signal_name or 'signal on another rank'}: saved {run.settings.fold_dir / 'last.pth'} at epoch {state.epoch + 1} step {state.step}; exit {EXIT_PREEMPTED}")
    return EXIT_PREEMPTED


def _finish(run: _Run, stop: _StopFlag) -> int:
    """Check that every rank holds the same weights, log the best epoch, return 0 (also when a
    signal arrived after the last epoch's last.pth: nothing is left to resume)."""
    log = get_logger()
    if stop.signal_name:
        log.info(f"{stop.signal_name} after the last epoch was saved: the run is complete")
    if run.tensorboard is not None:
        run.tensorboard.close()
    digest = _check_replicas_agree(run.model, run.ctx)
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
    (:func:`_train_epoch`), validation (:func:`_validate`, every ``settings.val_every``
    epochs and after the last) and the end of the epoch
    (:func:`_end_epoch`); a preemption signal ends any of them with :func:`_preempted`.
    The fold folder is locked for the whole run (:func:`_fold_lock`), and the signal handlers
    are installed before the start, so a signal at any point leaves a resumable last.pth.
    """
    if not val_cases:
        raise ValueError("no validation cases")
    ctx = setup_distributed(settings.device)
    with _fold_lock(settings.fold_dir, ctx), _StopFlag() as stop:
        run = _start(settings, ctx, model_config, train_set, val_cases, run_config, init, data_contract)
        if stop.agreed(ctx):  # signalled during the start
            return _preempted(run, stop)
        while run.state.epoch < settings.epochs:
            if not _train_epoch(run, stop):
                return _preempted(run, stop)
            validated = _validation_due(settings, run.state.epoch)
            val_dice = _validate(run, stop) if validated else None
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
