"""The local executor of an ablation plan: its tasks as subprocesses on this machine."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..core.io import write_text
from ..core.runner import get_logger
from ..datasets.splits import IN_NO_FOLD
from .plan import FOLDERS, REDO_FLAG, REPO, Plan, Task, command, record_path, record_text, settings_mismatches, task_state

__all__ = ["run_local"]


@dataclass
class _Running:
    task: Task
    process: subprocess.Popen
    log: Any
    offset: int  # where this run's lines start in the task's log
    started: float
    cpus: int
    gpus: list[int]


def _launch(plan: Plan, task: Task, redo: bool, cpus: int, gpus: list[int] | None, python: str) -> _Running:
    """Start ``task`` with ``cpus`` threads (OMP_NUM_THREADS) and, on a GPU machine, only the
    GPUs ``gpus`` visible; output appended to ``logs/<task key>.log``. A stale task (``redo``)
    loses its record first, so a redo that is interrupted resumes as a plain pending task."""
    env = dict(os.environ, OMP_NUM_THREADS=str(cpus))
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    if redo:
        for problem in settings_mismatches(task):
            get_logger().info(f"{task.key}: {problem}")
        record_path(task).unlink(missing_ok=True)
        get_logger().info(f"{task.key}: settings changed since it completed; redone with {REDO_FLAG}")
    log = open(plan.work_dir / FOLDERS["logs"] / f"{task.key}.log", "a")
    offset = log.tell()
    process = subprocess.Popen(command(task, python, redo), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    return _Running(task, process, log, offset, time.perf_counter(), cpus, gpus or [])


def _pending(plan: Plan) -> tuple[list[tuple[Task, bool]], set[str]]:
    """Split the plan's tasks into those still to run (with whether they are stale) and the keys
    of those already complete."""
    todo, done = [], set()
    for task in plan.tasks():
        state = task_state(plan, task)
        if state == "complete":
            done.add(task.key)
            get_logger().info(f"{task.key}: outputs complete, skipped")
        else:
            todo.append((task, state == "stale"))
    return todo, done


def _finished(plan: Plan, entry: _Running) -> str | None:
    """After ``entry`` ended: print the WARNING and ERROR lines this run added to its log, and
    write the task's record when it succeeded. Returns why it failed, or None."""
    log, status = get_logger(), entry.process.returncode
    log.info(f"{entry.task.key}: exit {status} ({time.perf_counter() - entry.started:.0f} s)")
    with open(entry.log.name, errors="replace") as text:
        text.seek(entry.offset)
        warnings = [line.strip() for line in text if "WARNING" in line or "ERROR" in line]
    for line in warnings:
        log.info(f"{entry.task.key}: {line}")
    if status != 0:
        return f"exit {status}"
    if any(IN_NO_FOLD in line for line in warnings):
        return "preprocessed cases that are in no fold (WARNING above); rebuild the splits as it says, then rerun the plan"
    write_text(record_path(entry.task), record_text(plan, entry.task))
    return None


def _stop(running: list[_Running]) -> None:
    """Send SIGTERM to the running tasks (a trainer saves ``last.pth`` and exits 75) and wait."""
    for entry in running:
        entry.process.send_signal(signal.SIGTERM)
    for entry in running:
        entry.process.wait()
        entry.log.close()


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # run_local stops its running tasks on the way out


def run_local(plan: Plan, cpus: int, gpus: int = 0, python: str = sys.executable) -> int:
    """Run the plan's incomplete tasks here, each as a subprocess from the repository root: a
    task starts once the tasks it needs are done and its CPUs (and GPUs) are free, ready tasks in
    plan order (a task asking for more than ``cpus``/``gpus`` gets them all). A stale task is
    redone with ``--overwrite``; a task that succeeds gets its record. After a failure nothing
    new starts; the running tasks finish. SIGTERM to this process (or any exception) first
    passes SIGTERM to the running tasks and waits for them, then exits with 128 + 15. Returns 0 when every task is complete, else 1 (the log names each
    failed task, why, and its log file)."""
    log, logs = get_logger(), plan.work_dir / FOLDERS["logs"]
    logs.mkdir(parents=True, exist_ok=True)
    todo, done = _pending(plan)
    running: list[_Running] = []
    free_cpus, free_gpus, failed = cpus, list(range(gpus)), {}
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        while todo or running:
            for task, redo in [t for t in todo if all(n.key in done for n in plan.needs(t[0]))] if not failed else []:
                want_cpus, want_gpus = min(task.stage.resources.cpus, cpus), min(task.stage.resources.gpus, gpus)
                if want_cpus > free_cpus or want_gpus > len(free_gpus):
                    break  # no task overtakes a ready one that waits for resources
                share, free_gpus, free_cpus = free_gpus[:want_gpus], free_gpus[want_gpus:], free_cpus - want_cpus
                todo.remove((task, redo))
                running.append(_launch(plan, task, redo, want_cpus, share if gpus else None, python))
            time.sleep(0.2)
            for entry in [e for e in running if e.process.poll() is not None]:
                entry.log.close()
                running.remove(entry)
                free_cpus, free_gpus = free_cpus + entry.cpus, free_gpus + entry.gpus
                reason = _finished(plan, entry)
                if reason is None:
                    done.add(entry.task.key)
                else:
                    failed[entry.task.key] = reason
            if failed and not running:
                break
    finally:
        _stop(running)
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    for key, reason in failed.items():
        log.info(f"FAILED {key}: {reason}; see {logs / (key + '.log')}")
    return 1 if failed else 0


