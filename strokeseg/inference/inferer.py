"""The one inferer of training validation, ``evaluate.py`` and ``predict.py``: a network's
foreground probability over a whole volume, configured once (MONAI's ``SlidingWindowInferer``).

An :class:`Inferer` holds every setting that shapes a prediction: the window rule (the whole
volume when the window covers it, else sliding windows; :func:`inference_window`), overlap,
blending, mirror TTA, the precision policy (:mod:`strokeseg.inference.precision`) and the brain
crop. The window itself, and what the network is, come with each call: one inferer serves the
folds of an ensemble with different windows.

    inferer = Inferer(device=torch.device("cuda"), precision="auto", brain_crop=True)
    probability = inferer(volume, predictor, window=96, downsampling=32)  # (X, Y, Z) float32
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .precision import resolve_precision
from .sliding_window import Predictor, crop_alignment, nonzero_box, sliding_window_inference

__all__ = ["Inferer", "inference_window", "sample_shape"]


def sample_shape(patch_size: int | Sequence[int], volume_shape: Sequence[int]) -> tuple[int, int, int]:
    """Spatial shape (voxels) of what a network sees of a volume: the whole volume when the
    patch covers it in every axis, else the patch.

    Training samples follow this rule, and so do the windows of validation and evaluation: a
    network trained on whole 32³ volumes (``--patch-size 96``) is run on whole 32³ volumes,
    not on a zero-padded 96³ window it never saw. E.g. (96, (32, 32, 32)) -> (32, 32, 32);
    (96, (197, 233, 189)) -> (96, 96, 96).
    """
    patch = (patch_size,) * 3 if isinstance(patch_size, numbers.Integral) else tuple(patch_size)
    shape = tuple(int(s) for s in volume_shape)
    return shape if all(p >= s for p, s in zip(patch, shape)) else tuple(int(p) for p in patch)  # type: ignore[return-value]


def inference_window(window: int | Sequence[int], shape: Sequence[int], fixed_input_size: bool = False) -> tuple[int, int, int]:
    """The window rule: the window (voxels) a network runs over a volume of spatial ``shape``.

    A fixed-input-size network (e.g. UCTransNet3D) always runs at ``window`` (a smaller volume
    is zero-padded to it); any other runs on what it saw in training (:func:`sample_shape`): the
    whole volume when the window covers it in every axis, else the window.
    E.g. (96, (32, 40, 24)) -> (32, 40, 24); (96, (197, 233, 189)) -> (96, 96, 96);
    (16, (12, 12, 12), fixed_input_size=True) -> (16, 16, 16).
    """
    if fixed_input_size:
        return (window,) * 3 if isinstance(window, numbers.Integral) else tuple(int(w) for w in window)  # type: ignore[return-value]
    return sample_shape(window, shape)


@dataclass(frozen=True)
class Inferer:
    """Whole-volume inference settings, and the function that applies them (``__call__``).

    overlap: fraction of a window shared by neighbours, in [0, 1); mode: "gaussian" or
    "constant" blending; sw_batch_size: windows per network call; device: where windows run
    and are stitched; mirror_tta: mean over the 8 flips of the spatial axes; precision: a
    requested precision (:data:`strokeseg.inference.precision.PRECISIONS` or None), resolved on
    ``device`` by :func:`strokeseg.inference.precision.resolve_precision` (see
    :attr:`resolved_precision`); brain_crop: run the windows over the box of the input's
    non-zero (brain) voxels only, the rest is background. See
    :func:`strokeseg.inference.sliding_window.sliding_window_inference` for the details.
    An invalid value raises ValueError.
    """

    overlap: float = 0.5
    mode: str = "gaussian"
    sw_batch_size: int = 4
    device: torch.device = torch.device("cpu")
    mirror_tta: bool = False
    precision: str | None = None
    brain_crop: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.overlap, numbers.Real) and 0 <= self.overlap < 1):
            raise ValueError(f"overlap must be >= 0 and < 1, got {self.overlap!r}")
        if self.mode not in ("gaussian", "constant"):
            raise ValueError(f"mode must be 'gaussian' or 'constant', got {self.mode!r}")
        if not (isinstance(self.sw_batch_size, numbers.Integral) and self.sw_batch_size > 0):
            raise ValueError(f"sw_batch_size must be a positive int, got {self.sw_batch_size!r}")
        resolve_precision(self.precision, torch.device(self.device))  # an unknown precision fails here

    @property
    def resolved_precision(self) -> str:
        """What runs on :attr:`device`: "fp32", "bf16" or "fp16" (the policy's table)."""
        return resolve_precision(self.precision, torch.device(self.device))

    def __call__(
        self,
        volume: np.ndarray | torch.Tensor,
        predictor: Predictor,
        window: int | Sequence[int],
        downsampling: int = 1,
        fixed_input_size: bool = False,
    ) -> np.ndarray:
        """Foreground probability float32 (X, Y, Z), on the CPU, of ``volume`` (C, X, Y, Z),
        already normalised as the network's training data.

        predictor: batch (B, C, wx, wy, wz) -> probabilities (B, 1, wx, wy, wz) (not logits),
        e.g. ``functools.partial(models.foreground_probability, model)``; window: the network's
        training window (voxels, int or 3 ints), applied by :func:`inference_window`;
        downsampling: input voxels per voxel of the network's coarsest grid, to which the brain
        crop's box is aligned (:func:`strokeseg.inference.sliding_window.crop_alignment`);
        fixed_input_size: the network runs only at ``window``. With :attr:`brain_crop` the windows
        cover the box of the non-zero voxels only (0 outside it); an all-zero volume is run whole.
        """
        box = None
        if self.brain_crop:
            box = nonzero_box(np.asarray(volume), crop_alignment(window, self.overlap, downsampling))
        region = volume if box is None else volume[(slice(None), *box)]
        probability = sliding_window_inference(
            region,
            predictor,
            inference_window(window, region.shape[1:], fixed_input_size),
            overlap=self.overlap,
            mode=self.mode,
            sw_batch_size=self.sw_batch_size,
            device=self.device,
            mirror_tta=self.mirror_tta,
            precision=self.precision,
        )
        if box is None:
            return probability
        out = np.zeros(tuple(volume.shape[1:]), dtype=np.float32)
        out[box] = probability
        return out
