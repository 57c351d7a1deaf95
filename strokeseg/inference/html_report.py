"""What a clinician reads: a per-case overview figure and ``report.html``.

The overview (``overlays/<case_id>.png``) shows every input image side by side, each in three
orientations (axial, coronal, sagittal) through the centre of the largest predicted lesion
(else of the largest reference lesion, else of the image), the predicted mask as an outline
(reference: dashed). Images are reoriented to RAS with the affine (:func:`nibabel.as_closest_canonical`)
and drawn in radiological convention: the patient's right on the left of the screen, marked
R / L (sagittal: A / P), so the marks hold for LAS and RAS files alike.

``report.html`` in the output folder is built from the folder's tables (``lesion_volumes.csv``,
``lesions.csv``, so it covers every case of every call) and overview PNGs, embedded as base64:
one ``<section>`` per case with its figure, volume table, lesion table and quality flags, or
its failure reason. The file stands alone (no external resources).
"""
from __future__ import annotations

import base64
import csv
import html
import time
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..core.io import atomic_path, write_text
from .uncertainty import lesion_labels

__all__ = ["ORIENTATIONS", "to_ras", "focus_point", "display_planes", "save_case_overview", "write_html_report"]

# name, the RAS axis fixed by the slice, (screen-left, screen-right) marks
ORIENTATIONS = (("axial", 2, ("R", "L")), ("coronal", 1, ("R", "L")), ("sagittal", 0, ("A", "P")))
_PANEL_INCHES = 2.1


def to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """``volume`` (X, Y, Z) with axes flipped/permuted to RAS+ (axis 0 towards the patient's
    right, 1 anterior, 2 superior) by the closest canonical orientation of ``affine``, and its
    voxel sizes in mm in the new axis order."""
    image = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(volume, dtype=np.float32), np.asarray(affine, dtype=np.float64)))
    return np.asarray(image.dataobj), tuple(float(z) for z in image.header.get_zooms()[:3])  # type: ignore[return-value]


def focus_point(masks: Sequence[np.ndarray | None], image: np.ndarray) -> tuple[int, int, int]:
    """Voxel (X, Y, Z) the overview slices pass through: the centre of mass of the largest
    lesion (26-connected) of the first non-empty mask, else the centre of the image's non-zero box."""
    for mask in masks:
        if mask is not None and mask.any():
            labels, count, box = lesion_labels(mask.astype(bool), 26)
            sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
            where = np.argwhere(labels == int(sizes.argmax()) + 1).mean(axis=0)
            return tuple(int(round(c + s.start)) for c, s in zip(where, box))  # type: ignore[return-value]
    nonzero = np.argwhere(image != 0)
    if nonzero.size == 0:
        return tuple(s // 2 for s in image.shape)  # type: ignore[return-value]
    return tuple(int(v) for v in (nonzero.min(axis=0) + nonzero.max(axis=0)) // 2)  # type: ignore[return-value]


def display_planes(volume_ras: np.ndarray, point: Sequence[int]) -> dict[str, np.ndarray]:
    """Orientation name -> the slice of an RAS volume through ``point`` as shown on screen:
    rows top to bottom (superior, or anterior for axial, at the top), columns left to right in
    radiological convention (patient's right, or anterior for sagittal, on the left): the marks
    of :data:`ORIENTATIONS`."""
    planes = {}
    for name, axis, _ in ORIENTATIONS:
        planes[name] = np.flip(np.take(volume_ras, int(point[axis]), axis=axis)).T
    return planes


def _aspect(zooms: Sequence[float], axis: int) -> float:
    """Height / width of one displayed pixel of the slice across ``axis``."""
    rows, cols = [z for i, z in enumerate(zooms) if i != axis][::-1]
    return rows / cols


def _extent_ratio(shape: Sequence[int], zooms: Sequence[float], axis: int) -> float:
    """Height / width in mm of the slice across ``axis`` as displayed."""
    cols, rows = [n * z for i, (n, z) in enumerate(zip(shape, zooms)) if i != axis]
    return rows / cols


def save_case_overview(path: Path, images: Mapping[str, np.ndarray], affine: np.ndarray, mask: np.ndarray, reference: np.ndarray | None, title: str) -> None:
    """Write the overview PNG (module docstring) atomically. images: name -> float (X, Y, Z) on
    the grid of ``affine``; mask, reference: bool (X, Y, Z) (reference None: none)."""
    ras = {name: to_ras(data, affine) for name, data in images.items()}
    first = next(iter(ras.values()))[0]
    mask_ras = to_ras(mask, affine)[0] > 0.5
    ref_ras = None if reference is None else to_ras(reference, affine)[0] > 0.5
    point = focus_point((mask_ras, ref_ras), first)
    first_zooms = next(iter(ras.values()))[1]
    ratios = [_extent_ratio(first.shape, first_zooms, axis) + 0.12 for _, axis, _ in ORIENTATIONS]  # + panel title
    fig = Figure(figsize=(_PANEL_INCHES * len(ras), _PANEL_INCHES * sum(ratios) + 0.45), dpi=80)
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(len(ORIENTATIONS), len(ras), squeeze=False, gridspec_kw={"height_ratios": ratios}))
    outlines = [(display_planes(mask_ras.astype(np.float32), point), "#ff2020", "solid")]
    if ref_ras is not None:
        outlines.append((display_planes(ref_ras.astype(np.float32), point), "#20d0ff", "dashed"))
    for col, (name, (data, zooms)) in enumerate(ras.items()):
        low, high = np.percentile(data[data != 0], [1, 99]) if np.any(data != 0) else (0.0, 1.0)
        for row, (orientation, axis, (left, right)) in enumerate(ORIENTATIONS):
            ax = axes[row, col]
            ax.imshow(display_planes(data, point)[orientation], cmap="gray", vmin=low, vmax=max(high, low + 1e-6), aspect=_aspect(zooms, axis), interpolation="nearest")
            for planes, colour, style in outlines:
                if planes[orientation].any():
                    ax.contour(planes[orientation], levels=[0.5], colors=colour, linewidths=1.0, linestyles=style)
            for x, mark in ((0.03, left), (0.97, right)):
                ax.text(x, 0.5, mark, transform=ax.transAxes, color="yellow", fontsize=9, fontweight="bold", ha="center", va="center")
            ax.set_title(f"{name} {orientation} {('x', 'y', 'z')[axis]}={point[axis]}", fontsize=7)
            ax.set_axis_off()
    fig.suptitle(title, fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.45 / fig.get_figheight(), wspace=0.04, hspace=0.12)  # tight_layout: seconds
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


# --------------------------------------------------------------------------- report.html

_STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222;max-width:1100px}
section{border:1px solid #bbb;border-radius:6px;padding:0.8em 1.2em;margin:1em 0}
section.failed{border-color:#c00;background:#fff4f4}
table{border-collapse:collapse;margin:0.5em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#f0f0f0}.flag{color:#b00;font-weight:bold}.ok{color:#070}img{max-width:100%}
.case{display:flex;flex-wrap:wrap;gap:1.2em;align-items:flex-start}"""
_LESION_HEADERS = (("lesion_id", "lesion"), ("volume_ml", "volume (ml)"), ("centroid_x_mm", "x (mm)"), ("centroid_y_mm", "y (mm)"),
                   ("centroid_z_mm", "z (mm)"), ("mean_probability", "mean probability"), ("fold_detection", "fraction of folds detecting"))


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _number(text: str | None, decimals: int) -> str:
    try:
        return f"{float(text):.{decimals}f}"  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return html.escape(text or "")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _case_section(row: Mapping[str, str], lesions: Sequence[Mapping[str, str]], figure: Path) -> str:
    case = html.escape(row["case_id"])
    if row.get("status") == "failed":
        return f'<section class="failed" id="case-{case}"><h2>{case}: failed</h2><p>{html.escape(row.get("reason") or "")}</p></section>'
    flags = [f for f in (row.get("qc_flags") or "").split("; ") if f]
    items = "".join(f'<li class="flag">{html.escape(f)}</li>' for f in flags) or '<li class="ok">no quality flags</li>'
    parts = [f'<section id="case-{case}"><h2>{case}</h2><h3>Quality flags</h3><ul>{items}</ul><div class="case">']
    if figure.is_file():
        encoded = base64.b64encode(figure.read_bytes()).decode("ascii")
        parts.append(f'<img alt="{case}: inputs with the lesion outline" src="data:image/png;base64,{encoded}">')
    parts.append("<div>" + _table(("lesion volume (ml)", "lesions", "largest lesion (ml)", "model", "folds"),
                        [(_number(row.get("lesion_volume_ml"), 2), html.escape(row.get("lesion_count") or ""), _number(row.get("largest_lesion_ml"), 2),
                          html.escape(row.get("model") or ""), html.escape(row.get("folds") or ""))]))
    if lesions:
        parts.append(_table([h for _, h in _LESION_HEADERS], [[_number(les.get(k), 0 if k == "lesion_id" else 2) for k, _ in _LESION_HEADERS] for les in lesions]))
    parts.append("</div></div></section>")
    return "".join(parts)


def write_html_report(output_dir: Path, title: str) -> Path:
    """Write ``output_dir/report.html`` (module docstring) from the folder's tables and
    overviews, atomically; returns its path."""
    volumes = _read_rows(output_dir / "lesion_volumes.csv")
    lesions: dict[str, list[dict]] = {}
    for les in _read_rows(output_dir / "lesions.csv"):
        lesions.setdefault(les["case_id"], []).append(les)
    failed = [row for row in volumes if row.get("status") == "failed"]
    sections = [_case_section(row, lesions.get(row["case_id"], []), output_dir / "overlays" / f"{row['case_id']}.png") for row in volumes]
    summary = f"{len(volumes)} case(s), {len(failed)} failed" + (": " + ", ".join(html.escape(r["case_id"]) for r in failed) if failed else "")
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>'
            f"<h1>{html.escape(title)}</h1><p>{summary}. Generated {time.strftime('%Y-%m-%d %H:%M')}. Red outline: predicted lesion; "
            "dashed blue: reference mask. Radiological convention (patient's right on the left). "
            "Research software: not for diagnosis.</p>" + "".join(sections) + "</body></html>\n")
    path = output_dir / "report.html"
    write_text(path, page)
    return path
