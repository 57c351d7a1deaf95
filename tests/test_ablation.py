"""The ablation plan (strokeseg.ablation): the paper's grid, submit.sh against a stand-in sbatch,
an emitted script under plain bash, and a local run that fails midway and resumes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import pytest

import models
from strokeseg import ablation, demo
from strokeseg.ablation import FOLD, Plan, Resources, Stage, Task
from strokeseg.core.io import file_fingerprints

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


def _edit(grid: dict, dotted: str, value) -> None:
    """Set grid[a][b]... = value for ``dotted`` "a.b"; value None deletes the key."""
    *parents, last = dotted.split(".")
    for key in parents:
        grid = grid[key]
    if value is None:
        del grid[last]
    else:
        grid[last] = value


@pytest.mark.parametrize("dotted, value, message", [
    ("folds", [-1, 0], "folds[0]: must be an integer 0..4, got -1"),
    ("folds", [0, 0], "folds: duplicate fold in [0, 0]"),
    ("folds", "0,1", "folds: must be a list, got '0,1'"),
    ("folds", [], "folds: empty"),
    ("isles.arms", [["shard", "brats"]], "isles.arms[0][0]: unknown 'shard'"),
    ("isles.pretrain_arch", "resnet50", "isles.pretrain_arch: must be one of architectures"),
    ("architectures.resnet50", {"patch_size": 96, "min_lesion_overlap": 0.01}, "architectures.resnet50: unknown architecture"),
    ("stroke.datasets", ["ATLAS", "ATLAS_v3"], "stroke.datasets[1]: unknown stroke dataset 'ATLAS_v3'"),
    ("stroke.arms", ["transfer", "finetune"], "stroke.arms[1]: unknown arm 'finetune'"),
    ("epochs.train_isles", -5, "epochs.train_isles: must be a positive integer, got -5"),
    ("epochs.train_brats", {"resnet18": 0}, "epochs.train_brats.resnet18: must be a positive integer, got 0"),
    ("epochs.train_stroke", {"resnet18": 10}, "epochs.train_stroke.uctransnet3d: missing"),
    ("epochs.train_brats", None, "epochs.train_brats: missing"),
    ("args.train", "--width 8", "args.train: must be a list, got '--width 8'"),
    ("args.trian", [], "args.trian: unknown stage kind"),
    ("resources.train_isles", None, "resources.train_isles: missing"),
    ("resources.evaluate.cpus", 0, "resources.evaluate.cpus: must be an integer >= 1, got 0"),
    ("compare.ATLAS", [["resnet18_transfer", "resnet18_scrach"]], "compare.ATLAS[0][1]: unknown 'resnet18_scrach'"),
    ("compare.BraTS", [], "compare.BraTS: not an evaluated dataset"),
    ("fold", [0], "fold: unknown key"),
])
def test_grid_validated_completely_at_load(tmp_path, capsys, dotted, value, message):
    """Every malformed entry is one ERROR line naming the key, exit 2, before anything runs."""
    grid = json.loads((REPO / "ablation.json").read_text())
    grid["work_dir"] = str(tmp_path / "work")
    _edit(grid, dotted, value)
    (tmp_path / "grid.json").write_text(json.dumps(grid))
    assert ablation.main(["--config", str(tmp_path / "grid.json")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"ERROR {tmp_path / 'grid.json'}: invalid ablation grid: ") and message in err[0], err
    assert ablation.main(["--config", str(tmp_path / "grid.json"), "--run"]) == 2 and not (tmp_path / "work").exists()
    with pytest.raises(ValueError, match="needs 'b', which is not an earlier stage"):
        ablation.plan.check_order([Stage("a", "x.py", (), Resources(), "summaries", (), needs=("b",)), Stage("b", "x.py", (), Resources(), "summaries", ())])


def test_run_refuses_placeholder_and_missing_inputs_before_creating_anything(tmp_path, capsys):
    grid = json.loads((REPO / "ablation.json").read_text())
    grid["work_dir"] = str(tmp_path / "work")
    grid["data"]["brats"], grid["data"]["foundation_config"] = str(tmp_path / "no_brats"), str(REPO / "config.json")
    (tmp_path / "grid.json").write_text(json.dumps(grid))
    assert ablation.main(["--config", str(tmp_path / "grid.json"), "--run"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"ERROR /path/to/ISLES2022/derivatives: placeholder path; set it in {tmp_path / 'grid.json'}",
                   f"ERROR {tmp_path / 'no_brats'}: input not found (set in {tmp_path / 'grid.json'})"]
    assert not (tmp_path / "work").exists()
    assert ablation.main(["--config", str(tmp_path / "grid.json"), "--emit-slurm", str(tmp_path / "jobs")]) == 2  # jobs would create it
    assert capsys.readouterr().err.splitlines() == err[:1] and not (tmp_path / "jobs").exists()
    grid["work_dir"], grid["data"]["isles"] = "/path/to/ablation", str(tmp_path)
    (tmp_path / "grid.json").write_text(json.dumps(grid))
    assert ablation.main(["--config", str(tmp_path / "grid.json"), "--run"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"ERROR /path/to/ablation: placeholder path; set it in {tmp_path / 'grid.json'}", err[1]]
    grid["work_dir"] = str(tmp_path / "work")
    (tmp_path / "grid.json").write_text(json.dumps(grid))
    assert ablation.main(["--config", str(tmp_path / "grid.json"), "--emit-slurm", str(tmp_path / "jobs")]) == 0  # the cluster may see it
    assert capsys.readouterr().out.startswith(f"WARNING {tmp_path / 'no_brats'}: input not found")


# --------------------------------------------------------------------------- SLURM


FAKE_SBATCH = """#!/bin/bash
n=$(wc -l < "$SBATCH_LOG")
printf '%s\\x1f' "$@" >> "$SBATCH_LOG"
echo >> "$SBATCH_LOG"
echo "$((1000 + n));cluster"
"""
FAKE_SQUEUE = """#!/bin/bash
echo "$*" > "$SQUEUE_ARGS"
cat "$SQUEUE_OUT"
"""


def _paper_grid_in(tmp_path: Path, work: str = "work") -> Path:
    grid = json.loads((REPO / "ablation.json").read_text())
    grid["work_dir"] = str(tmp_path / work)
    grid["data"] = {"isles": str(tmp_path / "ISLES2022"), "brats": str(tmp_path / "BraTS2024"), "foundation_config": str(REPO / "config.json")}
    (tmp_path / "ablation.json").write_text(json.dumps(grid))
    return tmp_path / "ablation.json"


def _stubs(tmp_path: Path, python: str = sys.executable, **scripts: str) -> dict[str, str]:
    """Executables named after the keywords in tmp_path/bin; the environment that finds them
    first, with $PYTHON (the jobs' and submit.sh's interpreter) ``python``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=python)


def _submit(jobs: Path, tmp_path: Path, queued: Sequence[str] = (), python: str = sys.executable) -> tuple[list[list[str]], str]:
    """Run submit.sh with stand-in sbatch and squeue (``queued``: the job ids squeue lists) and
    $PYTHON ``python``; returns the recorded sbatch argument lists and stdout."""
    log, queue = tmp_path / "sbatch.log", tmp_path / "squeue.out"
    log.write_text("")
    queue.write_text("".join(f"{job}\n" for job in queued))
    env = dict(_stubs(tmp_path, python, sbatch=FAKE_SBATCH, squeue=FAKE_SQUEUE), SBATCH_LOG=str(log), SQUEUE_OUT=str(queue), SQUEUE_ARGS=str(tmp_path / "squeue.args"))
    done = subprocess.run(["bash", str(jobs / "submit.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [line.split("\x1f")[:-1] for line in log.read_text().splitlines()], done.stdout


def _mark_complete(plan: Plan, stages) -> None:
    """Summaries without failed cases and the plan's records for every task of ``stages``."""
    for stage in stages:
        for output in stage.outputs:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(json.dumps({"n_failed": 0}))
        for task in [Task(stage, fold) for fold in stage.folds or (None,)]:
            ablation.record_path(task).write_text(ablation.record_text(plan, task))


@pytest.mark.slow(25)
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
    _mark_complete(plan, plan.stages[:6])
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


# --------------------------------------------------------------------------- records, stale tasks, warnings, kills

STAGE = """import json, os, signal, sys, time
argv = sys.argv[1:]
opt = lambda flag: argv[argv.index(flag) + 1]
log, name = opt('--log'), opt('--name')
def note(*words):
    with open(log, 'a') as f:
        f.write(' '.join(words) + '\\n')
def preempted(*_):
    note('saved', name)
    sys.exit(75)
signal.signal(signal.SIGTERM, preempted)
note('start', name, json.dumps(argv))
if '--say' in argv:
    print(opt('--say'), flush=True)
deadline = time.time() + 60
while os.path.exists(opt('--hold')) and time.time() < deadline:
    time.sleep(0.05)
json.dump({'n_failed': 0}, open(opt('--out'), 'w'))
note('done', name)
"""


def _stage(name: str, tmp_path: Path, folds: tuple[int, ...] = (), extra: tuple[str, ...] = (), **kwargs) -> Stage:
    """A stand-in stage: notes 'start <key> <argv>' in tmp_path/stages.log, prints --say, waits
    while tmp_path/hold_<key> exists, writes its summary and notes 'done <key>'; SIGTERM: notes
    'saved <key>' and exits 75 (as a trainer does)."""
    script = tmp_path / "stage.py"
    script.write_text(STAGE)
    key = name + (f"_fold{FOLD}" if folds else "")
    out = str(tmp_path / f"{key}.json")
    args = ("--name", key, "--out", out, "--log", str(tmp_path / "stages.log"), "--hold", str(tmp_path / f"hold_{key}"), *extra)
    return Stage(name, str(script), args, Resources(cpus=1), "summaries", (out,), folds, **kwargs)


def _notes(tmp_path: Path, kind: str) -> list[str]:
    """The keys of the stand-in stages' notes of one kind ('start', 'done', 'saved'), in order."""
    lines = (tmp_path / "stages.log").read_text().splitlines() if (tmp_path / "stages.log").exists() else []
    return [line.split()[1] for line in lines if line.split()[0] == kind]


def _started_argv(tmp_path: Path, key: str) -> list[str]:
    lines = [line.split(" ", 2) for line in (tmp_path / "stages.log").read_text().splitlines()]
    return json.loads([rest for kind, name, *rest in lines if kind == "start" and name == key][-1][0])


def test_changed_grid_makes_exactly_the_affected_tasks_pending(tmp_path, monkeypatch, capsys):
    """After a complete run, a changed argument or an added comparison makes pending exactly the
    tasks whose resolved arguments (or whose inputs' tasks) changed; --workers is not a setting."""
    path = _paper_grid_in(tmp_path)
    monkeypatch.setattr(ablation.plan, "is_complete", lambda task: True)  # the outputs themselves are tested above
    plan = ablation.load_plan(path)
    for task in plan.tasks():
        ablation.record_path(task).parent.mkdir(parents=True, exist_ok=True)
        ablation.record_path(task).write_text(ablation.record_text(plan, task))

    def pending_after(dotted: str, value) -> set[str]:
        grid = json.loads(path.read_text())
        _edit(grid, dotted, value)
        (tmp_path / "changed.json").write_text(json.dumps(grid))
        assert ablation.main(["--config", str(tmp_path / "changed.json"), "--pending"]) == 0
        return set(capsys.readouterr().out.split())

    assert pending_after("folds", [0, 1, 2, 3, 4]) == set()
    assert pending_after("resources.train_stroke", {"gpus": 1, "cpus": 4, "memory": "64G", "time": "48:00:00"}) == set()  # --workers only
    isles = {"preprocess_v2_isles", "preprocess_isles_WITH_BBOX", "evaluate_ISLES2022"} | {f"train_isles_{arm}_fold{k}" for arm in ISLES_ARMS for k in range(5)}
    assert pending_after("args.preprocess_isles", ["--target-shape", "128", "128", "128"]) == isles
    compare = [["resnet18_transfer", "resnet18_scratch"], ["uctransnet3d_transfer", "uctransnet3d_scratch"], ["resnet18_scratch", "uctransnet3d_scratch"]]
    assert pending_after("compare.ATLAS", compare) == {"evaluate_ATLAS"}
    assert pending_after("args.evaluate", []) == {"evaluate_ISLES2022", "evaluate_ATLAS", "evaluate_UOA_Private"}
    uct = {f"train_{ds}_uctransnet3d_{arm}_fold{k}" for ds in ("atlas", "uoa_private") for arm in ("transfer", "scratch") for k in range(5)}
    assert pending_after("args.train_stroke", {"uctransnet3d": ["--width", "16"]}) == uct | {"evaluate_ATLAS", "evaluate_UOA_Private"}
    brats = {f"train_brats_resnet18_fold{k}" for k in range(5)}
    after_brats = {f"train_isles_{arm}_fold{k}" for arm in ("separate_brats", "shared_brats") for k in range(5)}
    after_brats |= {f"train_{ds}_resnet18_transfer_fold{k}" for ds in ("atlas", "uoa_private") for k in range(5)}
    assert pending_after("epochs.train_brats", {"resnet18": 50, "uctransnet3d": 100}) == brats | after_brats | {"evaluate_ISLES2022", "evaluate_ATLAS", "evaluate_UOA_Private"}


def test_stale_task_is_redone_with_overwrite_and_recorded(tmp_path):
    def plan_with(level: str) -> Plan:
        stages = (_stage("prep", tmp_path), _stage("train", tmp_path, (0, 1), ("--level", level, "--workers", "1", "--resume-if-exists"), needs=("prep",)),
                  _stage("evaluate", tmp_path, needs=("train",)))
        return Plan(stages, tmp_path / "work", tmp_path / "grid.json")

    first = plan_with("1")
    assert ablation.run_local(first, cpus=1) == 0
    train0 = Task(first.stages[1], 0)
    assert ablation.record_path(train0) == tmp_path / "train_fold0.plan.json"
    assert json.loads(ablation.record_path(train0).read_text())["args"] == ["--name", "train_fold0", "--out", str(tmp_path / "train_fold0.json"),
        "--log", str(tmp_path / "stages.log"), "--hold", str(tmp_path / "hold_train_fold0"), "--level", "1"]
    second = plan_with("2")
    assert [ablation.task_state(second, t) for t in second.tasks()] == ["complete", "stale", "stale", "stale"]
    assert ablation.run_local(second, cpus=1) == 0
    assert _notes(tmp_path, "done") == ["prep", "train_fold0", "train_fold1", "evaluate"] + ["train_fold0", "train_fold1", "evaluate"]
    redo = _started_argv(tmp_path, "train_fold1")
    assert redo[-1] == "--overwrite" and "--resume-if-exists" not in redo and "--level" in redo
    assert "--overwrite" in _started_argv(tmp_path, "evaluate")  # its input's task was redone
    assert all(ablation.task_state(second, t) == "complete" for t in second.tasks())
    assert ablation.run_local(second, cpus=1) == 0 and len(_notes(tmp_path, "done")) == 7


def test_run_prints_stage_warnings_and_fails_on_cases_in_no_fold(tmp_path, capsys):
    from strokeseg.datasets.splits import IN_NO_FOLD

    warn = f"WARNING splits.json: kept the existing folds; 1 {IN_NO_FOLD}, so no training uses them"
    stages = (_stage("prep", tmp_path, extra=("--say", "WARNING 2 cases without a lesion")), _stage("prep2", tmp_path, extra=("--say", warn)),
              _stage("train", tmp_path, needs=("prep", "prep2")))
    plan = Plan(stages, tmp_path / "work", tmp_path / "grid.json")
    assert ablation.run_local(plan, cpus=1) == 1
    out = capsys.readouterr().out
    assert "prep: WARNING 2 cases without a lesion" in out and f"prep2: {warn}" in out
    assert "FAILED prep2: preprocessed cases that are in no fold" in out
    assert _notes(tmp_path, "done") == ["prep", "prep2"]  # the stage itself ended with 0, but nothing went on
    assert [ablation.task_state(plan, t) for t in plan.tasks()] == ["complete", "pending", "pending"]


def _kill_plan(tmp_path: Path) -> Plan:
    stages = (_stage("prep", tmp_path), _stage("train", tmp_path, (0, 1), needs=("prep",)), _stage("evaluate", tmp_path, needs=("train",)))
    return Plan(stages, tmp_path / "work", tmp_path / "grid.json")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_killed_plan_resumes_without_redoing_finished_tasks(tmp_path, how):
    """A real kill of the running plan (SIGKILL of its process group: plan and stage; SIGTERM
    of the plan alone: it stops its stage, which saves) while train_fold1 runs."""
    (tmp_path / "hold_train_fold1").touch()
    code = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]\n"
            "from pathlib import Path; from strokeseg import ablation; from test_ablation import _kill_plan\n"
            f"sys.exit(ablation.run_local(_kill_plan(Path({str(tmp_path)!r})), cpus=1))\n")
    process = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while "train_fold1" not in _notes(tmp_path, "start") and time.time() < deadline:
        time.sleep(0.1)
    assert _notes(tmp_path, "start") == ["prep", "train_fold0", "train_fold1"]
    if how == "SIGKILL":
        os.killpg(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    else:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 128 + signal.SIGTERM
        assert _notes(tmp_path, "saved") == ["train_fold1"]  # the plan passed SIGTERM on and waited
    assert _notes(tmp_path, "done") == ["prep", "train_fold0"]
    (tmp_path / "hold_train_fold1").unlink()
    plan = _kill_plan(tmp_path)
    assert ablation.run_local(plan, cpus=1) == 0
    assert _notes(tmp_path, "start")[3:] == ["train_fold1", "evaluate"]  # prep and train_fold0 not redone
    assert _notes(tmp_path, "done") == ["prep", "train_fold0", "train_fold1", "evaluate"]
