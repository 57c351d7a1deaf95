"""strokeseg.inference.html_report: the overview figure (RAS-reoriented, R/L right for LAS and
RAS files, slices through the largest lesion) and report.html, rendered by headless Chromium
(issue 24, item 7)."""
from __future__ import annotations

import csv
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

import predict
from strokeseg.evaluation.report import axial_slice_index
from strokeseg.inference.html_report import ORIENTATIONS, display_planes, focus_point, save_case_overview, to_ras, write_html_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _lesion_left_anterior_superior() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One 20^3 volume (1 mm, world origin at its centre) with a voxel at the patient's left,
    anterior, superior (world (-7, 6, 5) mm), stored as RAS and as LAS (x flipped)."""
    ras = np.zeros((20, 20, 20), dtype=np.float32)
    ras[3, 16, 15] = 1.0  # x = 3 - 10 = -7 (left), y = 16 - 10 = 6 (anterior), z = 5 (superior)
    ras_affine = np.array([[1, 0, 0, -10], [0, 1, 0, -10], [0, 0, 1, -10], [0, 0, 0, 1]], dtype=np.float64)
    las_affine = np.array([[-1, 0, 0, 9], [0, 1, 0, -10], [0, 0, 1, -10], [0, 0, 0, 1]], dtype=np.float64)
    return ras, ras_affine, ras[::-1].copy(), las_affine


def test_planes_show_the_patients_left_on_the_screens_right_for_ras_and_las_files() -> None:
    ras, ras_affine, las, las_affine = _lesion_left_anterior_superior()
    planes = []
    for data, affine in ((ras, ras_affine), (las, las_affine)):
        volume, zooms = to_ras(data, affine)
        assert zooms == (1.0, 1.0, 1.0)
        planes.append(display_planes(volume, (3, 16, 15)))
    marks = {name: sides for name, _, sides in ORIENTATIONS}
    assert marks == {"axial": ("R", "L"), "coronal": ("R", "L"), "sagittal": ("A", "P")}
    for name in marks:
        np.testing.assert_array_equal(planes[0][name], planes[1][name])  # the same picture from either file
        (row, col), width, height = np.argwhere(planes[0][name])[0], planes[0][name].shape[1], planes[0][name].shape[0]
        if name in ("axial", "coronal"):
            assert col > width / 2  # the patient's left: the screen's right, marked "L"
        else:
            assert col < width / 2  # anterior: the screen's left, marked "A"
        assert row < height / 2  # anterior (axial) or superior (coronal, sagittal) at the top


def test_slices_pass_through_the_largest_lesion_not_slice_0_when_the_mask_fills_the_volume() -> None:
    image = np.ones((9, 10, 11), dtype=np.float32)
    full = np.ones(image.shape, dtype=bool)
    assert axial_slice_index(full, full) == 0  # the old overlay's choice: the first slice
    assert focus_point((full, None), image) == (4, 4, 5)
    two = np.zeros(image.shape, dtype=bool)
    two[0, 0, 0] = True  # small lesion
    two[5:8, 6:9, 1:4] = True  # largest lesion, centre (6, 7, 2)
    assert focus_point((two, None), image) == (6, 7, 2)
    assert focus_point((None, two), image) == (6, 7, 2)  # no prediction: the reference's
    assert focus_point((np.zeros_like(two), None), image) == (4, 4, 5)  # nothing: the image's centre


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_report_has_one_self_contained_section_per_case(tmp_path: Path) -> None:
    ras, affine, _, _ = _lesion_left_anterior_superior()
    save_case_overview(tmp_path / "overlays" / "a.png", {"dwi": ras + 1, "adc": 2 - ras}, affine, ras > 0, None, "a")
    volumes = [
        {"case_id": "a", "status": "done", "reason": "", "lesion_volume_ml": "0.001", "lesion_count": "1", "largest_lesion_ml": "0.001",
         "qc_flags": "mask_outside_brain (60 % of mask voxels)", "model": "m", "folds": "fold_0"},
        {"case_id": "b", "status": "done", "reason": "", "lesion_volume_ml": "0.0", "lesion_count": "0", "largest_lesion_ml": "0.0", "qc_flags": "", "model": "m", "folds": "fold_0"},
        {"case_id": "c", "status": "failed", "reason": "c_adc.nii.gz: shape <40> differs", "lesion_volume_ml": "", "lesion_count": "",
         "largest_lesion_ml": "", "qc_flags": "", "model": "", "folds": ""},
    ]
    _write_csv(tmp_path / "lesion_volumes.csv", volumes)
    _write_csv(tmp_path / "lesions.csv", [{"case_id": "a", "lesion_id": "1", "voxels": "1", "volume_ml": "0.001", "centroid_x_mm": "-7",
                                           "centroid_y_mm": "6", "centroid_z_mm": "5", "mean_probability": "0.8", "fold_detection": "0.5"}])
    page = write_html_report(tmp_path, "T").read_text()
    sections = re.findall(r"<section.*?</section>", page, re.S)
    assert [re.search(r'id="case-(\w+)"', s).group(1) for s in sections] == ["a", "b", "c"]
    assert sections[0].count("data:image/png;base64,") == 1 and "mask_outside_brain (60 % of mask voxels)" in sections[0]
    assert "0.80" in sections[0] and "no quality flags" in sections[1] and "<img" not in sections[1]  # b has no overview
    assert 'class="failed"' in sections[2] and "shape &lt;40&gt; differs" in sections[2]
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing outside the file


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install chromium; .ci/run installs it)")
def test_report_of_predict_renders_in_headless_chromium(synthetic_isles_b: Path, tmp_path: Path) -> None:
    from test_predict import ISLES_SHAPE, _run_dir  # tiny untrained fold models

    run = _run_dir(tmp_path / "run", "ISLES2022", ["dwi", "adc"], ISLES_SHAPE, {"target_shape": [ISLES_SHAPE] * 3, "margin": 4}, folds=(0,))
    source = tmp_path / "in"
    for sub in ("sub-strokecase0001", "sub-strokecase0002", "sub-strokecase0003"):
        shutil.copytree(synthetic_isles_b / "rawdata" / sub, source / "rawdata" / sub)
    (source / "rawdata" / "sub-strokecase0003" / "ses-0001" / "sub-strokecase0003_ses-0001_adc.nii.gz").write_bytes(b"broken")
    out = tmp_path / "out"
    assert predict.main(["--input", str(source), "--run", str(run), "--output-dir", str(out)]) == 1
    url = (out / "report.html").resolve().as_uri()
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([*browser, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    assert dom.count("<section") == 3 and dom.count('class="failed"') == 1
    shot = tmp_path / "shot.png"
    subprocess.run([*browser, f"--screenshot={shot}", "--window-size=900,1200", url], capture_output=True, timeout=120, check=True)
    pixels = imread(str(shot))[..., :3]
    assert pixels.shape[:2] == (1200, 900)
    dark = (pixels.mean(axis=2) < 0.5).mean()
    assert 0.02 < dark < 0.9, f"screenshot looks blank ({dark:.1%} dark pixels)"
