"""The command-line flags the three training scripts share: the training flags
(:func:`add_training_arguments`, defaults in :data:`TRAINING_DEFAULTS`), the model flags of
the registered architectures (:func:`add_model_arguments`, resolved by
:func:`parse_training_arguments`) and the transfer flags of the scripts that start from a
pretrained checkpoint."""
from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import models

from ..inference.precision import AMP_MODES
from .augment import AUGMENT_PRESETS
from .losses import LOSS_NAMES

__all__ = [
    "TRANSFER_SCOPES",
    "TRAINING_DEFAULTS",
    "add_training_arguments",
    "add_model_arguments",
    "resolve_model_arguments",
    "add_transfer_scope_argument",
    "add_fold_mismatch_argument",
    "resolve_transfer_scope",
    "parse_training_arguments",
    "model_config_from_args",
]

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
