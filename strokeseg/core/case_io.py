"""Reading a discovered :class:`~strokeseg.core.case.Case`: its image files and label, checked
at the door (STYLE.md rule 12), for datasets whose cases need no reading of their own."""
from __future__ import annotations

from typing import Sequence

from .case import LABEL, Case, Image
from .geometry import as_binary_mask
from .io import CaseError, check_same_grid, load_image, load_nifti

__all__ = ["read_images"]


def read_images(case: Case, keys: Sequence[str], require_label: bool = True) -> Case:
    """``case`` with ``images`` read from its sources for ``keys`` (float32 (X, Y, Z), in that
    order) and its label (uint8 {0,1}) when it has a label file, or always when
    ``require_label``. Every image and the label must share the first image's shape and affine
    (1e-3 mm). Raises :class:`CaseError` naming the file, a missing one, or the case's discovery
    problem."""
    if case.problem:
        raise CaseError(case.problem)
    missing = [key for key in keys if case.source(key) is None]
    if missing:
        raise CaseError(f"{case.case_id}: no {', '.join(missing)} file found")
    images = {key: load_image(case.source(key)) for key in keys}
    first = next(iter(images.values()))
    label = None
    if case.source(LABEL) is not None or require_label:
        if case.source(LABEL) is None:
            raise CaseError(f"{case.case_id}: no label file found")
        mask = load_nifti(case.source(LABEL), dtype=None)  # labels checked in their own type
        check_same_grid(first, keys[0], (*list(images.values())[1:], mask))
        label = Image(as_binary_mask(mask.data, mask.path), mask.affine, mask.zooms, mask.path)
    else:
        check_same_grid(first, keys[0], list(images.values())[1:])
    return case.replace(images=images, label=label)
