"""Every ``bash`` block of README.md runs, in order, on synthetic data at tiny sizes.

So that README commands cannot rot. The mechanism (README, "The README is tested"):

- ``/data/`` in a command is a temporary folder holding synthetic datasets in the real layouts
  (:data:`DATASETS`); the blocks run one after another in one temporary working folder, so
  ``runs/`` and ``results/`` written by one block are read by the next.
- ``python <script>.py`` and ``python -m strokeseg...`` run this checkout's code with the test's
  interpreter; the repository files commands name (``config.json``) are copied beside them.
- Sizes shrink, behaviour does not: the values in :data:`SHRINK` are replaced (96³ ISLES
  volumes become 32³, MNI-space volumes 48 x 56 x 48, 96³/64³ patches 48³/32³, 100 epochs 1,
  fold loops run fold 0) and :data:`TINY_FLAGS` are appended to the training scripts (argparse
  keeps the last value of a flag).
- A block right after a ``<!-- readme-test: skip REASON -->`` line is not run (set-up commands,
  SLURM submission, GPU-only commands); the reason is required.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from strokeseg.datasets.synthetic import make_atlas, make_brats, make_isles

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MNI_SHAPE = (48, 56, 48)  # the tiny MNI grid: 197 x 233 x 189 in the paper's commands


def _hospital_exports(root: Path) -> None:
    """Synthetic ISLES cases named as hospitals export them: ``hospital/patientNN/{DWI,ADC}.nii.gz``,
    ``hospital_flat/PNNN_DWI.nii.gz`` + ``pNNN_adc.nii.gz``, and ``dwi_4d/patient07/DWI.nii.gz``
    (b=0, b=1000) with ``DWI.bval`` and no ADC map."""
    source = root / "isles"
    make_isles(source, 3, layout="A", seed=5, shape=(32, 32, 32))
    stems = sorted(source.glob("sub-*/ses-0001/dwi/*_dwi.nii.gz"))
    for k, dwi in enumerate(stems, start=1):
        adc = dwi.with_name(dwi.name.replace("_dwi", "_adc"))
        for target, names in ((root / "hospital" / f"patient{k:02d}", ("DWI.nii.gz", "ADC.nii.gz")), (root / "hospital_flat", (f"P{k:03d}_DWI.nii.gz", f"p{k:03d}_adc.nii.gz"))):
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(dwi, target / names[0])
            shutil.copy(adc, target / names[1])
    image = nib.load(str(stems[0]))
    b1000 = np.asarray(image.dataobj, dtype=np.float32)
    (root / "dwi_4d" / "patient07").mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.stack([b1000 * 2.2, b1000], axis=3), image.affine), str(root / "dwi_4d" / "patient07" / "DWI.nii.gz"))
    (root / "dwi_4d" / "patient07" / "DWI.bval").write_text("0 1000\n")
    shutil.rmtree(source)


DATASETS = {  # path under /data -> writer of the synthetic dataset in that release's layout
    "ISLES-2022": lambda root: make_isles(root, 12, layout="A", seed=3, shape=(32, 32, 32), empty_every=8),
    "BraTS2024/training_data": lambda root: make_brats(root, 8, seed=3, shape=MNI_SHAPE),
    "ATLAS_2": lambda root: make_atlas(root, 12, seed=3, shape=MNI_SHAPE),
    ".": _hospital_exports,  # hospital/, hospital_flat/, dwi_4d/
}
SHRINK = (  # (pattern, replacement): sizes of the paper's commands -> the test's tiny sizes
    (r"--target-shape 96 96 96", "--target-shape 32 32 32"),
    (r"--target-shape 197 233 189", "--target-shape " + " ".join(map(str, MNI_SHAPE))),
    (r"(--patch[_-]size) 96\b", r"\1 48"),
    (r"(--patch[_-]size) 64\b", r"\1 32"),
    (r"--epochs \d+", "--epochs 1"),
    (r"for k in 0 1 2 3 4;", "for k in 0;"),
    (r"--batch-size \d+", "--batch-size 2"),
    (r"--patches-per-volume \d+", "--patches-per-volume 2"),
    (r"--max_patches \d+", "--max_patches 4"),
)
TINY_FLAGS = {  # appended to every command running the script
    "preprocess_brats2024_t2flair.py": "--target-shape " + " ".join(map(str, MNI_SHAPE)),
    "train_brats_uctransnet3d.py": "--width 8 --epochs 1 --workers 0 --batch-size 2 --patches-per-volume 2",
    "train_isles_resnet18.py": "--width 8 --epochs 1 --workers 0 --batch-size 2",
    "train_stroke.py": "--width 8 --epochs 1 --workers 0 --batch-size 2 --patches-per-volume 2",
    "evaluate.py": "--bootstrap 200",
}
REPO_FILES = ("config.json",)  # read by README commands from the repository root
TINY_PATCH = {"resnet18": 48, "uctransnet3d": 32}  # tiny patch edge per architecture (paper: 96, 64)
DEFAULT_ARCH = {"train_brats_uctransnet3d.py": "uctransnet3d", "train_stroke.py": "resnet18"}
_SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s+(\S.*?)\s*-->")
_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)


def readme_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line number, code, skip reason or None) of every ```bash block of ``text``."""
    blocks = []
    for match in _BLOCK.finditer(text):
        before = text[: match.start()].rstrip().splitlines()
        skip = _SKIP.fullmatch(before[-1].strip()) if before else None
        line = text.count("\n", 0, match.start()) + 1
        blocks.append((line, match.group(1), skip.group(1) if skip else None))
    return blocks


def _tiny_patch(command: str, script: str) -> str:
    # Training scripts without --patch-size take their architecture's (96 or 64): name the tiny one.
    if script not in DEFAULT_ARCH or "--patch-size" in command:
        return ""
    arch = re.search(r"--arch (\S+)", command)
    return f" --patch-size {TINY_PATCH[arch.group(1) if arch else DEFAULT_ARCH[script]]}"


def tiny_command(code: str, data_root: Path) -> str:
    """``code`` with /data/ pointing at ``data_root``, this checkout's scripts and tiny sizes."""
    code = code.replace("\\\n", " ").replace("/data/", f"{data_root}/")
    for pattern, replacement in SHRINK:
        code = re.sub(pattern, replacement, code)
    lines = []
    for line in code.splitlines():
        command = line.partition("  #")[0].rstrip()
        for script, flags in TINY_FLAGS.items():
            if re.search(rf"\bpython {re.escape(script)}\b", command):
                command = f"{command} {flags}{_tiny_patch(command, script)}"
        lines.append(re.sub(r"\bpython (\w+\.py)\b", rf"python {REPO}/\1", command))
    return "\n".join(lines)


def test_readme_blocks_are_parsed_and_every_skip_has_a_reason():
    blocks = readme_blocks(README.read_text())
    assert len(blocks) >= 8
    assert all(reason is None or reason.strip() for _, _, reason in blocks)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_links_resolve():
    text = README.read_text()
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert links and sorted(set(links) - anchors) == []
    files = re.findall(r"\]\(([\w./-]+\.md)\)", text)
    assert files and [f for f in files if not (REPO / f).is_file()] == []


def test_shrinking_rewrites_sizes_and_paths(tmp_path):
    code = "python train_stroke.py --dataset ATLAS --data-dir /data/x --arch uctransnet3d \\\n  --epochs 100  # note"
    out = tiny_command(code, tmp_path)
    assert f"python {REPO}/train_stroke.py --dataset ATLAS --data-dir {tmp_path}/x" in out
    assert out.endswith("--epochs 1 --width 8 --epochs 1 --workers 0 --batch-size 2 --patches-per-volume 2 --patch-size 32")
    assert "# note" not in out


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for name, write in DATASETS.items():
        write(root / name)
    return root


@pytest.mark.slow(300)
def test_every_readme_block_runs(data_root, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    for name in REPO_FILES:
        shutil.copy(REPO / name, work / name)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(REPO))
    ran = 0
    for line, code, skip in readme_blocks(README.read_text()):
        if skip:
            continue
        script = tiny_command(code, data_root)
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"README.md block at line {line} failed (exit {done.returncode}):\n{script}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        ran += 1
    assert ran >= 6
