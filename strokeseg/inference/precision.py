"""The precision policy: which arithmetic a network runs in, decided in this one module for
training steps, training validation, ``evaluate.py`` and ``predict.py``.

A requested precision is one of :data:`PRECISIONS` or None (no request); :func:`resolve_precision`
turns it into what runs on a device ("fp32", "bf16" or "fp16"):

=================  ==========  =====================  ================  ===================
requested          CPU         CPU with AVX512-BF16   CUDA with bf16    CUDA without bf16
                               or AMX
=================  ==========  =====================  ================  ===================
None (default)     fp32        fp32                   bf16              fp16
"auto"             fp32        bf16                   bf16              fp16
"fp32"             fp32        fp32                   fp32              fp32
"bf16"             bf16        bf16                   bf16              bf16
=================  ==========  =====================  ================  ===================

None is the default of ``evaluate.py`` (no ``--precision``) and of the training scripts
(``--amp auto``, :func:`training_precision`): float32 on the CPU, so CPU results are
reproducible, and autocast on CUDA. "auto" is the default of ``predict.py``: the fastest
arithmetic the device runs natively. "bf16" and "fp16" are autocast (weights stay float32);
float16 training adds loss scaling (the trainer's GradScaler).
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["PRECISIONS", "AMP_MODES", "cpu_supports_bf16", "resolve_precision", "autocast_dtype", "amp_autocast", "training_precision"]

# --precision values of evaluate.py and predict.py (see resolve_precision).
PRECISIONS = ("fp32", "bf16", "auto")
AMP_MODES = ("auto", "off")  # --amp of the training scripts (see training_precision)
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_supports_bf16() -> bool:
    """True when this CPU runs bfloat16 convolutions natively (AVX512-BF16 or AMX tiles)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a PyTorch without these probes: assume no
        return False


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """What a requested precision (one of :data:`PRECISIONS`, or None) runs as on ``device``:
    "fp32", "bf16" or "fp16", by the table of this module's docstring. E.g. (None, cpu) ->
    "fp32"; ("auto", cuda on an A100) -> "bf16"; ("auto", cuda on a V100) -> "fp16".
    Raises ValueError for any other value."""
    if precision not in (None, *PRECISIONS):
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision is None:
        precision = "auto" if device.type == "cuda" else "fp32"
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def autocast_dtype(device: torch.device, precision: str | None) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (:func:`resolve_precision`); None: float32."""
    return _DTYPES[resolve_precision(precision, device)]


def amp_autocast(device: torch.device, precision: str | None = None) -> contextlib.AbstractContextManager:
    """Autocast on ``device`` at ``precision`` (:func:`resolve_precision`); a null context for float32."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def training_precision(amp: str) -> str | None:
    """The precision of the training scripts' ``--amp`` (:data:`AMP_MODES`), for training steps
    and validation alike: 'auto' is None (the default row of :func:`resolve_precision`),
    'off' is 'fp32'."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    return None if amp == "auto" else "fp32"
