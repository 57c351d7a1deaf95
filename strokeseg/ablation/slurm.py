"""The SLURM executor of an ablation plan: one sbatch script per stage and ``submit.sh``.

A job runs its stage under ``slurm/requeue.sh``'s ``requeueable`` in the batch shell itself,
so SLURM's early warning (``--signal=B:USR1@120``, which reaches the batch shell only) is passed
on to the stage, and a preempted training is requeued. When the stage succeeds the job writes
the task's record (:func:`strokeseg.ablation.plan.record_path`); a task whose record holds other
settings than the plan's is redone with ``--overwrite`` on its first start.

Paths are never written into ``#SBATCH`` lines (SLURM does not read shell quoting there):
``submit.sh`` passes ``--output`` on the sbatch command line, quoted.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

from ..core.io import write_text
from ..stages import MISMATCH_EXIT
from .plan import FOLD, FOLDERS, REDO_FLAG, REPO, Plan, Stage, Task, record_path, record_text

__all__ = ["emit_slurm", "JOBS_FILE"]

JOBS_FILE = "submitted_jobs.txt"  # beside submit.sh: "<task> <job id>" per submission


def _shell_word(arg: str) -> str:
    """``arg`` quoted for bash, ``{fold}`` in it becoming ``"$FOLD"``."""
    if FOLD not in arg:
        return shlex.quote(arg)
    return '"$FOLD"'.join(shlex.quote(part) if part else "" for part in arg.split(FOLD))


def _shell_args(args: Sequence[str]) -> str:
    """Shell words, one option (and its values) per line."""
    lines: list[list[str]] = [[]]
    for arg in args:
        if arg.startswith("--") and lines[-1]:
            lines.append([])
        lines[-1].append(_shell_word(arg))
    return " \\\n    ".join(" ".join(words) for words in lines)


def _records(stage: Stage, plan: Plan) -> list[str]:
    """Shell lines setting RECORD_FILE and RECORD (the task's record, one line of JSON) for the
    job's fold (a ``case`` over the folds of a per-fold stage)."""
    def assign(task: Task) -> str:
        return f"RECORD_FILE={shlex.quote(str(record_path(task)))}; RECORD={shlex.quote(record_text(plan, task).rstrip())}"

    if not stage.folds:
        return [assign(Task(stage, None))]
    cases = [f"    {fold}) {assign(Task(stage, fold))} ;;" for fold in stage.folds]
    return ['case "$FOLD" in', *cases, '    *) echo "fold $FOLD is not one of this stage\'s folds" >&2; exit 2 ;;', "esac"]


def _settings_check(stage: Stage) -> list[str]:
    """Shell lines of a declared stage (none otherwise): when the stage's own settings records
    (its run_args.json) disagree with the plan's settings (``python -m strokeseg.stages --check``),
    the task's record is marked stale, so :data:`REDO` redoes it with ``--overwrite``; a check
    that cannot run leaves the task as it is."""
    if stage.decl is None:
        return []
    settings, fold = shlex.quote(json.dumps(stage.settings, sort_keys=True)), '"$FOLD"' if stage.folds else "-"
    return [f'if "$PYTHON" -m strokeseg.stages --check {shlex.quote(stage.decl.script)} {settings} {fold}; then :',
            f'elif [ $? -eq {MISMATCH_EXIT} ]; then printf \'stale\\n\' > "$RECORD_FILE"  # the stage\'s outputs were made with other settings',
            'else echo "WARNING the check of the stage\'s recorded settings did not run" >&2', 'fi']


REDO = f'''if [ -f "$RECORD_FILE" ] && [ "$(cat "$RECORD_FILE")" != "$RECORD" ]; then
    echo "$(date +%T) the task's settings changed since it completed: redone with {REDO_FLAG}"
    rm -f "$RECORD_FILE"  # a preempted redo then resumes as a plain pending task
    MODE=({REDO_FLAG})
fi
source slurm/requeue.sh  # requeueable: hands SLURM's USR1 to the stage, requeues it after a preemption'''

RECORD = '''# the stage succeeded: record what made the task complete (written beside, then renamed)
printf '%s\\n' "$RECORD" > "$RECORD_FILE.$$.partial"
mv -f "$RECORD_FILE.$$.partial" "$RECORD_FILE"
'''


def _sbatch_script(stage: Stage, plan: Plan, python: str) -> str:
    """One stage's sbatch script: an array over its folds (``$SLURM_ARRAY_TASK_ID`` is the
    fold), the stage run by ``requeueable`` in the batch shell, torchrun for more than one GPU,
    then the task's record. Runs under plain bash too."""
    res = stage.resources
    head = [f"#!/bin/bash\n# {stage.name}: {stage.script}, planned by strokeseg.ablation from {plan.config}",
            f"#SBATCH --job-name={stage.name}"]
    if stage.folds:
        head.append(f"#SBATCH --array={','.join(map(str, stage.folds))}")
    if res.gpus:
        head.append(f"#SBATCH --gres=gpu:{res.gpus}")
    head += [f"#SBATCH --cpus-per-task={res.cpus}", f"#SBATCH --mem={res.memory}", f"#SBATCH --time={res.time}",
             "#SBATCH --requeue", "#SBATCH --signal=B:USR1@120", "#SBATCH --open-mode=append",
             "# --output: given by submit.sh on the sbatch command line", "set -euo pipefail", f"cd {shlex.quote(str(REPO))}",
             f"PYTHON=${{PYTHON:-{shlex.quote(python)}}}"]
    if stage.folds:
        head.append('FOLD=${SLURM_ARRAY_TASK_ID:?"run as an array task (sbatch) or set SLURM_ARRAY_TASK_ID to the fold"}')
    resume = "--resume-if-exists" in stage.args
    head += [*_records(stage, plan), *_settings_check(stage), f"MODE=({'--resume-if-exists' if resume else ''})", REDO]
    launcher = '"$PYTHON"' + (f" -m torch.distributed.run --standalone --nproc_per_node {res.gpus}" if res.gpus > 1 else "")
    args = [arg for arg in stage.args if arg != "--resume-if-exists"]
    return "\n".join(head) + f'\nrequeueable {launcher} {_shell_args([stage.script, *args])} \\\n    ${{MODE[@]+"${{MODE[@]}}"}}\n' + RECORD


SUBMIT_HEAD = r'''#!/bin/bash
# Submit the ablation planned from {config}: every task whose outputs are not complete, in plan
# order. A per-fold stage is submitted as one job per fold (sbatch --array=<fold>): SLURM gives a
# whole array one --dependency, so only one job per fold lets fold k wait for the fold-k jobs it
# needs and nothing else (--dependency=afterok:<ids>). Complete tasks are not submitted and
# their dependants do not wait for them, so re-submitting after a partial run continues it.
# Job ids are recorded in {jobs}; a task whose recorded job is still pending or running
# (squeue) is not submitted again, and its dependants wait for that job.
# Prints one line per task: "<task>: job <id> [after <ids>]".
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
JOBS="$HERE"/{jobs}
LOGS={logs}
cd {repo}
PYTHON=${{PYTHON:-{python}}}
mkdir -p "$LOGS"
PENDING=$("$PYTHON" -m strokeseg.ablation --config {config} --pending)
ACTIVE=$(squeue --noheader --format=%F --states=PENDING,RUNNING,SUSPENDED,CONFIGURING,REQUEUED --user="$(id -un)")
declare -A JOB=() PREVIOUS=()
if [ -f "$JOBS" ]; then
    while read -r task id; do PREVIOUS[$task]=$id; done < "$JOBS"
fi
submit() {{  # submit TASK SCRIPT FOLD|- NEEDED_TASK...
    local task=$1 script=$2 fold=$3 need ids=() id
    shift 3
    if ! grep -qxF "$task" <<<"$PENDING"; then echo "$task: complete, not submitted"; return 0; fi
    id=${{PREVIOUS[$task]:-}}
    if [ -n "$id" ] && grep -qxF "$id" <<<"$ACTIVE"; then
        JOB[$task]=$id
        echo "$task: job $id still pending or running, not submitted again"
        return 0
    fi
    for need in "$@"; do
        if [ -n "${{JOB[$need]:-}}" ]; then ids+=("${{JOB[$need]}}"); fi
    done
    local options=(--parsable --kill-on-invalid-dep=yes)
    if [ "$fold" != - ]; then options+=("--array=$fold" "--output=$LOGS/%x_%A_%a.out"); else options+=("--output=$LOGS/%x_%j.out"); fi
    if [ ${{#ids[@]}} -gt 0 ]; then options+=("--dependency=afterok:$(IFS=:; echo "${{ids[*]}}")"); fi
    id=$(sbatch "${{options[@]}}" "$HERE/$script")
    JOB[$task]=${{id%%;*}}
    echo "$task ${{JOB[$task]}}" >> "$JOBS"
    echo "$task: job ${{JOB[$task]}}${{ids[*]:+ after ${{ids[*]}}}}"
}}
'''


def emit_slurm(plan: Plan, out_dir: str | os.PathLike, python: str = sys.executable) -> list[Path]:
    """Write ``<NN>_<stage>.sbatch`` per stage and ``submit.sh`` into ``out_dir``; returns the
    paths written (submit.sh last). ``python``: the interpreter the jobs run (``$PYTHON``
    overrides it at submission)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, lines = [], []
    for index, stage in enumerate(plan.stages):
        path = out_dir / f"{index:02d}_{stage.name}.sbatch"
        write_text(path, _sbatch_script(stage, plan, python))
        path.chmod(0o755)
        written.append(path)
        for fold in stage.folds or (None,):
            task = Task(stage, fold)
            words = [task.key, path.name, "-" if fold is None else str(fold), *(need.key for need in plan.needs(task))]
            lines.append("submit " + " ".join(map(shlex.quote, words)))
    values = {"config": plan.config, "repo": REPO, "python": python, "logs": plan.work_dir / FOLDERS["logs"], "jobs": JOBS_FILE}
    head = SUBMIT_HEAD.format(**{key: shlex.quote(str(value)) for key, value in values.items()})
    submit = out_dir / "submit.sh"
    write_text(submit, head + "\n".join(lines) + "\n")
    submit.chmod(0o755)
    return [*written, submit]
