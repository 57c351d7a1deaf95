"""strokeseg.inference.inputs and predict.py on files named as hospitals name them: --modality
globs, BIDS entities, nnU-Net channels, generic names, duplicates, the wrong modality, and
models that read one input (issue 24, items 1, 3 and 4). Discovery reads no image, so most
tests lay out empty files; the end-to-end ones use the real ISLES sample case."""
from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import predict
from strokeseg.core.io import CaseError, read_json
from strokeseg.datasets.registry import dataset_spec
from strokeseg.inference.inputs import bids_cases, glob_cases, nnunet_cases, parse_modalities, role_problem, single_case_id
from strokeseg.inference.prediction import InputSpec, discover_cases
from test_predict import ATLAS_WINDOW, FOUNDATION_SETTINGS, ISLES_SHAPE, _run_dir

ISLES, ATLAS = dataset_spec("ISLES2022"), dataset_spec("ATLAS")
SAMPLE = "rawdata/sub-strokecase0009/ses-0001/sub-strokecase0009_ses-0001"


def _files(root: Path, *names: str) -> Path:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    return root


def _cases(found: dict) -> dict[str, dict[str, list[str]]]:
    """Found files as case id -> key -> names, for comparing with hand-written tables."""
    return {case_id: {key: sorted(p.name for p in paths) for key, paths in files.items()} for case_id, files in found.values()}


def _items(root: Path, keys: tuple[str, ...] = ("dwi", "adc"), modalities: tuple = ()) -> dict:
    cases, _ = discover_cases(InputSpec(root, input_keys=keys, modalities=modalities), ISLES)
    return cases


# --------------------------------------------------------------------------- item 1: any naming


def test_modality_globs_pair_a_flat_hospital_folder_ignoring_letter_case(tmp_path: Path) -> None:
    root = _files(tmp_path, "patient01_DWI.nii.gz", "patient01_ADC.nii.gz", "P002_dwi.nii.gz", "p002_adc.nii.gz", "notes.txt")
    globs = parse_modalities(["dwi=*_DWI.nii.gz", "ADC=*_adc.nii.gz"], ("dwi", "adc"))
    assert _cases(glob_cases(root, globs)) == {
        "patient01": {"dwi": ["patient01_DWI.nii.gz"], "adc": ["patient01_ADC.nii.gz"]},
        "P002": {"dwi": ["P002_dwi.nii.gz"], "adc": ["p002_adc.nii.gz"]},
    }
    items = _items(root, modalities=tuple(globs.items()))
    assert sorted(items) == ["P002", "patient01"] and items["P002"].source("adc") == root / "p002_adc.nii.gz" and not items["P002"].problem


@pytest.mark.parametrize("pattern", ["*/DWI.nii.gz", "**/DWI.nii.gz"])
def test_generic_file_names_take_the_patient_folder_as_case_id(pattern: str, tmp_path: Path) -> None:
    root = _files(tmp_path, "patient01/DWI.nii.gz", "patient01/ADC.nii.gz", "patient02/DWI.nii.gz")
    found = glob_cases(root, {"dwi": pattern, "adc": pattern.replace("DWI", "ADC")})
    assert _cases(found) == {"patient01": {"dwi": ["DWI.nii.gz"], "adc": ["ADC.nii.gz"]}, "patient02": {"dwi": ["DWI.nii.gz"]}}
    assert single_case_id(root / "patient02" / "DWI.nii.gz", "dwi", ISLES) == "patient02"


@pytest.mark.parametrize("name, key, spec, case_id", [
    ("sub-01_ses-2_dwi.nii.gz", "dwi", ISLES, "sub-01_ses-2"),  # as before: without _dwi
    ("P001_DWI.nii", "dwi", ISLES, "P001"),
    ("case_dwi.nii.gz", "dwi", ISLES, "case"),
    ("scan_dwi.nii.gz", "dwi", ISLES, "patient05"),  # "scan" says nothing about whose it is
    ("dwi.nii.gz", "dwi", ISLES, "patient05"),  # generic: the folder
    ("T1.nii.gz", "image", ATLAS, "patient05"),
    ("P001_T1_FNIRT_MNI.nii.gz", "image", ATLAS, "P001"),  # the T1w rule, as before
])
def test_single_file_case_id(name: str, key: str, spec, case_id: str, tmp_path: Path) -> None:
    assert single_case_id(tmp_path / "patient05" / name, key, spec) == case_id


def test_bids_with_and_without_sessions_and_acquisition_entities(tmp_path: Path) -> None:
    root = _files(
        tmp_path,
        "sub-01/dwi/sub-01_acq-b1000_dwi.nii.gz", "sub-01/dwi/sub-01_acq-b1000_ADC.nii.gz",  # no session; suffix in upper case
        "sub-01/dwi/sub-01_run-2_DWI.nii.gz", "sub-01/anat/sub-01_FLAIR.nii.gz",
        "sub-02/ses-1/dwi/sub-02_ses-1_rec-trace_dwi.nii.gz", "sub-02/ses-2/dwi/sub-02_ses-2_dwi.nii.gz",
        "derivatives/sub-01/sub-01_acq-b1000_msk.nii.gz", "derivatives/sub-01/sub-01_acq-b1000_dwi.nii.gz",
        "derivatives/out/sub-01/dwi/sub-01_run-2_desc-lesion_mask.nii.gz",  # predict.py's output, not a reference
    )
    found, standard = bids_cases(root, ISLES, ("dwi", "adc"))
    assert _cases(found) == {
        "sub-01_acq-b1000": {"dwi": ["sub-01_acq-b1000_dwi.nii.gz"], "adc": ["sub-01_acq-b1000_ADC.nii.gz"], "mask": ["sub-01_acq-b1000_msk.nii.gz"]},
        "sub-01_run-2": {"dwi": ["sub-01_run-2_DWI.nii.gz"]},
        "sub-02_ses-1_rec-trace": {"dwi": ["sub-02_ses-1_rec-trace_dwi.nii.gz"]},  # two sessions: kept in the id
        "sub-02_ses-2": {"dwi": ["sub-02_ses-2_dwi.nii.gz"]},
    }
    assert not standard
    cases, bids = discover_cases(InputSpec(root, input_keys=("dwi", "adc")), ISLES)
    assert bids and cases["sub-01_acq-b1000"].meta["out_stem"] == Path("sub-01/dwi/sub-01_acq-b1000")


def test_isles_release_layouts_are_found_as_the_preprocessing_stage_finds_them(synthetic_isles_a: Path) -> None:
    found, standard = bids_cases(synthetic_isles_a, ISLES, ("dwi", "adc"))
    assert standard and len(found) == 6
    items = _items(synthetic_isles_a)
    assert sorted(items) == [f"sub-strokecase{k:04d}" for k in range(1, 7)] and items["sub-strokecase0001"].meta["root"] == synthetic_isles_a


def test_nnunet_channels_in_contract_order(tmp_path: Path) -> None:
    root = _files(tmp_path, "imagesTs/case7_0000.nii.gz", "imagesTs/case7_0001.nii.gz", "imagesTs/case7_0002.nii.gz", "labelsTs/case7.nii.gz")
    assert _cases(nnunet_cases(root, ("dwi", "adc"))) == {"case7": {"dwi": ["case7_0000.nii.gz"], "adc": ["case7_0001.nii.gz"], "mask": ["case7.nii.gz"]}}
    items = _items(root, keys=("dwi",))  # a DWI-only model reads channel 0 only
    assert items["case7"].source("dwi") == root / "imagesTs" / "case7_0000.nii.gz" and items["case7"].source("adc") is None


def test_two_inputs_with_one_case_id_are_refused_naming_both(tmp_path: Path) -> None:
    root = _files(tmp_path, "a/patient01/DWI.nii.gz", "b/patient01/DWI.nii.gz", "a/patient02/DWI.nii.gz")
    items = _items(root, modalities=(("dwi", "**/DWI.nii.gz"),))
    problem = items["patient01"].problem
    assert "2 dwi files give this one case id" in problem and str(root / "a/patient01/DWI.nii.gz") in problem and str(root / "b/patient01/DWI.nii.gz") in problem
    assert not items["patient02"].problem


def test_nothing_found_lists_what_was_looked_for_and_the_first_files(tmp_path: Path) -> None:
    root = _files(tmp_path, *[f"scan{k}.dcm" for k in range(7)])
    with pytest.raises(CaseError) as err:
        _items(root)
    message = str(err.value)
    assert message.startswith(f"{root}: no input for this ISLES2022 model (dwi, adc) found; looked for BIDS")
    assert "*_dwi, *_adc" in message and "nnU-Net CASE_0000 (dwi), CASE_0001 (adc)" in message and "--modality KEY=GLOB" in message
    assert "files there: scan0.dcm, scan1.dcm, scan2.dcm, scan3.dcm, scan4.dcm ... (7 files)" in message
    with pytest.raises(CaseError, match=r"looked for --modality dwi=\*_DWI.nii.gz; files there: scan0.dcm"):
        _items(root, modalities=(("dwi", "*_DWI.nii.gz"),))


def test_modality_keys_are_the_models(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="this model reads dwi .*not 'adc'"):
        parse_modalities(["adc=*_ADC.nii.gz"], ("dwi",))
    with pytest.raises(ValueError, match="expected KEY=GLOB"):
        parse_modalities(["*_DWI.nii.gz"], ("dwi", "adc"))
    with pytest.raises(ValueError, match="given twice"):
        parse_modalities(["dwi=a*", "dwi=b*"], ("dwi", "adc"))


# --------------------------------------------------------------------------- item 3: another modality


@pytest.mark.parametrize("name, key, spec, named", [
    ("sub-01_dwi.nii.gz", "image", ATLAS, "'dwi' (dwi of ISLES2022)"),  # a T1w model on a DWI
    ("sub-01_T1w.nii.gz", "dwi", ISLES, "'t1w' (image of ATLAS, UOA_Private)"),
    ("P001_ADC.nii.gz", "dwi", ISLES, "'adc' (adc of ISLES2022)"),
    ("P001_FLAIR.nii.gz", "adc", ISLES, "'flair' (flair)"),
])
def test_a_file_named_as_another_modality_is_refused(name: str, key: str, spec, named: str) -> None:
    assert f"{name}: its name says {named}, but this {spec.name} model reads it as {key}" in role_problem(Path(name), key, spec)


@pytest.mark.parametrize("name, key, spec", [("sub-01_dwi.nii.gz", "dwi", ISLES), ("DWI.nii.gz", "dwi", ISLES), ("P001_T1_FNIRT_MNI.nii.gz", "image", ATLAS), ("x_0000.nii.gz", "dwi", ISLES)])
def test_names_that_fit_or_say_nothing_pass(name: str, key: str, spec) -> None:
    assert role_problem(Path(name), key, spec) == ""


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    settings = {"target_shape": [ISLES_SHAPE] * 3, "margin": 4}
    root = tmp_path_factory.mktemp("input_runs")
    return {"both": _run_dir(root / "both", "ISLES2022", ["dwi", "adc"], ISLES_SHAPE, settings, folds=(0,)),
            "dwi_only": _run_dir(root / "dwi_only", "ISLES2022", ["dwi"], ISLES_SHAPE, settings, folds=(0,))}


def _mask(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def test_hospital_folder_gives_the_masks_of_the_release_layout(isles_sample_dir: Path, runs: dict[str, Path], tmp_path: Path) -> None:
    hospital = tmp_path / "hospital"
    for name, kind in (("Patient_01/DWI.nii.gz", "dwi"), ("Patient_01/ADC.nii.gz", "adc")):
        (hospital / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(isles_sample_dir / f"{SAMPLE}_{kind}.nii.gz", hospital / name)
    common = ["--run", str(runs["both"]), "--precision", "fp32"]
    assert predict.main(["--input", str(isles_sample_dir), "--output-dir", str(tmp_path / "release"), *common]) == 0
    argv = ["--input", str(hospital), "--modality", "dwi=*/dwi.nii.gz", "--modality", "adc=*/adc.nii.gz", "--output-dir", str(tmp_path / "out"), *common]
    assert predict.main(argv) == 0
    released = tmp_path / "release" / "sub-strokecase0009" / "ses-0001" / "sub-strokecase0009_ses-0001_desc-lesion_mask.nii.gz"
    assert np.array_equal(_mask(tmp_path / "out" / "Patient_01_desc-lesion_mask.nii.gz"), _mask(released))


def test_dwi_only_model_takes_the_dwi_alone(isles_sample_dir: Path, runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dwi = isles_sample_dir / f"{SAMPLE}_dwi.nii.gz"
    common = ["--run", str(runs["dwi_only"]), "--precision", "fp32"]
    assert predict.main(["--dwi", str(dwi), "--case-id", "patient9", "--output-dir", str(tmp_path / "one"), *common]) == 0
    sidecar = read_json(tmp_path / "one" / "patient9_desc-lesion_mask.json")
    assert sidecar["Sources"] == [str(dwi)] and set(sidecar["SourceDigests"]) == {"dwi"}  # the ADC is neither read nor required
    assert predict.main(["--input", str(isles_sample_dir), "--output-dir", str(tmp_path / "folder"), *common]) == 0
    (folder_mask,) = (tmp_path / "folder").rglob("*_desc-lesion_mask.nii.gz")
    assert np.array_equal(_mask(folder_mask), _mask(tmp_path / "one" / "patient9_desc-lesion_mask.nii.gz"))
    adc = isles_sample_dir / f"{SAMPLE}_adc.nii.gz"
    capsys.readouterr()
    assert predict.main(["--dwi", str(adc), "--output-dir", str(tmp_path / "wrong"), *common]) == 1  # named as ADC
    assert "its name says 'adc'" in read_json(tmp_path / "wrong" / "prediction_summary.json")["failed"][0]["reason"]


def test_t1w_model_on_a_dwi_is_refused(isles_sample_dir: Path, tmp_path: Path) -> None:
    run = _run_dir(tmp_path / "atlas_run", "ATLAS", ["image"], ATLAS_WINDOW, FOUNDATION_SETTINGS, folds=(0,))
    out = tmp_path / "out"
    assert predict.main(["--image", str(isles_sample_dir / f"{SAMPLE}_dwi.nii.gz"), "--run", str(run), "--output-dir", str(out)]) == 1
    (failed,) = read_json(out / "prediction_summary.json")["failed"]
    assert "its name says 'dwi' (dwi of ISLES2022), but this ATLAS model reads it as image" in failed["reason"]
