"""SLURM preemption and submission for real: the batch shell gets USR1 (as SLURM's
``--signal=B:USR1@120`` sends it) and must hand it on and requeue; ``submit.sh`` run again must
not submit queued tasks twice; paths with spaces. ``scontrol``, ``sbatch`` and ``squeue`` are
stand-ins on PATH that record their arguments."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from strokeseg import ablation
from strokeseg.ablation import Plan, Task
from test_ablation import _notes, _paper_grid_in, _stage, _started_argv, _stubs, _submit

REPO = Path(__file__).resolve().parents[1]
SCONTROL = '#!/bin/bash\necho "$*" >> "$SCONTROL_LOG"\n'


def _wait_for(check, what: str, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while not check():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _batch_job(script: Path, tmp_path: Path, started, **env: str) -> subprocess.Popen:
    """``bash script`` in the background as SLURM starts a batch job (stand-in scontrol on PATH),
    once ``started()`` says its command runs."""
    env = dict(_stubs(tmp_path, scontrol=SCONTROL), SCONTROL_LOG=str(tmp_path / "scontrol.log"), SLURM_JOB_ID="777", **env)
    process = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: started() or process.poll() is not None, "the job's command")
    assert process.poll() is None, process.stdout.read()
    return process


def test_emitted_job_hands_usr1_to_the_stage_requeues_and_records(tmp_path):
    stage = _stage("train", tmp_path, (0, 1), ("--workers", "3", "--resume-if-exists"))
    plan = Plan((stage,), tmp_path / "work", tmp_path / "grid.json")
    script = ablation.emit_slurm(plan, tmp_path / "jobs", python=sys.executable)[0]
    (tmp_path / "hold_train_fold1").touch()
    job = _batch_job(script, tmp_path, lambda: "train_fold1" in _notes(tmp_path, "start"), SLURM_ARRAY_TASK_ID="1")
    job.send_signal(signal.SIGUSR1)  # to the batch shell, as SLURM does
    out, _ = job.communicate(timeout=60)
    assert job.returncode == 0, out
    assert _notes(tmp_path, "saved") == ["train_fold1"]  # the stage was told and saved
    assert (tmp_path / "scontrol.log").read_text() == "requeue 777\n"
    assert not ablation.record_path(Task(stage, 1)).exists()  # preempted: not complete

    (tmp_path / "hold_train_fold1").unlink()  # the requeued job runs to the end and records the task
    env = dict(os.environ, SLURM_ARRAY_TASK_ID="1", PYTHON=sys.executable)
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--resume-if-exists" in _started_argv(tmp_path, "train_fold1")
    assert ablation.task_state(plan, Task(stage, 1)) == "complete" and ablation.task_state(plan, Task(stage, 0)) == "pending"

    changed = Plan((stage.__class__(**{**stage.__dict__, "args": (*stage.args, "--width", "8")}),), plan.work_dir, plan.config)
    ablation.record_path(Task(stage, 1)).write_text(ablation.record_text(plan, Task(stage, 1)))
    script = ablation.emit_slurm(changed, tmp_path / "jobs", python=sys.executable)[0]
    assert ablation.task_state(changed, Task(changed.stages[0], 1)) == "stale"
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "settings changed" in done.stdout, done.stderr
    redo = _started_argv(tmp_path, "train_fold1")
    assert redo[-1] == "--overwrite" and "--resume-if-exists" not in redo and "--width" in redo
    assert ablation.task_state(changed, Task(changed.stages[0], 1)) == "complete"


TRAINER = """#!/bin/bash
printf '%s\\n' "$@" > "$ARGS_OUT"
trap 'kill $!; echo saved > "$SAVED"; exit 75' TERM
sleep 60 > /dev/null 2>&1 & wait $!
"""


@pytest.mark.parametrize("script, launcher", [("train_stroke.sbatch", "PYTHON"), ("train_isles_resnet18.sbatch", "PYTHON"),
                                              ("train_brats_uctransnet3d.sbatch", "PYTHON"), ("train_brats_torchrun.sbatch", "TORCHRUN")])
def test_slurm_sbatch_hands_usr1_to_the_trainer_and_requeues(tmp_path, script, launcher):
    trainer = tmp_path / "trainer"
    trainer.write_text(TRAINER)
    trainer.chmod(0o755)
    env = {launcher: str(trainer), "ARGS_OUT": str(tmp_path / "args"), "SAVED": str(tmp_path / "saved"), "SLURM_ARRAY_TASK_ID": "3",
           "SLURM_SUBMIT_DIR": str(REPO), "SLURM_CPUS_PER_TASK": "8", "SLURM_GPUS_ON_NODE": "2"}
    job = _batch_job(REPO / "slurm" / script, tmp_path, (tmp_path / "args").exists, **env)
    time.sleep(0.2)  # the trainer's trap is set right after it wrote its arguments
    job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=60)
    assert job.returncode == 0, out
    assert (tmp_path / "saved").read_text() == "saved\n"
    assert (tmp_path / "scontrol.log").read_text() == "requeue 777\n"
    assert "--resume-if-exists" in (tmp_path / "args").read_text().split()


def _fast_pending(tmp_path: Path, plan: Plan) -> str:
    """A stand-in for $PYTHON that answers submit.sh's ``--pending`` with every task (no torch import)."""
    keys = tmp_path / "pending.txt"
    keys.write_text("".join(f"{task.key}\n" for task in plan.tasks()))
    stub = tmp_path / "python_stub"
    stub.write_text(f'#!/bin/bash\ncat {keys}\n')
    stub.chmod(0o755)
    return str(stub)


def test_submit_again_skips_tasks_whose_jobs_are_queued(tmp_path):
    plan = ablation.load_plan(_paper_grid_in(tmp_path))
    jobs = tmp_path / "jobs"
    ablation.emit_slurm(plan, jobs)
    python = _fast_pending(tmp_path, plan)
    calls, out = _submit(jobs, tmp_path, python=python)
    assert len(calls) == 84
    recorded = [line.split() for line in (jobs / "submitted_jobs.txt").read_text().splitlines()]
    assert recorded == [[task.key, str(1000 + i)] for i, task in enumerate(plan.tasks())]
    assert "--user=" in (tmp_path / "squeue.args").read_text() and "PENDING,RUNNING" in (tmp_path / "squeue.args").read_text()

    calls, out = _submit(jobs, tmp_path, [str(1000 + i) for i in range(84)], python)
    assert calls == [] and "preprocess_v2_isles: job 1000 still pending or running, not submitted again" in out

    # preprocessing's jobs left the queue (failed), the rest wait: only preprocessing goes in again
    calls, out = _submit(jobs, tmp_path, [str(1000 + i) for i in range(6, 84)], python)
    assert [Path(call[-1]).name[3:] for call in calls] == [f"{s.name}.sbatch" for s in plan.stages[:6]]
    assert "train_brats_resnet18_fold0: job 1006 still pending or running" in out


def test_paths_with_spaces_are_quoted(tmp_path):
    plan = ablation.load_plan(_paper_grid_in(tmp_path, work="my ablation"))
    jobs = tmp_path / "sbatch jobs"
    ablation.emit_slurm(plan, jobs)
    assert not any("--output" in line for s in jobs.glob("*.sbatch") for line in s.read_text().splitlines() if line.startswith("#SBATCH"))
    calls, _ = _submit(jobs, tmp_path, python=_fast_pending(tmp_path, plan))
    logs = tmp_path / "my ablation" / "logs"
    assert f"--output={logs}/%x_%j.out" in calls[0] and f"--output={logs}/%x_%A_%a.out" in calls[6]
    assert Path(calls[0][-1]) == jobs / "00_preprocess_v2_isles.sbatch" and logs.is_dir()

    stage = _stage("train", tmp_path / "my ablation", (0,))  # an emitted job under plain bash, in a folder with a space
    spaced = Plan((stage,), tmp_path / "my ablation", tmp_path / "grid.json")
    script = ablation.emit_slurm(spaced, jobs, python=sys.executable)[0]
    done = subprocess.run(["bash", str(script)], env=dict(os.environ, SLURM_ARRAY_TASK_ID="0"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "my ablation" / "train_fold0.json").read_text()) == {"n_failed": 0}
    assert ablation.task_state(spaced, Task(stage, 0)) == "complete"
