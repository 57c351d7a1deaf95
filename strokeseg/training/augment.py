"""Training-time augmentation of one sample, a pure function of a per-sample random generator.

Every draw comes from the ``rng`` passed in, in a fixed order, and every number is drawn whether
or not its transform is applied, so the same generator state always gives the same sample
(resumed runs replay their epochs exactly). Spatial transforms move image and mask together:
the image is resampled trilinearly, the mask with nearest neighbour (labels stay {0, 1}).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..core.geometry import rotation_matrix

__all__ = ["AugmentConfig", "AUGMENT_PRESETS", "augment_preset", "augment_sample", "random_affine"]


@dataclass(frozen=True)
class AugmentConfig:
    flip_prob: float = 0.5  # probability of mirroring each spatial axis independently
    affine_prob: float = 0.5  # probability of the rotation + zoom resampling (the costly part)
    rotate_deg: float = 10.0  # rotation about each axis drawn from U(-rotate_deg, rotate_deg), degrees
    zoom_min: float = 0.9  # isotropic zoom factor drawn from U(zoom_min, zoom_max); > 1 enlarges
    zoom_max: float = 1.1
    intensity_prob: float = 0.5  # probability of the per-channel scale/shift jitter
    intensity_scale: float = 0.1  # channel multiplied by U(1 - s, 1 + s)
    intensity_shift: float = 0.1  # then U(-s, s) added (z-score units)

    def __post_init__(self) -> None:
        for name in ("flip_prob", "affine_prob", "intensity_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if self.rotate_deg < 0 or self.intensity_scale < 0 or self.intensity_shift < 0:
            raise ValueError(f"rotate_deg, intensity_scale and intensity_shift must be >= 0, got {self}")
        if not 0.0 < self.zoom_min <= self.zoom_max:
            raise ValueError(f"need 0 < zoom_min <= zoom_max, got {self.zoom_min}, {self.zoom_max}")


AUGMENT_PRESETS = ("off", "flip", "full")


def augment_preset(name: str) -> AugmentConfig | None:
    """'off' → None (no augmentation); 'flip' → mirroring only; 'full' → flips, rotation ±10°,
    zoom 0.9-1.1 and intensity jitter (the :class:`AugmentConfig` defaults)."""
    if name == "off":
        return None
    if name == "flip":
        return AugmentConfig(affine_prob=0.0, intensity_prob=0.0)
    if name == "full":
        return AugmentConfig()
    raise ValueError(f"augmentation must be one of {AUGMENT_PRESETS}, got {name!r}")


def random_affine(
    image: torch.Tensor, mask: torch.Tensor, angles_rad: np.ndarray, zoom: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate and zoom about the volume centre, in voxel space (rigid also for non-cubic volumes).

    image: float32 (C, X, Y, Z); mask: uint8 (X, Y, Z). Output voxel v samples the input at
    R⁻¹ (v - centre) / zoom + centre, so ``zoom`` > 1 enlarges the content. Outside the input is 0.
    Returns float32 (C, X, Y, Z) (trilinear) and uint8 (X, Y, Z) (nearest neighbour).
    """
    shape = image.shape[1:]
    # affine_grid's coordinates are normalised to [-1, 1] per axis and ordered (Z, Y, X) for
    # a (N, C, X, Y, Z) tensor: convert to voxel half-extents so the rotation stays rigid.
    half = np.array(shape[::-1], dtype=np.float64) / 2.0
    rotation_zyx = rotation_matrix(angles_rad)[::-1, ::-1].T  # inverse rotation, axes in (Z, Y, X) order
    theta = np.diag(1.0 / half) @ (rotation_zyx / zoom) @ np.diag(half)
    theta_t = torch.zeros(1, 3, 4, dtype=torch.float32)
    theta_t[0, :, :3] = torch.from_numpy(theta.astype(np.float32))
    grid = F.affine_grid(theta_t, [1, 1, *shape], align_corners=False)
    warped = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    labels = F.grid_sample(mask[None, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return warped, labels[0, 0].to(torch.uint8)


def augment_sample(
    image: np.ndarray, mask: np.ndarray, config: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Augment one sample: flips, then rotation + zoom, then intensity jitter.

    image: float32 (C, X, Y, Z) (z-scored); mask: uint8 (X, Y, Z) with values {0, 1}.
    Returns arrays of the same shapes and dtypes. The inputs are not modified, but a result may
    be a view of its input (flips only: negative strides, no copy), so copy it before writing
    to it; ``np.copyto`` into a batch buffer does both at once. The draws, in order: 3 flip
    coins, 1 affine coin, 3 angles, 1 zoom, 1 intensity coin, C scales, C shifts.
    """
    if image.ndim != 4 or image.shape[1:] != mask.shape:
        raise ValueError(f"expected image (C, X, Y, Z) and mask (X, Y, Z), got {image.shape} and {mask.shape}")
    flips = rng.random(3) < config.flip_prob
    do_affine = rng.random() < config.affine_prob
    angles = np.deg2rad(rng.uniform(-config.rotate_deg, config.rotate_deg, size=3))
    zoom = float(rng.uniform(config.zoom_min, config.zoom_max))
    do_intensity = rng.random() < config.intensity_prob
    channels = image.shape[0]
    scales = rng.uniform(1.0 - config.intensity_scale, 1.0 + config.intensity_scale, size=channels)
    shifts = rng.uniform(-config.intensity_shift, config.intensity_shift, size=channels)

    axes = tuple(int(a) for a in np.flatnonzero(flips))
    image = np.flip(image.astype(np.float32, copy=False), axis=tuple(a + 1 for a in axes))
    mask = np.flip(mask.astype(np.uint8, copy=False), axis=axes)
    if do_affine and (config.rotate_deg > 0 or config.zoom_min != 1.0 or config.zoom_max != 1.0):
        image_t = torch.from_numpy(np.ascontiguousarray(image))
        warped, labels = random_affine(image_t, torch.from_numpy(np.ascontiguousarray(mask)), angles, zoom)
        image, mask = warped.numpy(), labels.numpy()
    if do_intensity:
        image = image * scales.astype(np.float32)[:, None, None, None] + shifts.astype(np.float32)[:, None, None, None]
    return image, mask

