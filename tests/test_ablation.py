"""The ablation plan (strokeseg.ablation): the paper's grid, submit.sh against a stand-in sbatch,
an emitted script under plain bash, and a local run that fails midway and resumes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import models
from strokeseg import ablation, demo
from strokeseg.ablation import FOLD, Plan, Resources, Stage, Task
from strokeseg.evaluation.engine import file_fingerprints

REPO = Path(__file__).resolve().parents[1]
ARCH_PATCH = {"resnet18": 96, "uctransnet3d": 64}
ISLES_ARMS = ("separate_brats", "shared_brats", "separate_scratch", "shared_scratch", "dwi_only_scratch")
STROKE_RUNS = [f"{ds}_{arch}_{arm}" for ds in ("atlas", "uoa_private") for arch in ARCH_PATCH for arm in ("transfer", "scratch")]


def _expected_needs(key: str, folds: range) -> set[str]:
    """The paper's dependencies, written out by hand per task key."""
    name, _, fold = key.partition("_fold")
    if name.startswith("extract_patches_"):
        return {"preprocess_stroke_foundation"}
    if name.startswith("train_brats_"):
        return {"preprocess_brats2024_t2flair"}
    if name.startswith("train_isles_"):
        return {"preprocess_v2_isles"} | ({f"train_brats_resnet18_fold{fold}"} if name.endswith("_brats") else set())
    if name.startswith("train_"):  # train_<dataset>_<arch>_<arm>
        arch = "uctransnet3d" if "uctransnet3d" in name else "resnet18"
        brats = {f"train_brats_{arch}_fold{fold}"} if name.endswith("_transfer") else set()
        return {"preprocess_stroke_foundation", f"extract_patches_{ARCH_PATCH[arch]}"} | brats
    if name == "evaluate_ISLES2022":
        return {"preprocess_isles_WITH_BBOX"} | {f"train_isles_{arm}_fold{k}" for arm in ISLES_ARMS for k in folds}
    if name.startswith("evaluate_"):
        prefix = name.removeprefix("evaluate_").lower() + "_"
        return {"preprocess_stroke_foundation"} | {f"train_{run}_fold{k}" for run in STROKE_RUNS if run.startswith(prefix) for k in folds}
    return set()  # preprocessing


def _option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _without(argv: list[str], *flags: str) -> list[str]:
    """argv less the given one-value options."""
    drop = {i + k for i, arg in enumerate(argv) if arg in flags for k in (0, 1)}
    return [arg for i, arg in enumerate(argv) if i not in drop]


def test_paper_plan_stages_and_every_dependency():
    plan = ablation.load_plan(REPO / "ablation.json")
    names = [stage.name for stage in plan.stages]
    assert len(names) == 6 + 2 + 5 + 1 + 2 * (4 + 1)  # preprocessing and patches, BraTS, ISLES + eval, 2 x (4 arms + eval)
    tasks = plan.tasks()
    assert len(tasks) == 6 + 3 + (2 + 5 + 8) * 5
    assert names[:6] == ["preprocess_v2_isles", "preprocess_isles_WITH_BBOX", "preprocess_brats2024_t2flair",
                         "preprocess_stroke_foundation", "extract_patches_96", "extract_patches_64"]
    assert {f"train_{run}" for run in STROKE_RUNS} <= set(names)
    position = {task.key: i for i, task in enumerate(tasks)}
    for task in tasks:
        needs = {need.key for need in plan.needs(task)}
        assert needs == _expected_needs(task.key, range(5)), task.key
        assert all(position[need] < position[task.key] for need in needs)
        argv = task.stage.argv(task.fold)
        if task.fold is not None:  # fold pairing: fold k fine-tunes from BraTS fold k
            assert _option(argv, "--fold") == str(task.fold) and "--resume-if-exists" in argv
            if "--pretrain-ckpt" in argv:
                assert f"/fold_{task.fold}/best_model.pth" in _option(argv, "--pretrain-ckpt")
    brats_uct = plan.tasks()[position["train_brats_uctransnet3d_fold3"]].stage.argv(3)
    assert (_option(brats_uct, "--batch-size"), _option(brats_uct, "--patches-per-volume"), _option(brats_uct, "--patch-size")) == ("8", "4", "64")


def test_demo_plan_is_the_paper_grid_at_demo_sizes(tmp_path):
    plan = ablation.load_plan(demo.write_grid(tmp_path, demo.SMALL))
    paper = ablation.load_plan(REPO / "ablation.json")
    assert [s.name.replace("_48", "_96").replace("_32", "_64") for s in plan.stages] == [s.name for s in paper.stages]
    assert len(plan.tasks()) == 6 + 3 + 15  # one fold
    task = next(t for t in plan.tasks() if t.key == "train_atlas_uctransnet3d_transfer_fold0")
    argv = task.stage.argv(0)
    assert _option(argv, "--pretrain-ckpt") == str(tmp_path / "runs" / "brats_uctransnet3d" / "fold_0" / "best_model.pth")
    assert [_option(argv, f) for f in ("--epochs", "--width", "--batch-size", "--lr", "--workers", "--patch-size")] == ["20", "8", "2", "3e-3", "0", "32"]
    scratch = next(t for t in plan.tasks() if t.key == "train_atlas_uctransnet3d_scratch_fold0").stage.argv(0)
    assert _without(argv, "--pretrain-ckpt", "--output-dir") == _without(scratch, "--output-dir")  # the arms differ only in init
    for stage in plan.stages:  # >= 6 test cases, so the paired comparisons run
        if stage.script in ("preprocess_v2_isles.py", "preprocess_isles_WITH_BBOX.py", "preprocess_stroke_foundation.py"):
            assert _option(list(stage.args), "--test-fraction") == "0.25"
    assert all(any(a == "--compare" for a in stage.args) for stage in plan.stages if stage.script == "evaluate.py")
    assert [_option(list(s.args), "--min_lesion_overlap") for s in plan.stages if s.name.startswith("extract_patches")] == ["0.01", "0.01"]


def test_demo_emits_its_plan_for_slurm(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "generate_data", lambda raw, scale, seed: None)  # the synthetic data is not needed to plan
    assert demo.main(["--out", str(tmp_path / "out"), "--emit-slurm", str(tmp_path / "jobs")]) == 0
    scripts = sorted(p.name for p in (tmp_path / "jobs").glob("*.sbatch"))
    assert len(scripts) == 24 and scripts[6] == "06_train_brats_resnet18.sbatch"
    text = (tmp_path / "jobs" / "06_train_brats_resnet18.sbatch").read_text()
    assert "#SBATCH --array=0\n" in text and "--epochs 10" in text and '--fold "$FOLD"' in text
    transfer = next((tmp_path / "jobs").glob("*_train_atlas_resnet18_transfer.sbatch")).read_text()
    assert f'--pretrain-ckpt {tmp_path}/out/runs/brats_resnet18/fold_"$FOLD"/best_model.pth' in transfer
    assert str(tmp_path / "out" / "ablation.json") in (tmp_path / "jobs" / "submit.sh").read_text()


def test_bad_grid_names_the_file(tmp_path):
    grid = json.loads((REPO / "ablation.json").read_text())
    del grid["resources"]["train_isles"]
    (tmp_path / "grid.json").write_text(json.dumps(grid))
    with pytest.raises(ValueError, match=r"grid\.json: invalid ablation grid .*train_isles"):
        ablation.load_plan(tmp_path / "grid.json")
    with pytest.raises(ValueError, match="needs 'b', which is not an earlier stage"):
        ablation.check_order([Stage("a", "x.py", (), Resources(), "summaries", (), needs=("b",)), Stage("b", "x.py", (), Resources(), "summaries", ())])


# --------------------------------------------------------------------------- SLURM


FAKE_SBATCH = """#!/bin/bash
n=$(wc -l < "$SBATCH_LOG")
echo "$*" >> "$SBATCH_LOG"
echo "$((1000 + n));cluster"
"""


def _paper_grid_in(tmp_path: Path) -> Path:
    grid = json.loads((REPO / "ablation.json").read_text())
    grid["work_dir"] = str(tmp_path / "work")
    grid["data"]["foundation_config"] = str(REPO / "config.json")
    (tmp_path / "ablation.json").write_text(json.dumps(grid))
    return tmp_path / "ablation.json"


def _submit(jobs: Path, tmp_path: Path) -> tuple[list[list[str]], str]:
    """Run submit.sh with the stand-in sbatch; returns the recorded sbatch argument lists and stdout."""
    bin_dir, log = tmp_path / "bin", tmp_path / "sbatch.log"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    log.write_text("")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SBATCH_LOG=str(log), PYTHON=sys.executable)
    done = subprocess.run(["bash", str(jobs / "submit.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [line.split() for line in log.read_text().splitlines()], done.stdout


def test_submit_sh_order_and_afterok_ids(tmp_path):
    plan = ablation.load_plan(_paper_grid_in(tmp_path))
    jobs = tmp_path / "jobs"
    assert ablation.main(["--config", str(plan.config), "--emit-slurm", str(jobs)]) == 0
    calls, out = _submit(jobs, tmp_path)
    tasks = plan.tasks()
    assert len(calls) == len(tasks) == 84
    job_of = {task.key: str(1000 + i) for i, task in enumerate(tasks)}
    for task, call in zip(tasks, calls):
        assert Path(call[-1]).name.endswith(f"_{task.stage.name}.sbatch")
        assert ("--array=" + str(task.fold) in call) == (task.fold is not None)
        dependency = [arg for arg in call if arg.startswith("--dependency=")]
        needed = [job_of[need.key] for need in plan.needs(task)]
        assert dependency == ([f"--dependency=afterok:{':'.join(needed)}"] if needed else []), task.key
        assert f"{task.key}: job {job_of[task.key]}" in out
    assert "--dependency=afterok:" + job_of["preprocess_brats2024_t2flair"] in calls[[t.key for t in tasks].index("train_brats_resnet18_fold2")]
    transfer = calls[[t.key for t in tasks].index("train_atlas_resnet18_transfer_fold2")]
    assert transfer[-2] == f"--dependency=afterok:{job_of['preprocess_stroke_foundation']}:{job_of['extract_patches_96']}:{job_of['train_brats_resnet18_fold2']}"

    # a re-submission after a partial run skips the complete tasks, and nobody waits for them
    for stage in plan.stages[:6]:
        for output in stage.outputs:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(json.dumps({"n_failed": 0}))
    calls, out = _submit(jobs, tmp_path)
    assert len(calls) == 84 - 6 and "preprocess_v2_isles: complete, not submitted" in out
    assert not any(arg.startswith("--dependency") for arg in calls[0]) and calls[0][-1].endswith("_train_brats_resnet18.sbatch")


def _stub_script(tmp_path: Path) -> Path:
    """A stand-in stage: records its call, fails while <fail-if> exists, else writes a summary."""
    stub = tmp_path / "stub_stage.py"
    stub.write_text(
        "import json, os, sys, time\n"
        "args = dict(zip(sys.argv[1::2], sys.argv[2::2]))\n"
        "time.sleep(float(args.get('--sleep', 0)))\n"
        "if os.path.exists(args['--fail-if']):\n"
        "    sys.exit(3)\n"
        "with open(args['--calls'], 'a') as f:\n"
        "    f.write(args['--name'] + ' ' + os.environ.get('OMP_NUM_THREADS', '') + '\\n')\n"
        "json.dump({'n_failed': 0}, open(args['--out'], 'w'))\n"
    )
    return stub


def _stub_stage(name: str, tmp_path: Path, folds: tuple[int, ...] = (), **kwargs) -> Stage:
    key = name + (f"_fold{FOLD}" if folds else "")
    out = str(tmp_path / f"{key}.json")
    args = ("--name", key, "--out", out, "--calls", str(tmp_path / "calls.txt"), "--fail-if", str(tmp_path / f"fail_{key}"), "--sleep", "0.3")
    return Stage(name, str(_stub_script(tmp_path)), args, Resources(cpus=1), "summaries", (out,), folds, **kwargs)


def test_emitted_script_runs_under_plain_bash(tmp_path):
    stages = (_stub_stage("prep", tmp_path), _stub_stage("train", tmp_path, (0, 1, 2), needs=("prep",)),
              Stage("ddp", "train_brats_uctransnet3d.py", ("--fold", FOLD), Resources(gpus=4, cpus=32), "training", (str(tmp_path),), (0,)))
    plan = Plan(stages, tmp_path / "work", tmp_path / "grid.json")
    written = ablation.emit_slurm(plan, tmp_path / "jobs", python=sys.executable)
    script = written[1].read_text()
    assert "#SBATCH --array=0,1,2" in script and "slurm/requeue.sh" in script and "#SBATCH --signal=B:USR1@120" in script
    ddp = written[2].read_text()
    assert "#SBATCH --gres=gpu:4" in ddp and "-m torch.distributed.run --standalone --nproc_per_node 4 train_brats_uctransnet3d.py" in ddp
    env = dict(os.environ, SLURM_ARRAY_TASK_ID="2")
    done = subprocess.run(["bash", str(written[1])], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "train_fold2.json").read_text()) == {"n_failed": 0}
    assert (tmp_path / "calls.txt").read_text().split()[0] == "train_fold2"
    assert ablation.is_complete(Task(stages[1], 2)) and not ablation.is_complete(Task(stages[1], 1))


# --------------------------------------------------------------------------- local executor


def test_local_run_fails_midway_then_resumes_without_redoing(tmp_path):
    stages = (_stub_stage("prep", tmp_path), _stub_stage("train", tmp_path, (0, 1), needs=("prep",)),
              _stub_stage("evaluate", tmp_path, needs=("train",)))
    plan = Plan(stages, tmp_path / "work", tmp_path / "grid.json")
    (tmp_path / "fail_train_fold1").touch()
    assert ablation.run_local(plan, cpus=2) == 1
    calls = tmp_path / "calls.txt"
    assert sorted(line.split()[0] for line in calls.read_text().splitlines()) == ["prep", "train_fold0"]
    assert not (tmp_path / "evaluate.json").exists()
    assert (tmp_path / "work" / "logs" / "train_fold1.log").is_file()

    (tmp_path / "fail_train_fold1").unlink()
    assert ablation.run_local(plan, cpus=2) == 0
    lines = calls.read_text().splitlines()
    assert sorted(line.split()[0] for line in lines) == ["evaluate", "prep", "train_fold0", "train_fold1"]
    assert {line.split()[1] for line in lines} == {"1"}  # OMP_NUM_THREADS = the task's CPUs
    assert ablation.run_local(plan, cpus=2) == 0 and len(calls.read_text().splitlines()) == 4


def test_training_complete_only_after_the_last_epoch(tmp_path):
    stage = Stage("train_x", "train_stroke.py", (), Resources(), "training", (str(tmp_path / "run"),), (0,), epochs=3)
    fold = tmp_path / "run" / "fold_0"
    fold.mkdir(parents=True)
    config = {"arch": "resnet18_unet", "variant": "single", "width": 4, "norm": "batch"}
    model = models.build_model(config)
    models.save_checkpoint(fold / "last.pth", model, config, epoch=2)
    models.save_checkpoint(fold / "best_model.pth", model, config, epoch=2)
    assert not ablation.is_complete(Task(stage, 0))
    models.save_checkpoint(fold / "last.pth", model, config, epoch=3)
    assert ablation.is_complete(Task(stage, 0))
    (fold / "best_model.pth").unlink()
    assert not ablation.is_complete(Task(stage, 0))


def test_evaluation_complete_only_while_its_inputs_are_unchanged(tmp_path):
    """A fold trained again after the evaluation makes the evaluation stale: not complete."""
    summary = tmp_path / "results" / "summary.json"
    stage = Stage("evaluate_x", "evaluate.py", (), Resources(), "evaluation", (str(summary),))
    checkpoint = tmp_path / "run" / "fold_0" / "best_model.pth"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"weights")
    assert not ablation.is_complete(Task(stage, None))  # not evaluated yet
    summary.parent.mkdir()
    record = {"n_failed": 0, "runs": {}, "inputs": file_fingerprints([checkpoint])}
    summary.write_text(json.dumps(record))
    assert ablation.is_complete(Task(stage, None))
    checkpoint.write_bytes(b"weights of a new training")
    assert not ablation.is_complete(Task(stage, None))
    summary.write_text(json.dumps({**record, "inputs": file_fingerprints([checkpoint]), "n_failed": 1}))
    assert not ablation.is_complete(Task(stage, None))  # a failed case
    summary.write_text(json.dumps({"n_failed": 0, "runs": {}}))
    assert not ablation.is_complete(Task(stage, None))  # an older evaluation that records no inputs


@pytest.mark.parametrize("script, env, expected", [
    ("train_stroke.sbatch", {"DATASET": "UOA_Private", "ARCH": "uctransnet3d", "INIT": "transfer"},
     {"--pretrain-ckpt": "runs/brats_uctransnet3d/fold_3/best_model.pth", "--output-dir": "runs/uoa_private_uctransnet3d_transfer"}),
    ("train_isles_resnet18.sbatch", {"STRATEGY": "separate", "INIT": "brats"},
     {"--pretrain-ckpt": "runs/brats_resnet18/fold_3/best_model.pth", "--output-dir": "runs/isles_separate_brats"}),
    ("train_brats_uctransnet3d.sbatch", {"ARCH": "uctransnet3d"},
     {"--batch-size": "8", "--patches-per-volume": "4", "--patch-size": "64", "--output-dir": "runs/brats_uctransnet3d"}),
])
def test_slurm_examples_pair_folds_and_use_the_plan_names(tmp_path, script, env, expected):
    stub = tmp_path / "python"
    stub.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    stub.chmod(0o755)
    env = dict(os.environ, **env, PYTHON=str(stub), ARGS_OUT=str(tmp_path / "args"), SLURM_ARRAY_TASK_ID="3", SLURM_SUBMIT_DIR=str(REPO), SLURM_CPUS_PER_TASK="8")
    done = subprocess.run(["bash", str(REPO / "slurm" / script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    argv = (tmp_path / "args").read_text().splitlines()
    assert {flag: _option(argv, flag) for flag in expected} == expected
    assert _option(argv, "--fold") == "3" and "--resume-if-exists" in argv
