"""strokeseg.inference.diffusion and predict.py on DWI as scanners export it: 4-D series with
b-values (trace at the contract's b), computed ADC, ADC units, swapped or mislabelled inputs
(issue 24, items 2 and 3). Hand-computed values on tiny arrays; the real ISLES sample case
(ADC in 10^-3 mm^2/s) end to end."""
from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import predict
from strokeseg.datasets.contract import contract_from_checkpoint
from strokeseg.core.case import Image
from strokeseg.core.io import CaseError, read_json, save_nifti, write_json
from strokeseg.datasets.registry import dataset_spec
from strokeseg.inference.diffusion import (
    adc_unit, diffusion_case, check_dwi_adc, compute_adc, read_b_values, read_diffusion_case, select_dwi,
)
from test_predict import ISLES_SHAPE, _contract, _run_dir

SAMPLE = "rawdata/sub-strokecase0009/ses-0001/sub-strokecase0009_ses-0001"
ISLES = dict(dataset_spec("ISLES2022").acquisition)  # b=1000 s/mm², ADC in 1e-3 mm²/s


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One-fold untrained ISLES models: DWI+ADC and DWI only (the paper's dwi_only strategy)."""
    settings = {"target_shape": [ISLES_SHAPE] * 3, "margin": 4}
    root = tmp_path_factory.mktemp("diffusion_runs")
    return {"both": _run_dir(root / "both", "ISLES2022", ["dwi", "adc"], ISLES_SHAPE, settings, folds=(0,)),
            "dwi_only": _run_dir(root / "dwi_only", "ISLES2022", ["dwi"], ISLES_SHAPE, settings, folds=(0,))}


@pytest.fixture(scope="module")
def sample(isles_sample_dir: Path) -> dict[str, Image]:
    from strokeseg.core.io import load_image

    return {kind: load_image(isles_sample_dir / f"{SAMPLE}_{kind}.nii.gz") for kind in ("dwi", "adc")}


def _mask(folder: Path) -> np.ndarray:
    (path,) = folder.rglob("*_desc-lesion_mask.nii.gz")
    return np.asarray(nib.load(str(path)).dataobj)


def _sidecar(folder: Path) -> dict:
    (path,) = folder.rglob("*_desc-lesion_mask.json")
    return read_json(path)


# --------------------------------------------------------------------------- b-values and volumes


def test_b_values_from_fsl_bval_or_bids_json(tmp_path: Path) -> None:
    dwi = tmp_path / "p1_dwi.nii.gz"
    assert read_b_values(dwi) is None
    write_json(tmp_path / "p1_dwi.json", {"DiffusionBValue": 800.0})
    assert read_b_values(dwi).tolist() == [800.0]
    write_json(tmp_path / "p1_dwi.json", {"bval": [0, 1000, 1000]})
    assert read_b_values(dwi).tolist() == [0.0, 1000.0, 1000.0]
    (tmp_path / "p1_dwi.bval").write_text("0 995 1005\n")  # FSL file first
    assert read_b_values(dwi).tolist() == [0.0, 995.0, 1005.0]
    (tmp_path / "p1_dwi.bval").write_text("0 b1000\n")
    with pytest.raises(CaseError, match="p1_dwi.bval: unreadable b-values"):
        read_b_values(dwi)


def test_trace_at_the_training_b_value_is_the_geometric_mean_of_its_directions() -> None:
    rng = np.random.default_rng(0)
    series = rng.uniform(100, 900, size=(3, 4, 5, 6)).astype(np.float32)
    series[0, 0, 0, 2] = -6.0  # background noise: the arithmetic mean there
    b = np.array([0, 1000, 1000, 995, 5, 2000], dtype=np.float64)
    dwi, b0, b_used, record = select_dwi(series, b, 1000.0, None, Path("x_dwi.nii.gz"))
    expected = np.cbrt(series[..., 1].astype(np.float64) * series[..., 2] * series[..., 3])
    expected[0, 0, 0] = (series[0, 0, 0, 1] - 6.0 + series[0, 0, 0, 3]) / 3
    assert np.allclose(dwi, expected, rtol=1e-6) and dwi.dtype == np.float32
    assert np.allclose(b0, (series[..., 0] + series[..., 4]) / 2, rtol=1e-6)
    assert b_used == pytest.approx(998.333, abs=1e-3) and record["DwiVolumes"] == [1, 2, 3]
    picked, _, b_picked, record = select_dwi(series, b, 1000.0, 5, Path("x_dwi.nii.gz"))
    assert np.array_equal(picked, series[..., 5]) and b_picked == 2000.0 and record["DwiVolumes"] == [5]
    with pytest.raises(CaseError, match=r"x_dwi.nii.gz: 4-D DWI \(6 volumes\) without b-values .*--dwi-volume K \(0 to 5\)"):
        select_dwi(series, None, 1000.0, None, Path("x_dwi.nii.gz"))
    with pytest.raises(CaseError, match=r"no volume near b=1000 .*\[0.0, 2000.0\].*--dwi-volume"):
        select_dwi(series[..., [0, 5]], np.array([0.0, 2000.0]), 1000.0, None, Path("x_dwi.nii.gz"))
    with pytest.raises(CaseError, match="6 volumes but 2 b-values"):
        select_dwi(series, np.array([0.0, 1000.0]), 1000.0, None, Path("x_dwi.nii.gz"))


def test_computed_adc_is_ln_s0_over_sb_over_b_in_the_training_unit() -> None:
    adc_mm2_s = np.array([[[0.8e-3, 3.0e-3], [0.0, 0.5e-3]]])
    s0 = np.full(adc_mm2_s.shape, 1200.0)
    sb = s0 * np.exp(-1000.0 * adc_mm2_s)
    s0[0, 1, 0] = 0.0  # background
    sb[0, 1, 1] = 1300.0  # noise above S0: no negative ADC
    computed = compute_adc(s0, sb, 1000.0, 1e-3)
    assert computed.dtype == np.float32
    assert np.allclose(computed, [[[0.8, 3.0], [0.0, 0.0]]], atol=1e-6)
    assert np.allclose(compute_adc(s0, sb, 1000.0, 1e-6)[0, 0], [800.0, 3000.0], rtol=1e-6)


# --------------------------------------------------------------------------- units and swaps


@pytest.mark.parametrize("median, unit", [(0.85, 1e-3), (850.0, 1e-6), (0.00085, 1.0), (2.9, 1e-3), (300.0, 1e-6)])
def test_adc_unit_from_the_brain_median(median: float, unit: float) -> None:
    assert adc_unit(median, Path("a.nii.gz")) == unit


def test_adc_median_of_no_unit_is_refused() -> None:
    with pytest.raises(CaseError, match=r"a.nii.gz: ADC brain median 40 fits no unit"):
        adc_unit(40.0, Path("a.nii.gz"))


def test_real_case_units_swaps_and_mislabelled_dwi(sample: dict[str, Image]) -> None:
    dwi, adc = sample["dwi"], sample["adc"]
    same, record = check_dwi_adc(dwi, adc, 1e-3)
    assert same is adc and record == {"AdcUnit": "10⁻³ mm²/s"}  # ISLES 2022 stores 10^-3 mm²/s
    scaled = Image(adc.data * 1000, adc.affine, adc.zooms, Path("scaled_adc.nii.gz"))
    converted, record = check_dwi_adc(dwi, scaled, 1e-3)
    assert record == {"AdcUnit": "10⁻⁶ mm²/s", "AdcConvertedTo": "10⁻³ mm²/s"}
    assert np.allclose(converted.data, adc.data, rtol=1e-6)
    with pytest.raises(CaseError) as err:
        check_dwi_adc(adc, dwi, 1e-3)  # passed the other way round
    assert f"{adc.path} (given as DWI) and {dwi.path} (given as ADC) look swapped" in str(err.value)
    with pytest.raises(CaseError, match="looks like an ADC map, not a DWI"):
        check_dwi_adc(adc, None, 1e-3)  # a DWI-only model given the ADC map
    assert check_dwi_adc(dwi, None, 1e-3) == (None, {})


def test_four_d_dwi_without_adc_gives_the_computed_adc(sample: dict[str, Image], tmp_path: Path) -> None:
    """S0 = Sb exp(b ADC): the ADC computed from the 4-D series is the sample's own ADC map."""
    dwi, adc = sample["dwi"], sample["adc"]
    s0 = dwi.data * np.exp(1000.0 * adc.data * 1e-3)
    path = tmp_path / "p9_dwi.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([s0, dwi.data, dwi.data], axis=3).astype(np.float32), dwi.affine), str(path))
    (tmp_path / "p9_dwi.bval").write_text("0 1000 1000")
    volumes, record = read_diffusion_case(diffusion_case("p9", path, None, None), True, ISLES)
    assert np.allclose(volumes.image("dwi").data, dwi.data, rtol=1e-5)
    inside = (dwi.data > 0) & (adc.data >= 0)  # computed ADC is never negative
    assert np.allclose(volumes.image("adc").data[inside], adc.data[inside], atol=1e-4)
    assert record["DwiVolumes"] == [1, 2] and record["DwiBValue"] == 1000.0 and "computed ln(S0/Sb)/b" in record["AdcSource"]
    no_b0 = diffusion_case("p9", path, None, None, dwi_volume=1)
    (tmp_path / "p9_dwi.bval").unlink()
    with pytest.raises(CaseError, match="no ADC map for p9 and no b=0 volume"):
        read_diffusion_case(no_b0, True, ISLES)
    volumes, record = read_diffusion_case(no_b0, False, ISLES)  # a DWI-only model needs no ADC
    assert "adc" not in volumes.images and record == {"DwiVolumes": [1], "DwiBValue": None}


def test_old_contract_takes_the_acquisition_facts_of_its_dataset_spec() -> None:
    stored = _contract("ISLES2022", ["dwi", "adc"], 16, {"target_shape": [16] * 3, "margin": 4}, 0)
    del stored["acquisition"]  # written before the b-value and ADC unit were recorded
    assert contract_from_checkpoint({"data_contract": stored}, "old.pth").acquisition == {"dwi_b_value": 1000.0, "adc_unit": 1e-3}


# --------------------------------------------------------------------------- predict.py end to end


def _single(folder: Path, dwi: Path, adc: Path | None, run: Path, out: Path, *extra: str) -> int:
    argv = ["--dwi", str(dwi), *(["--adc", str(adc)] if adc else []), "--run", str(run), "--output-dir", str(out), "--precision", "fp32", *extra]
    return predict.main(argv)


def test_predict_adc_in_1e6_gives_the_same_mask_and_says_so(isles_sample_dir: Path, runs: dict[str, Path], tmp_path: Path) -> None:
    dwi, adc = isles_sample_dir / f"{SAMPLE}_dwi.nii.gz", isles_sample_dir / f"{SAMPLE}_adc.nii.gz"
    assert _single(tmp_path, dwi, adc, runs["both"], tmp_path / "original") == 0
    image = nib.load(str(adc))
    scaled = tmp_path / "scaled" / "sub-strokecase0009_ses-0001_adc.nii.gz"
    save_nifti(scaled, np.asarray(image.dataobj) * 1000.0, image.affine)
    assert _single(tmp_path, dwi, scaled, runs["both"], tmp_path / "out") == 0
    assert np.array_equal(_mask(tmp_path / "out"), _mask(tmp_path / "original")) and _mask(tmp_path / "out").any()
    assert _sidecar(tmp_path / "out")["AdcConvertedTo"] == "10⁻³ mm²/s" and _sidecar(tmp_path / "original")["AdcUnit"] == "10⁻³ mm²/s"


def test_predict_swapped_inputs_fail_naming_both_files(isles_sample_dir: Path, runs: dict[str, Path], tmp_path: Path) -> None:
    dwi, adc = isles_sample_dir / f"{SAMPLE}_dwi.nii.gz", isles_sample_dir / f"{SAMPLE}_adc.nii.gz"
    renamed = tmp_path / "a_dwi.nii.gz", tmp_path / "a_adc.nii.gz"  # names that do not give the swap away
    shutil.copy(adc, renamed[0])
    shutil.copy(dwi, renamed[1])
    assert _single(tmp_path, *renamed, runs["both"], tmp_path / "out") == 1
    (failed,) = read_json(tmp_path / "out" / "prediction_summary.json")["failed"]
    assert "look swapped" in failed["reason"] and all(str(p) in failed["reason"] for p in renamed)


def test_predict_four_d_dwi_with_bval_and_no_adc(sample: dict[str, Image], runs: dict[str, Path], tmp_path: Path) -> None:
    dwi, adc = sample["dwi"], sample["adc"]
    s0 = dwi.data * np.exp(1000.0 * adc.data * 1e-3)
    folder = tmp_path / "patient07"
    folder.mkdir()
    nib.save(nib.Nifti1Image(np.stack([s0, dwi.data], axis=3).astype(np.float32), dwi.affine), str(folder / "DWI.nii.gz"))
    (folder / "DWI.bval").write_text("0\n1000\n")
    assert _single(tmp_path, folder / "DWI.nii.gz", None, runs["both"], tmp_path / "out") == 0
    record = _sidecar(tmp_path / "out")
    assert record["DwiVolumes"] == [1] and "computed" in record["AdcSource"] and record["Sources"] == [str(folder / "DWI.nii.gz")]
    assert (tmp_path / "out" / "patient07_desc-lesion_mask.nii.gz").is_file()  # generic name: the folder is the case
    (folder / "DWI.bval").unlink()
    assert _single(tmp_path, folder / "DWI.nii.gz", None, runs["both"], tmp_path / "out3") == 1
    reason = read_json(tmp_path / "out3" / "prediction_summary.json")["failed"][0]["reason"]
    assert "without b-values" in reason and "--dwi-volume K" in reason
