"""Build networks from plain dicts, save and load checkpoints, copy pretrained weights.

A model config is a JSON-able dict: ``{"arch": ..., <fields of that arch's dataclass>}``:

the keys and defaults are the fields of the architecture's config dataclass in the registry
(:mod:`models.registry`), e.g. ``resnet18``: variant ('single' | 'dwi_only' | 'separate' |
'shared'), in_channels (the variant's), num_classes (2), width (64), norm ('batch');
``uctransnet3d``: in_channels (1), num_classes (2), width (64), norm ('group'), patch_size (64),
layers (4), heads (4), dropout (0.1); ``resenc_unet``: variant (as resnet18's), in_channels,
num_classes (2), width (32), norm ('instance'), stages (6).

Checkpoint file (``torch.save`` of a dict, read with ``torch.load(weights_only=True)``)::

    {"format_version": 1, "model_config": <resolved model config>, "model": <state_dict>,
     "weights_sha256": <weights_digest(state_dict)>, optional "optimizer", "scheduler", "scaler",
     "epoch", "best_score", "config" (run args), "history", "rng", ...}

Everything in it must be loadable without pickle: tensors, str, int, float, bool, None and
dicts/lists/tuples of them (convert numpy values with ``.tolist()`` / ``float()``).

Integrity: :func:`load_checkpoint` recomputes the weights' digest and refuses a file whose
weights changed since they were saved (a flipped bit that leaves a finite 1.1e37 included), and
refuses non-finite weights (NaN, inf) naming the tensor. Checkpoints written before digests load
with one NOTE line and the finiteness check only.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from strokeseg.core.io import atomic_path
from strokeseg.core.runner import get_logger

from .common import unwrap_model
from .registry import ArchSpec, arch_names, arch_of_network, arch_spec, canonical_arch

__all__ = [
    "FORMAT_VERSION",
    "DIGEST_KEY",
    "model_config_defaults",
    "resolve_model_config",
    "build_model",
    "model_config_of",
    "weights_digest",
    "save_checkpoint",
    "load_checkpoint",
    "model_from_checkpoint",
    "TransferReport",
    "load_pretrained",
]

FORMAT_VERSION = 1
DIGEST_KEY = "weights_sha256"
_RESERVED_KEYS = ("format_version", "model_config", "model", DIGEST_KEY)


def _spec_of(config: Any) -> ArchSpec:
    if not isinstance(config, dict):
        raise ValueError(f"model config must be a dict, got {type(config).__name__}")
    arch = config.get("arch")
    if not isinstance(arch, str) or canonical_arch(arch) not in arch_names():
        raise ValueError(f"model config 'arch' must be one of {arch_names()}, got {arch!r}")
    return arch_spec(arch)


def model_config_defaults(arch: str) -> dict:
    """Default model config of the registered architecture ``arch`` as a plain dict."""
    spec = _spec_of({"arch": arch})
    return {"arch": spec.name, **asdict(spec.config_cls())}


def resolve_model_config(config: dict) -> dict:
    """Complete and validate a model config: defaults filled in, every value checked.

    Raises ValueError on an unknown arch, a key that is not a field of that arch's config
    dataclass (e.g. 'patch_size' for 'resnet18') or a bad value (the dataclass checks it). A
    former checkpoint name of the arch (:data:`models.registry.FORMER_NAMES`) resolves to its
    registry name.
    """
    spec = _spec_of(config)
    known = {f.name for f in fields(spec.config_cls)}
    unknown = sorted(set(config) - known - {"arch"})
    if unknown:
        raise ValueError(f"unknown {spec.name} model config key(s) {unknown}; allowed: {sorted(known)}")
    values = {k: v for k, v in config.items() if k != "arch"}
    return {"arch": spec.name, **asdict(spec.config_cls(**values))}


def build_model(config: dict) -> nn.Module:
    """A freshly initialised network from a model config dict (see :func:`resolve_model_config`).

    Build under ``with torch.device("meta"):`` to count parameters without allocating.
    """
    resolved = resolve_model_config(config)
    spec = arch_spec(resolved.pop("arch"))
    return spec.network_cls(spec.config_cls(**resolved))


def model_config_of(model: nn.Module) -> dict:
    """The resolved model config of a network built here (wrappers are unwrapped)."""
    net = unwrap_model(model)
    return {"arch": arch_of_network(net).name, **asdict(net.config)}


def _check_weights_only_safe(value: Any, where: str) -> None:
    # torch.load(weights_only=True) refuses arbitrary objects; fail at save time, not at resume.
    if value is None or isinstance(value, (bool, int, float, str, Tensor, torch.Size)):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise ValueError(f"checkpoint {where}: key {key!r} is not str or int")
            _check_weights_only_safe(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_weights_only_safe(item, f"{where}[{i}]")
        return
    raise ValueError(
        f"checkpoint {where} holds a {type(value).__name__}, which torch.load(weights_only=True) "
        "cannot read; store tensors, numbers, strings or lists/dicts of them"
    )


def weights_digest(state: dict[str, Tensor]) -> str:
    """SHA-256 (hex) of a state_dict: each entry's key, dtype, shape and raw bytes, in key order.
    Equal for equal weights whatever the device; any changed bit changes it."""
    digest = hashlib.sha256()
    for key, tensor in state.items():
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_weights(path: Path, checkpoint: dict) -> None:
    """ValueError naming ``path`` when its weights differ from the digest recorded at save or
    hold a non-finite value (naming the tensor); a checkpoint without a digest (written before
    digests) gets a NOTE, once per file."""
    state = checkpoint["model"]
    for key, tensor in state.items():
        if not isinstance(tensor, Tensor):
            raise ValueError(f"{path}: state_dict entry {key!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path}: non-finite weights (NaN or inf) in tensor {key!r}; the file is corrupt or its training diverged")
    recorded = checkpoint.get(DIGEST_KEY)
    if recorded is None:
        _note_no_digest(str(path))
    elif recorded != weights_digest(state):
        raise ValueError(f"{path}: weights differ from the digest recorded when it was saved (the file was altered or corrupted); copy it again or retrain")


@functools.lru_cache(maxsize=None)
def _note_no_digest(path: str) -> None:
    get_logger().info(f"NOTE {path}: written before checkpoints recorded a weights digest; its integrity cannot be checked (only that its weights are finite)")


def save_checkpoint(path: str | os.PathLike, model: nn.Module, model_config: dict, **extra: Any) -> None:
    """Write ``{"format_version", "model_config", "model", **extra}`` to ``path`` atomically.

    ``model`` may be wrapped (DDP, DataParallel, torch.compile): the bare network's state_dict
    is stored, so keys never carry ``module.`` / ``_orig_mod.`` prefixes. ``model_config``
    must describe ``model`` (checked). ``extra``: optimizer/scheduler/scaler state dicts,
    epoch, best_score, config (run args), history, rng ...; must be weights-only loadable.
    """
    resolved = resolve_model_config(model_config)
    actual = model_config_of(model)
    if resolved != actual:
        raise ValueError(f"model_config {resolved} does not describe the model being saved ({actual})")
    clash = [k for k in _RESERVED_KEYS if k in extra]
    if clash:
        raise ValueError(f"checkpoint extra keys {clash} are reserved")
    _check_weights_only_safe(extra, "extra")
    state = unwrap_model(model).state_dict()
    payload = {"format_version": FORMAT_VERSION, "model_config": resolved, "model": state, DIGEST_KEY: weights_digest(state), **extra}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (weights only, no pickle).

    Raises FileNotFoundError naming ``path`` when it is missing, ValueError when the file is
    not a readable checkpoint of a known format_version, or its weights are not the ones saved
    (digest) or not finite (see the module docstring). ``mmap``: map the file instead of reading
    it (tensors stay on disk until used; for reading a few entries of a large file: the weights
    are then not checked, as nothing reads them).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # the file exists: any failure (UnpicklingError, RuntimeError, EOFError...) means not a checkpoint
        raise ValueError(_unreadable(path, err)) from err
    if not isinstance(checkpoint, dict) or "format_version" not in checkpoint:
        raise ValueError(f"{path}: not a checkpoint of this pipeline (no 'format_version' entry)")
    if checkpoint["format_version"] != FORMAT_VERSION:
        version = checkpoint["format_version"]
        raise ValueError(f"{path}: checkpoint format_version {version!r}, expected {FORMAT_VERSION}")
    if not isinstance(checkpoint.get("model_config"), dict) or not isinstance(checkpoint.get("model"), dict):
        raise ValueError(f"{path}: checkpoint lacks a 'model_config' dict or a 'model' state_dict")
    if not mmap:
        _check_weights(path, checkpoint)
    return checkpoint


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FOREIGN = re.compile(r"Unsupported global: GLOBAL (\S+)")


def _unreadable(path: Path, err: Exception) -> str:
    """One line saying why ``torch.load(weights_only=True)`` refused ``path`` (never torch's
    advice to load it unsafely)."""
    text = _ANSI.sub("", str(err)).strip()
    foreign = _FOREIGN.search(text)
    if foreign:  # a pickled Python object, which only an unsafe load would rebuild
        return (
            f"{path}: not a checkpoint of this pipeline (it holds a Python object, {foreign.group(1)}, besides tensors; "
            "loading it would run code from the file, so never do that with a file from an untrusted source)"
        )
    if text.startswith("Weights only load failed"):
        return f"{path}: not a readable checkpoint (not a PyTorch checkpoint file)"
    first = text.splitlines()[0].split(". ")[0] if text else type(err).__name__
    return f"{path}: not a readable checkpoint, truncated or corrupt ({path.stat().st_size} bytes; {first}); copy it again or use another"


def model_from_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the exact network stored in ``path`` (strict load) and move it to ``map_location``.

    Returns (model in train mode, checkpoint dict). Errors as :func:`load_checkpoint`; a
    model_config or state_dict that does not build/match raises ValueError naming the file.
    """
    checkpoint = load_checkpoint(path, map_location)
    try:
        model = build_model(checkpoint["model_config"])
        model.load_state_dict(checkpoint["model"], strict=True)
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"{path}: stored model_config and weights do not rebuild a network: {err}") from err
    return model.to(map_location), checkpoint


@dataclass
class TransferReport:
    """What :func:`load_pretrained` did. Keys are target state_dict keys unless stated.

    copied: received pretrained values; inflated: subset of copied whose 1-channel input
    kernel was spread over the target's input channels; missing: in scope but absent from the
    source; unexpected: source keys in scope that no target key used; untouched: outside the
    scope, left at initialisation. parameters_copied: trainable values (elements of the
    copied tensors that are parameters, not buffers such as BatchNorm statistics) that received
    pretrained values; parameters_total: the target's parameter count.
    """

    source: str
    scope: str
    copied: list[str]
    inflated: list[str]
    missing: list[str]
    unexpected: list[str]
    untouched: list[str]
    source_fold: int | None = None  # the fold the source checkpoint was trained on, when it records one
    parameters_copied: int = 0
    parameters_total: int = 0

    def summary(self) -> str:
        """One line for the training log."""
        fold = f", fold {self.source_fold}" if self.source_fold is not None else ""
        share = self.parameters_copied / max(self.parameters_total, 1)
        return (
            f"transfer from {self.source} (scope={self.scope}{fold}): copied {len(self.copied)} tensors, "
            f"{self.parameters_copied:,} of {self.parameters_total:,} parameters ({share:.1%}); "
            f"{len(self.inflated)} inflated, {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.untouched)} left at initialisation"
        )


_BRANCH = re.compile(r"^(encoders|decoders)\.(\d+)\.")


def _source_key(key: str, branch_counts: dict[str, int]) -> str:
    # ResNet U-Net branches: target branch i reads source branch i, or 0 when the source has one
    # (a 'single' encoder feeds both 'separate' encoders; one decoder feeds both heads).
    match = _BRANCH.match(key)
    if match is None:
        return key
    name, index = match.group(1), int(match.group(2))
    source_index = 0 if branch_counts.get(name, 0) == 1 else index
    return f"{name}.{source_index}.{key[match.end():]}"


def _branch_counts(keys: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key in keys:
        match = _BRANCH.match(key)
        if match:
            counts[match.group(1)] = max(counts.get(match.group(1), 0), int(match.group(2)) + 1)
    return counts


def _check_compatible(source_config: dict, target_config: dict, path: Path) -> None:
    if source_config["arch"] != target_config["arch"]:
        raise ValueError(
            f"{path}: checkpoint arch {source_config['arch']!r} differs from target arch {target_config['arch']!r}"
        )
    if source_config["norm"] != target_config["norm"]:
        raise ValueError(
            f"{path}: checkpoint norm {source_config['norm']!r} differs from target norm {target_config['norm']!r} "
            "(normalisation is part of a checkpoint's identity: a BatchNorm/GroupNorm mix-up)"
        )
    if arch_spec(source_config["arch"]).fixed_input_size and source_config["patch_size"] != target_config["patch_size"]:
        raise ValueError(
            f"{path}: checkpoint patch_size {source_config['patch_size']} differs from target patch_size "
            f"{target_config['patch_size']} ({source_config['arch']} runs only at its patch size)"
        )


def _transfer_tensor(key: str, source: Tensor, target: Tensor, inflatable: bool, path: Path) -> tuple[Tensor, bool]:
    if source.shape == target.shape:
        return source, False
    same_except_inputs = source.shape[:1] + source.shape[2:] == target.shape[:1] + target.shape[2:]
    if inflatable and source.shape[1] == 1 and same_except_inputs:
        # 1-channel stem → C channels: duplicate the kernel and divide by C (C = 2: halve),
        # so equal inputs on every channel give the pretrained response.
        channels = target.shape[1]
        return source.repeat(1, channels, 1, 1, 1) / channels, True
    raise ValueError(
        f"{path}: shape mismatch for {key}: checkpoint {tuple(source.shape)}, target {tuple(target.shape)}"
    )


def _parameter_counts(net: nn.Module, copied: list[str]) -> tuple[int, int]:
    """Elements of the parameters among the ``copied`` state_dict keys (buffers such as BatchNorm
    statistics are not parameters), and of all of ``net``'s parameters."""
    parameters = dict(net.named_parameters())
    return sum(parameters[k].numel() for k in copied if k in parameters), sum(p.numel() for p in parameters.values())


def load_pretrained(
    model: nn.Module, model_config: dict, checkpoint_path: str | os.PathLike, scope: str = "encoder"
) -> TransferReport:
    """Copy pretrained weights from a checkpoint into ``model`` (in place) and report what moved.

    scope: 'encoder' (networks laid out by :mod:`models.strategies`, e.g. the ResNet U-Net and
    the ResEnc U-Net: every ``encoders.<i>``; UCTransNet3D: the CNN encoder, not the channel
    transformer) or 'all' (every tensor). A 'separate' target gets the pretrained encoder in
    every branch; a multi-channel stem ('shared') is inflated from a 1-channel kernel
    (duplicated across input channels and divided by their number). ``model_config`` is the
    target's config. Raises FileNotFoundError for a missing file and ValueError for a file
    that is not a checkpoint, a different arch, a different norm (BatchNorm vs GroupNorm), a
    different UCTransNet3D patch size, or any shape mismatch (key and both shapes named).
    Nothing is copied unless every in-scope tensor can be.
    """
    if scope not in ("encoder", "all"):
        raise ValueError(f"scope must be 'encoder' or 'all', got {scope!r}")
    path = Path(checkpoint_path)
    net = unwrap_model(model)
    target_config = resolve_model_config(model_config)
    if target_config != model_config_of(net):
        raise ValueError(f"model_config {target_config} does not describe the target model ({model_config_of(net)})")
    checkpoint = load_checkpoint(path)
    try:
        source_config = resolve_model_config(checkpoint["model_config"])
    except ValueError as err:
        raise ValueError(f"{path}: invalid stored model_config: {err}") from err
    _check_compatible(source_config, target_config, path)

    source_state = checkpoint["model"]
    target_state = net.state_dict()
    in_scope = (lambda key: True) if scope == "all" else (lambda key: key.startswith(net.encoder_prefixes))
    counts = _branch_counts(list(source_state))
    new_state, copied, inflated, missing, used = {}, [], [], [], set()
    for key, target in target_state.items():
        if not in_scope(key):
            continue
        source_key = _source_key(key, counts)
        if source_key not in source_state:
            missing.append(key)
            continue
        tensor, was_inflated = _transfer_tensor(key, source_state[source_key], target, key in net.input_conv_keys, path)
        new_state[key] = tensor.to(dtype=target.dtype, device=target.device)
        copied.append(key)
        used.add(source_key)
        if was_inflated:
            inflated.append(key)
    net.load_state_dict({**target_state, **new_state}, strict=True)
    unexpected = [k for k in source_state if in_scope(k) and k not in used]
    untouched = [k for k in target_state if not in_scope(k)]
    fold = (checkpoint.get("config") or {}).get("fold")
    return TransferReport(
        str(path), scope, copied, inflated, missing, unexpected, untouched, fold if isinstance(fold, int) else None,
        *_parameter_counts(net, copied),
    )
