"""The one case type of every stage (STYLE.md rule 18; TorchIO's ``Subject`` is the model).

A :class:`Case` is an id, named :class:`Image` s (each with its affine), an optional label
image, the files it came from and a small metadata dict. Stages differ in what they do to a
case, not in how they hold it:

- a dataset's reader (``DatasetSpec.reader``) returns cases whose images are not read yet
  (``images`` empty, ``sources`` naming the files; :func:`Case.problem` says what discovery
  found wrong);
- reading fills ``images`` / ``label`` on the native grid;
- a dataset's ``prepare`` returns a case on the network grid whose ``meta`` says how that grid
  maps back to the native one (``bbox``, ``cropped_shape``);
- the evaluation loader returns a case of network inputs plus the reference on the scoring grid.

    >>> case = Case("sub-1", {"image": Image(np.zeros((4, 5, 6), np.float32), np.eye(4))})
    >>> case.shape
    (4, 5, 6)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["Image", "Case", "LABEL"]

LABEL = "label"  # the key of the label file in Case.sources


@dataclass(frozen=True)
class Image:
    """A 3-D volume in array axis order (X, Y, Z).

    data: float32 for intensities, uint8 {0,1} or bool for masks (a loader may keep the stored
    integer type); affine: (4, 4) float64 voxel-to-world (RAS, mm); zooms: (3,) voxel spacing in
    mm, array axis order (default: the lengths of the affine's columns); path: the file it was
    read from (None for an array made in memory).
    """

    data: np.ndarray
    affine: np.ndarray
    zooms: tuple[float, float, float] = ()  # type: ignore[assignment]
    path: Path | None = None

    def __post_init__(self) -> None:
        if np.ndim(self.data) != 3:
            raise ValueError(f"{self.path or 'image'}: expected a 3-D volume (X, Y, Z), got shape {np.shape(self.data)}")
        if np.shape(self.affine) != (4, 4):
            raise ValueError(f"{self.path or 'image'}: affine must be (4, 4), got {np.shape(self.affine)}")
        if not self.zooms:
            spacing = np.linalg.norm(np.asarray(self.affine, dtype=np.float64)[:3, :3], axis=0)
            object.__setattr__(self, "zooms", tuple(float(s) for s in spacing))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxels along X, Y, Z."""
        return tuple(int(n) for n in self.data.shape)  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (product of zooms in mm / 1000)."""
        return float(np.prod(self.zooms)) / 1000.0


@dataclass(frozen=True)
class Case:
    """One case: ``case_id``; ``images``: modality key -> :class:`Image`, in channel order;
    ``label``: the lesion mask (uint8 {0,1} or bool, on the images' grid) or None; ``sources``:
    key -> the file each image (and the label, key :data:`LABEL`) comes from, None for a file
    discovery did not find; ``meta``: small facts about the case (dataset name, a discovery
    ``problem``, ``bbox``/``cropped_shape`` of a prepared case, spacing of the scoring grid ...).
    """

    case_id: str
    images: Mapping[str, Image] = field(default_factory=dict)
    label: Image | None = None
    sources: Mapping[str, Path | None] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def keys(self) -> tuple[str, ...]:
        """The image keys, in channel order."""
        return tuple(self.images)

    @property
    def problem(self) -> str:
        """A one-line discovery problem (a missing or doubled file), "" when none."""
        return str(self.meta.get("problem", ""))

    def image(self, key: str) -> Image:
        """The image named ``key``; a missing key is a KeyError listing the case's keys."""
        if key not in self.images:
            raise KeyError(f"{self.case_id}: no image {key!r} (has {', '.join(self.images) or 'none'})")
        return self.images[key]

    def source(self, key: str) -> Path | None:
        """The file of image ``key`` (or of the label, :data:`LABEL`); None when not found."""
        return self.sources.get(key)

    @property
    def first(self) -> Image:
        """The first image: its grid is the case's grid."""
        if not self.images:
            raise ValueError(f"{self.case_id}: the case holds no image (not read yet)")
        return next(iter(self.images.values()))

    @property
    def shape(self) -> tuple[int, int, int]:
        """The case's grid (X, Y, Z): the first image's shape."""
        return self.first.shape

    @property
    def affine(self) -> np.ndarray:
        """(4, 4) voxel-to-world of the case's grid."""
        return self.first.affine

    def arrays(self, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """key -> image data (X, Y, Z) for ``keys`` (default: all, in channel order)."""
        return {key: self.image(key).data for key in (keys if keys is not None else self.keys)}

    def replace(self, **changes: Any) -> "Case":
        """A copy with ``changes`` (fields of :class:`Case`); ``meta`` is merged, not replaced."""
        if "meta" in changes:
            changes["meta"] = {**self.meta, **changes["meta"]}
        return dataclasses.replace(self, **changes)
