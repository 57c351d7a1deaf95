"""The paper's ablation as one plan, run on this machine or submitted to SLURM.

A plan is the experiment grid as data: stages, each one stage script with its arguments, the
folds it runs (one task per fold), the resources a task asks for and the stages it needs. It is
built from one JSON file (``ablation.json`` at the repository root: the paper's grid with
placeholder paths; relative paths are relative to that file), validated completely first (an
invalid entry is one ERROR line naming its key, exit 2). Each stage's command, outputs and
settings check come from its script's declaration (:mod:`strokeseg.stages`), never from flags or
paths typed here. Two executors run the same plan:

- :func:`run_local`: subprocesses on this machine, as many at once as the CPU (and GPU) budget
  allows, after checking that no input path is a placeholder or missing. A task is complete
  when its outputs say so (:func:`is_complete`) and its record ``<task>.plan.json`` beside them
  holds the settings the grid gives it now (:func:`task_state`: resolved arguments, comparison
  pairs, epochs, and its inputs' records), and the stage's own ``run_args.json`` records the
  declared settings the plan asks for (:func:`settings_mismatches`). A rerun skips complete tasks, redoes stale ones
  (recorded with other settings) with ``--overwrite``, and continues the rest (training resumes
  its ``last.pth``: every training task has ``--resume-if-exists``). The stages' WARNING and
  ERROR lines are printed; a preprocessing task that leaves cases in no fold fails.
- :func:`emit_slurm`: one sbatch script per stage (an array over the folds for a per-fold
  stage) and ``submit.sh``, which submits the pending tasks in plan order, each with
  ``--dependency=afterok:`` on the jobs of the tasks it needs, records the job ids, skips tasks
  whose jobs are still queued, and prints the job ids.

    python -m strokeseg.ablation --config ablation.json                 # print the plan
    python -m strokeseg.ablation --config ablation.json --run           # run it here
    python -m strokeseg.ablation --config ablation.json --emit-slurm jobs && bash jobs/submit.sh

Fold pairing: stroke fold k fine-tunes from BraTS fold k (the paper's code), so a transfer task
of fold k waits for BraTS fold k only.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import torch

from ..core.io import CaseError
from .local import run_local
from .plan import FOLD, FOLDERS, REPO, Plan, Resources, Stage, Task, build_plan, command, input_problems, is_complete, load_plan, record_path, record_text, settings_mismatches, task_state
from .slurm import emit_slurm

__all__ = ["FOLD", "FOLDERS", "Resources", "Stage", "Task", "Plan", "build_plan", "load_plan", "is_complete", "task_state", "record_path", "record_text", "settings_mismatches",
           "command", "run_local", "emit_slurm", "main"]


def cpu_count() -> int:
    """CPU cores this process may use (its affinity where the platform reports one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def describe(plan: Plan) -> str:
    """The plan as text: per stage its folds, needs, resources and the first task's command."""
    lines = [f"{len(plan.stages)} stages, {len(plan.tasks())} tasks; outputs and logs under {plan.work_dir}"]
    for stage in plan.stages:
        res = stage.resources
        folds = f" folds {','.join(map(str, stage.folds))}" if stage.folds else ""
        needs = ", ".join([*stage.needs, *(f"{name} (same fold)" for name in stage.needs_fold)]) or "-"
        lines.append(f"{stage.name}{folds}; needs {needs}; {res.gpus} GPU, {res.cpus} CPU, {res.memory}, {res.time}")
        lines.append("    " + shlex.join(command(Task(stage, stage.folds[0] if stage.folds else None), "python")))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "ablation.json", help="the ablation grid (default ablation.json of the repository)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--run", action="store_true", help="run the incomplete tasks on this machine (default: print the plan)")
    action.add_argument("--emit-slurm", type=Path, metavar="DIR",
                        help="write one sbatch script per stage and DIR/submit.sh (refused while the grid has /path/to placeholders)")
    action.add_argument("--pending", action="store_true",
                        help="print the keys of the tasks not complete, one a line: not run, unfinished, or made with other settings than the grid's now")
    parser.add_argument("--cpus", type=int, default=cpu_count(), help="--run: CPU cores to share between tasks (default: all of this machine's)")
    parser.add_argument("--gpus", type=int, default=None, help="--run: GPUs to share between tasks (default: all CUDA devices)")
    return parser.parse_args(argv)


def _inputs_ok(plan: Plan, here: bool) -> bool:
    """Print an ERROR per placeholder path, and per missing input an ERROR (``here``: the plan
    runs on this machine) or a WARNING (SLURM jobs may see other file systems); False on an ERROR."""
    placeholders, missing = input_problems(plan)
    for problem in placeholders + (missing if here else []):
        print(f"ERROR {problem}", file=sys.stderr)
    for problem in [] if here else missing:
        print(f"WARNING {problem}")
    return not placeholders and not (here and missing)


def _run(plan: Plan, args: argparse.Namespace) -> int:
    """``--run``: refuse placeholder or missing inputs before anything is created, then run."""
    if not _inputs_ok(plan, here=True):
        return 2
    gpus = args.gpus if args.gpus is not None else torch.cuda.device_count()
    return run_local(plan, args.cpus, gpus)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        plan = load_plan(args.config)
    except (CaseError, ValueError) as err:
        print(f"ERROR {err}", file=sys.stderr)
        return 2
    if args.pending:
        print("\n".join(task.key for task in plan.tasks() if task_state(plan, task) != "complete"))
        return 0
    if args.emit_slurm:
        if not _inputs_ok(plan, here=False):
            return 2
        written = emit_slurm(plan, args.emit_slurm)
        print(f"{len(written) - 1} sbatch scripts in {args.emit_slurm}; submit with: bash {written[-1]}")
        return 0
    if args.run:
        return _run(plan, args)
    print(describe(plan))
    return 0

