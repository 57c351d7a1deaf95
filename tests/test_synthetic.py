"""Tests of strokeseg.datasets.synthetic: exact layouts, geometry, labels, contrast, determinism, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from strokeseg.core.io import affines_match, load_nifti
from strokeseg.datasets import phantom, synthetic
from strokeseg.datasets.phantom import Tissue

ISLES_IDS = [f"sub-strokecase{i:04d}" for i in range(1, 7)]
ATLAS_SUBJECTS = [("R001", "sub-r001s001"), ("R001", "sub-r001s002"), ("R001", "sub-r001s003"),
                  ("R001", "sub-r001s004"), ("R002", "sub-r002s001"), ("R002", "sub-r002s002")]
BRATS_IDS = ["BraTS-GLI-00005-100", "BraTS-GLI-00007-100", "BraTS-GLI-00007-101",
             "BraTS-GLI-00009-100", "BraTS-GLI-00011-100", "BraTS-GLI-00011-101"]
ATLAS_SPACE = "space-MNI152NLin2009aSym"
BRATS_AFFINE = [[-1, 0, 0, 0], [0, -1, 0, 47], [0, 0, 1, 0], [0, 0, 0, 1]]  # 48x48x32 grid, origin (0, Y-1, 0)


def isles_paths(root: Path, case_id: str, layout: str) -> dict[str, Path]:
    """The SPEC.md file names, spelled out independently of the generator."""
    ses = root / case_id / "ses-0001"
    if layout == "A":
        raw = {"dwi": ses / "dwi" / f"{case_id}_ses-0001_dwi.nii.gz",
               "adc": ses / "dwi" / f"{case_id}_ses-0001_adc.nii.gz",
               "flair": ses / "anat" / f"{case_id}_ses-0001_FLAIR.nii.gz"}
    else:
        raw_ses = root / "rawdata" / case_id / "ses-0001"
        raw = {"dwi": raw_ses / f"{case_id}_ses-0001_dwi.nii.gz",
               "adc": raw_ses / f"{case_id}_ses-0001_adc.nii.gz",
               "flair": raw_ses / f"{case_id}_ses-0001_flair.nii.gz"}
    raw["msk"] = root / "derivatives" / case_id / "ses-0001" / f"{case_id}_ses-0001_msk.nii.gz"
    return raw


def atlas_stem(root: Path, cohort: str, subject: str) -> Path:
    return root / "Training" / cohort / subject / "ses-1" / "anat" / f"{subject}_ses-1_{ATLAS_SPACE}"


def read(path: Path) -> np.ndarray:
    return load_nifti(path).data


def arrays_of(root: Path) -> dict[str, tuple[np.dtype, np.ndarray, np.ndarray]]:
    """Every NIfTI under root: relative path -> (stored dtype, data, affine)."""
    out = {}
    for path in sorted(root.rglob("*.nii.gz")):
        img = nib.load(str(path))
        out[str(path.relative_to(root))] = (img.get_data_dtype(), np.asanyarray(img.dataobj), img.affine)
    return out


def assert_same_arrays(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key][0] == b[key][0], key
        assert a[key][1].tobytes() == b[key][1].tobytes(), key
        assert np.array_equal(a[key][2], b[key][2]), key


# --------------------------------------------------------------------------- building blocks


def test_case_rng_depends_only_on_its_key():
    draw = lambda *key: synthetic.synthetic_rng(3, "isles", *key).integers(0, 2**62, 4)
    assert np.array_equal(draw(2), draw(2))
    assert not np.array_equal(draw(2), draw(3))
    assert not np.array_equal(draw(2), synthetic.synthetic_rng(3, "atlas", 2).integers(0, 2**62, 4))
    with pytest.raises(ValueError, match="seed"):
        synthetic.synthetic_rng(-1, "isles", 0)
    with pytest.raises(ValueError, match="dataset"):
        synthetic.synthetic_rng(0, "mnist", 0)


def test_smooth_field_is_unit_variance_and_smooth():
    fields = np.stack([phantom.smooth_field(np.random.default_rng(i), (7, 6, 5), 3) for i in range(400)])
    assert fields.shape == (400, 7, 6, 5) and fields.dtype == np.float32
    per_voxel_sd = fields.std(axis=0)
    assert 0.85 < per_voxel_sd.min() and per_voxel_sd.max() < 1.15
    assert np.abs(fields.mean(axis=0)).max() < 0.2
    big = phantom.smooth_field(np.random.default_rng(0), (64, 64, 64), 4)
    assert np.abs(np.diff(big, axis=0)).mean() < 0.15  # neighbours nearly equal: smooth, not white noise


def test_oblique_affine_hand_computed():
    plain = phantom.oblique_affine((5, 7, 9), (2.0, 3.0, 4.0), centre_mm=(10.0, 20.0, 30.0))
    expected = np.array([[2, 0, 0, 6], [0, 3, 0, 11], [0, 0, 4, 14], [0, 0, 0, 1]], dtype=float)
    np.testing.assert_allclose(plain, expected)
    flipped = phantom.oblique_affine((5, 7, 9), (2.0, 3.0, 4.0), centre_mm=(10.0, 20.0, 30.0), axis_signs=(-1, 1, 1))
    np.testing.assert_allclose(flipped[:3, 0], [-2, 0, 0])
    np.testing.assert_allclose(flipped[:3, 3], [14, 11, 14])
    turned = phantom.oblique_affine((5, 7, 9), (2.0, 3.0, 4.0), angles_deg=(0, 0, 90))
    np.testing.assert_allclose(turned[:3, 0], [0, 2, 0], atol=1e-12)  # voxel axis 0 now runs along world y
    np.testing.assert_allclose(turned @ [2, 3, 4, 1], [0, 0, 0, 1], atol=1e-12)  # centre voxel -> centre_mm
    with pytest.raises(ValueError, match="spacing_mm"):
        phantom.oblique_affine((5, 7, 9), (2.0, 0.0, 4.0))


def test_brain_phantom_has_nested_tissues():
    labels = phantom.brain_phantom(np.random.default_rng(0), (40, 48, 36), (0.36, 0.38, 0.34))
    assert labels.dtype == np.uint8 and labels.shape == (40, 48, 36)
    present = set(np.unique(labels).tolist())
    assert {Tissue.BACKGROUND, Tissue.SCALP, Tissue.SKULL, Tissue.CSF, Tissue.GM, Tissue.WM} <= present
    assert labels[0, 0, 0] == Tissue.BACKGROUND
    assert labels[20, 24, 12] == Tissue.WM  # below the ventricles: deep white matter
    brain = labels >= Tissue.CSF
    assert 0.1 < brain.mean() < 0.35
    grown = ndimage.binary_dilation(brain, iterations=2)
    assert not np.isin(labels[brain], [Tissue.SKULL, Tissue.SCALP]).any()
    assert (labels[grown & ~brain] != Tissue.WM).all()  # white matter never touches the skull


def test_lesion_mask_stays_inside_and_varies_in_size():
    allowed = phantom.brain_phantom(np.random.default_rng(1), (40, 40, 40), (0.36, 0.36, 0.36))
    allowed = (allowed == Tissue.GM) | (allowed == Tissue.WM)
    assert not phantom.lesion_mask(np.random.default_rng(0), allowed, 0).any()
    sizes = []
    for i in range(40):
        lesion = phantom.lesion_mask(np.random.default_rng(i), allowed, 1)
        assert lesion.dtype == bool and lesion.any() and not (lesion & ~allowed).any()
        sizes.append(int(lesion.sum()))
    assert min(sizes) < 30 and max(sizes) > 20 * min(sizes)
    # a tiny size fraction: the semi-axes are min_radius voxels, the surfaces warped by at most x0.3-1.5
    small, bigger = ([phantom.lesion_mask(np.random.default_rng(i), allowed, 1, (0.01, 0.01), min_radius=r).sum() for i in range(10)] for r in (1.0, 3.5))
    assert max(small) < 4 / 3 * np.pi * 2.5**3 < 0.5 * 4 / 3 * np.pi * 3.5**3 < np.median(bigger)
    multi = phantom.lesion_mask(np.random.default_rng(5), allowed, 4)
    assert ndimage.label(multi, np.ones((3, 3, 3)))[1] >= 2
    with pytest.raises(ValueError, match="n_lesions"):
        phantom.lesion_mask(np.random.default_rng(0), allowed, -1)
    with pytest.raises(ValueError, match="empty parenchyma"):
        phantom.lesion_mask(np.random.default_rng(0), np.zeros((9, 9, 9), bool), 1)


def test_render_maps_contrast_and_zeroes_missing_tissues():
    labels = np.full((20, 20, 20), Tissue.WM, dtype=np.uint8)
    labels[:5] = Tissue.SKULL
    labels[15:] = Tissue.STROKE
    contrast = {Tissue.WM: 1.0, Tissue.STROKE: 2.5}
    image = phantom.render(np.random.default_rng(0), labels, contrast, noise_sd=0.01, bias_sd=0.0)
    assert image.dtype == np.float32
    assert (image[:5] == 0).all()
    assert abs(image[5:15].mean() - 1.0) < 0.05 and abs(image[15:].mean() - 2.5) < 0.15


@pytest.mark.parametrize("call", [
    lambda root: synthetic.make_isles(root, 2, layout="C"),
    lambda root: synthetic.make_isles(root, 0),
    lambda root: synthetic.make_isles(root, 2, shape=(4, 40, 40)),
    lambda root: synthetic.make_atlas(root, 2, empty_every=-1),
    lambda root: synthetic.make_uoa(root, 2, shape=(30, 30)),
    lambda root: synthetic.make_brats(root, 1, second_visit_every=-2),
])
def test_bad_arguments_raise_value_error(tmp_path, call):
    with pytest.raises(ValueError):
        call(tmp_path)
    assert not list(tmp_path.rglob("*.nii.gz"))


# --------------------------------------------------------------------------- ISLES 2022


@pytest.mark.parametrize("layout", ["A", "B"])
def test_isles_files_follow_the_layout_exactly(request, layout):
    root = request.getfixturevalue(f"synthetic_isles_{layout.lower()}")
    expected = {p for case_id in ISLES_IDS for p in isles_paths(root, case_id, layout).values()}
    assert set(root.rglob("*.nii.gz")) == expected


@pytest.mark.parametrize("layout", ["A", "B"])
def test_isles_dwi_adc_mask_share_an_oblique_anisotropic_grid(request, layout):
    root = request.getfixturevalue(f"synthetic_isles_{layout.lower()}")
    shapes = set()
    for case_id in ISLES_IDS:
        vols = {name: load_nifti(path) for name, path in isles_paths(root, case_id, layout).items()}
        dwi = vols["dwi"]
        for name in ("adc", "msk"):
            assert vols[name].data.shape == dwi.data.shape
            assert affines_match(vols[name].affine, dwi.affine)
        assert vols["flair"].data.shape != dwi.data.shape
        assert not affines_match(vols["flair"].affine, dwi.affine)
        rotation = dwi.affine[:3, :3]
        assert np.abs(rotation - np.diag(np.diag(rotation))).max() > 0.05  # oblique
        x, y, z = dwi.zooms
        assert x == pytest.approx(y) and z > 1.05 * x and 1.5 < x < 2.5  # about 2 x 2 x 2.4-5 mm
        assert np.linalg.det(rotation) < 0  # x flipped (LAS) like the scanner images
        shapes.add(dwi.data.shape)
    assert len(shapes) > 1


@pytest.mark.parametrize("layout", ["A", "B"])
def test_isles_masks_are_uint16_binary_and_empty_every_applies(request, layout):
    root = request.getfixturevalue(f"synthetic_isles_{layout.lower()}")
    empty = []
    for case_id in ISLES_IDS:
        img = nib.load(str(isles_paths(root, case_id, layout)["msk"]))
        assert img.get_data_dtype() == np.uint16
        mask = np.asanyarray(img.dataobj)
        assert set(np.unique(mask).tolist()) <= {0, 1}
        if not mask.any():
            empty.append(case_id)
    assert empty == (["sub-strokecase0006"] if layout == "A" else [])


def _isles_triplets(root: Path) -> list[tuple[Path, Path, Path]]:
    """(dwi, adc, mask) of every case, found by name in either layout (also the real sample)."""
    triplets = []
    for dwi in sorted(root.rglob("*_dwi.nii.gz")):
        stem = dwi.name[: -len("_dwi.nii.gz")]
        case_id = stem.split("_")[0]
        mask = root / "derivatives" / case_id / "ses-0001" / f"{stem}_msk.nii.gz"
        triplets.append((dwi, dwi.with_name(f"{stem}_adc.nii.gz"), mask))
    return triplets


@pytest.mark.parametrize("dataset", ["isles_sample_dir", "synthetic_isles_a", "synthetic_isles_b"])
def test_isles_brain_support_and_lesion_contrast_like_the_real_case(request, dataset):
    """The same checks pass on the real case, so they describe real ISLES data."""
    triplets = _isles_triplets(request.getfixturevalue(dataset))
    assert triplets
    for dwi_path, adc_path, mask_path in triplets:
        dwi, adc, mask = read(dwi_path), read(adc_path), read(mask_path) > 0
        brain = dwi != 0
        assert np.array_equal(brain, adc != 0)  # skull-stripped: both zero outside the same brain
        assert 0.1 < brain.mean() < 0.4
        assert not brain[0, 0, 0] and not brain[-1, -1, -1]
        if mask.any():
            assert brain[mask].all()
            tissue = brain & ~mask
            assert dwi[mask].mean() > 1.5 * dwi[tissue].mean()
            assert adc[mask].mean() < 0.7 * adc[tissue].mean()


def test_isles_adc_scale_varies_between_cases(synthetic_isles_a, synthetic_isles_b):
    maxima = [read(adc).max() for root in (synthetic_isles_a, synthetic_isles_b) for _, adc, _ in _isles_triplets(root)]
    assert any(m < 10 for m in maxima) and any(100 < m <= 4095 for m in maxima)


def test_isles_case_does_not_depend_on_n_cases(tmp_path, synthetic_isles_a):
    synthetic.make_isles(tmp_path, 1, layout="A", seed=0, shape=(40, 40, 24), empty_every=6)
    for path in isles_paths(tmp_path, "sub-strokecase0001", "A").values():
        alone = nib.load(str(path))
        in_six = nib.load(str(synthetic_isles_a / path.relative_to(tmp_path)))
        assert np.array_equal(np.asanyarray(alone.dataobj), np.asanyarray(in_six.dataobj))
        assert np.array_equal(alone.affine, in_six.affine)


def test_same_seed_gives_identical_arrays_and_another_seed_differs(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        synthetic.make_isles(tmp_path / name, 2, layout="B", seed=seed, shape=(24, 24, 16), empty_every=2)
    first, again, other = (arrays_of(tmp_path / name) for name in "abc")
    assert_same_arrays(first, again)
    dwi = "rawdata/sub-strokecase0001/ses-0001/sub-strokecase0001_ses-0001_dwi.nii.gz"
    assert first[dwi][1].shape != other[dwi][1].shape or not np.array_equal(first[dwi][1], other[dwi][1])


# --------------------------------------------------------------------------- ATLAS and UOA


def test_atlas_layout_geometry_and_empty_case(synthetic_atlas):
    expected = set()
    for cohort, subject in ATLAS_SUBJECTS:
        stem = atlas_stem(synthetic_atlas, cohort, subject)
        expected |= {Path(f"{stem}_T1w.nii.gz"), Path(f"{stem}_label-L_desc-T1lesion_mask.nii.gz")}
    assert set(synthetic_atlas.rglob("*.nii.gz")) == expected
    assert len(list(synthetic_atlas.glob("**/*_T1w.nii.gz"))) == 6
    assert len(list(synthetic_atlas.glob("**/*_label-L_desc-T1lesion_mask.nii.gz"))) == 6
    empty = []
    for cohort, subject in ATLAS_SUBJECTS:
        stem = atlas_stem(synthetic_atlas, cohort, subject)
        t1 = load_nifti(f"{stem}_T1w.nii.gz")
        mask_img = nib.load(f"{stem}_label-L_desc-T1lesion_mask.nii.gz")
        mask = np.asanyarray(mask_img.dataobj)
        assert t1.data.shape == mask.shape == (48, 56, 44) and t1.zooms == (1.0, 1.0, 1.0)
        assert affines_match(t1.affine, mask_img.affine)
        np.testing.assert_allclose(t1.affine[:3, :3], np.eye(3))
        assert set(np.unique(mask).tolist()) <= {0, 1}
        assert t1.data[0, 0, 0] == 0 and t1.data[24, 28, 22] > 0
        if mask.any():
            _assert_darker_than_surroundings(t1.data, mask > 0)
        else:
            empty.append(subject)
    assert empty == ["sub-r002s002"]


def _assert_darker_than_surroundings(t1: np.ndarray, lesion: np.ndarray) -> None:
    ring = ndimage.binary_dilation(lesion, iterations=2) & ~lesion & (t1 != 0)
    assert t1[lesion].mean() < 0.7 * t1[ring].mean()
    core = ndimage.binary_erosion(lesion, iterations=2)  # chronic lesion: a CSF-dark core in a gliotic rim
    if core.any():
        assert t1[core].mean() < 0.85 * t1[lesion & ~core].mean() < 0.85 * t1[ring].mean()


def test_atlas_case_does_not_depend_on_n_cases(tmp_path):
    synthetic.make_atlas(tmp_path / "one", 1, seed=3, shape=(24, 28, 22))
    synthetic.make_atlas(tmp_path / "five", 5, seed=3, shape=(24, 28, 22))
    one, five = arrays_of(tmp_path / "one"), arrays_of(tmp_path / "five")
    assert len(five) == 10
    assert_same_arrays(one, {key: five[key] for key in one})


def test_uoa_layout_spacing_option_and_lesions(synthetic_uoa):
    images = sorted(synthetic_uoa.glob("**/*_T1_FNIRT_MNI.nii.gz"))
    lesions = sorted(synthetic_uoa.glob("**/*_lesion.nii.gz"))
    assert [p.name.split("_T1_")[0] for p in images] == ["UOA001", "UOA002", "UOA003", "UOA004"]
    for image_path, lesion_path in zip(images, lesions):
        case_id = image_path.name.split("_T1_")[0]
        assert image_path == synthetic_uoa / case_id / f"{case_id}_T1_FNIRT_MNI.nii.gz"
        assert lesion_path == synthetic_uoa / case_id / f"{case_id}_lesion.nii.gz"
        t1, lesion = load_nifti(image_path), load_nifti(lesion_path)
        assert affines_match(t1.affine, lesion.affine) and t1.data.shape == lesion.data.shape
        if case_id == "UOA004":
            assert t1.zooms == (1.25, 1.5, 2.0) and t1.data.shape == (37, 36, 23)
        else:
            assert t1.zooms == (1.0, 1.0, 1.0) and t1.data.shape == (46, 54, 46)
        mask = lesion.data > 0
        assert set(np.unique(lesion.data).tolist()) == {0.0, 1.0}
        assert (t1.data[mask] != 0).all()  # skull-stripped image, lesion inside the brain
        brain = (t1.data != 0) & ~mask
        assert t1.data[mask].mean() < 0.7 * t1.data[brain].mean()


# --------------------------------------------------------------------------- BraTS


def test_brats_layout_labels_and_visits(synthetic_brats):
    assert sorted(p.name for p in synthetic_brats.iterdir()) == BRATS_IDS
    union = set()
    for case_id in BRATS_IDS:
        names = {p.name for p in (synthetic_brats / case_id).iterdir()}
        assert names == {f"{case_id}-{s}.nii.gz" for s in ("t1n", "t1c", "t2w", "t2f", "seg")}
        seg_img = nib.load(str(synthetic_brats / case_id / f"{case_id}-seg.nii.gz"))
        assert seg_img.get_data_dtype() == np.uint8
        seg = np.asanyarray(seg_img.dataobj)
        labels = set(np.unique(seg).tolist())
        assert labels <= {0, 1, 2, 3, 4} and len(labels - {0}) >= 3
        union |= labels
        for suffix in ("t1n", "t1c", "t2w", "t2f"):
            image = load_nifti(synthetic_brats / case_id / f"{case_id}-{suffix}.nii.gz")
            assert image.data.shape == seg.shape == (48, 48, 32)
            np.testing.assert_allclose(image.affine, BRATS_AFFINE, atol=1e-9)
        flair = read(synthetic_brats / case_id / f"{case_id}-t2f.nii.gz")
        tumour = np.isin(seg, (1, 2, 3))
        assert flair[tumour].mean() > 1.5 * flair[(flair != 0) & (seg == 0)].mean()
        assert (flair[seg > 0] != 0).all()  # tumour inside the skull-stripped brain
    assert union == {0, 1, 2, 3, 4}


def test_brats_second_visit_shares_anatomy_but_not_tumour(synthetic_brats):
    first = synthetic_brats / "BraTS-GLI-00007-100" / "BraTS-GLI-00007-100-"
    second = synthetic_brats / "BraTS-GLI-00007-101" / "BraTS-GLI-00007-101-"
    assert np.array_equal(read(Path(f"{first}t1n.nii.gz")) != 0, read(Path(f"{second}t1n.nii.gz")) != 0)
    seg1, seg2 = read(Path(f"{first}seg.nii.gz")), read(Path(f"{second}seg.nii.gz"))
    assert not np.array_equal(seg1, seg2)
    assert (seg2 == 4).any() and (seg2 > 0).sum() < (seg1 > 0).sum()  # resected, shrunk


def test_brats_patient_does_not_depend_on_n_patients(tmp_path, synthetic_brats):
    synthetic.make_brats(tmp_path, 1, seed=0, shape=(48, 48, 32), second_visit_every=2)
    alone = arrays_of(tmp_path)
    assert {Path(k).parts[0] for k in alone} == {"BraTS-GLI-00005-100"}
    assert_same_arrays(alone, {k: v for k, v in arrays_of(synthetic_brats).items() if k in alone})


# --------------------------------------------------------------------------- command line


def test_cli_writes_dataset_and_run_args(tmp_path, capsys):
    out = tmp_path / "isles"
    argv = ["--dataset", "isles", "--out", str(out), "--n-cases", "2", "--seed", "4",
            "--layout", "B", "--shape", "24", "24", "16", "--empty-every", "2"]
    assert synthetic.main(argv) == 0
    printed = capsys.readouterr().out
    assert "wrote 2 case(s), 8 NIfTI file(s)" in printed and "sub-strokecase0002" in printed
    for case_id in ("sub-strokecase0001", "sub-strokecase0002"):
        assert all(p.is_file() for p in isles_paths(out, case_id, "B").values())
    assert not read(isles_paths(out, "sub-strokecase0002", "B")["msk"]).any()
    assert json.loads((out / "run_args.json").read_text())["args"]["seed"] == 4


def test_cli_other_datasets_and_defaults(tmp_path, capsys):
    assert synthetic.main(["--dataset", "brats", "--out", str(tmp_path / "b"), "--n-cases", "1",
                           "--shape", "32", "32", "24", "--second-visit-every", "1"]) == 0
    visits = sorted(p.name for p in (tmp_path / "b").iterdir() if p.is_dir())
    assert visits == ["BraTS-GLI-00005-100", "BraTS-GLI-00005-101"]
    assert synthetic.main(["--dataset", "uoa", "--out", str(tmp_path / "u"), "--n-cases", "2",
                           "--shape", "30", "36", "30", "--spacing-every", "2"]) == 0
    assert load_nifti(tmp_path / "u" / "UOA002" / "UOA002_T1_FNIRT_MNI.nii.gz").zooms == (1.25, 1.5, 2.0)
    assert "uoa: wrote 2 case(s)" in capsys.readouterr().out


@pytest.mark.parametrize("extra", [
    ["--dataset", "atlas", "--layout", "A"],
    ["--dataset", "brats", "--empty-every", "2"],
    ["--dataset", "isles", "--spacing-every", "2"],
    ["--dataset", "cifar"],
])
def test_cli_rejects_options_that_do_not_apply(tmp_path, extra):
    with pytest.raises(SystemExit) as err:
        synthetic.main(extra + ["--out", str(tmp_path), "--n-cases", "1"])
    assert err.value.code == 2
