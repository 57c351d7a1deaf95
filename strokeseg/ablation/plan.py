"""The paper's ablation as one plan, run on this machine or submitted to SLURM.

A plan is the experiment grid as data: stages, each one stage script with its arguments, the
folds it runs (one task per fold), the resources a task asks for and the stages it needs. It is
built from one JSON file (``ablation.json`` at the repository root: the paper's grid with
placeholder paths; relative paths are relative to that file). Two executors run the same plan:

- :func:`run_local`: subprocesses on this machine, as many at once as the CPU (and GPU) budget
  allows. A rerun skips tasks whose outputs are complete (:func:`is_complete`) and continues the
  rest (training resumes its ``last.pth``: every training task has ``--resume-if-exists``).
- :func:`emit_slurm`: one sbatch script per stage (an array over the folds for a per-fold
  stage) and ``submit.sh``, which submits the pending tasks in plan order, each with
  ``--dependency=afterok:`` on the jobs of the tasks it needs, and prints the job ids.

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
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

import models
from .core.io import CaseError, read_json, write_text
from .core.runner import get_logger
from .evaluation.engine import changed_inputs, evaluation_problems, file_fingerprints

__all__ = ["FOLD", "Resources", "Stage", "Task", "Plan", "build_plan", "load_plan", "is_complete", "command", "run_local", "emit_slurm"]

REPO = Path(__file__).resolve().parents[1]
FOLD = "{fold}"  # stands for the fold in a per-fold stage's arguments


@dataclass(frozen=True)
class Resources:
    """What one task asks for: GPUs, CPU cores, memory (SLURM syntax, e.g. ``"64G"``) and wall
    time (``"HH:MM:SS"``). More than one GPU launches the script with torchrun."""

    gpus: int = 0
    cpus: int = 1
    memory: str = "8G"
    time: str = "01:00:00"


@dataclass(frozen=True)
class Stage:
    """One stage script of the plan.

    args: its arguments (``{fold}`` stands for the fold); folds: one task per fold, empty for a
    stage that runs once; needs: stages whose every task must finish first; needs_fold: per-fold
    stages whose task of the same fold must finish first. done: how completeness is read from
    the stage's own outputs (see :data:`DONE_RULES`): ``"summaries"`` (every file of outputs,
    ``{fold}`` replaced, is a summary JSON with ``n_failed`` 0), ``"training"`` (outputs[0] is the run folder;
    ``fold_<k>/best_model.pth`` exists and ``fold_<k>/last.pth`` finished ``epochs`` epochs) or
    ``"evaluation"`` (outputs[0] is evaluate.py's summary.json, successful, of the inputs as they are now).
    """

    name: str
    script: str
    args: tuple[str, ...]
    resources: Resources
    done: str
    outputs: tuple[str, ...]
    folds: tuple[int, ...] = ()
    needs: tuple[str, ...] = ()
    needs_fold: tuple[str, ...] = ()
    epochs: int = 0

    def argv(self, fold: int | None) -> list[str]:
        """The arguments of the task of ``fold`` (None for a stage that runs once)."""
        return [arg.replace(FOLD, str(fold)) for arg in self.args]


@dataclass(frozen=True)
class Task:
    """One run of a stage: its fold, or None for a stage that runs once."""

    stage: Stage
    fold: int | None

    @property
    def key(self) -> str:
        """Unique name: the stage name, plus ``_fold<k>`` for a per-fold stage (log file stem)."""
        return self.stage.name if self.fold is None else f"{self.stage.name}_fold{self.fold}"


@dataclass(frozen=True)
class Plan:
    """Stages in an order where every stage comes after those it needs; work_dir holds the
    outputs and ``logs/``; config is the ablation JSON the plan was built from."""

    stages: tuple[Stage, ...]
    work_dir: Path
    config: Path

    def tasks(self) -> list[Task]:
        """Every task, stage by stage in plan order, folds ascending."""
        return [Task(s, fold) for s in self.stages for fold in (s.folds or (None,))]

    def needs(self, task: Task) -> list[Task]:
        """The tasks that must finish before ``task`` starts."""
        by_name = {s.name: s for s in self.stages}
        whole = [Task(by_name[n], fold) for n in task.stage.needs for fold in (by_name[n].folds or (None,))]
        return whole + [Task(by_name[n], task.fold) for n in task.stage.needs_fold]


def check_order(stages: Sequence[Stage]) -> None:
    """Raise ValueError unless names are unique and every need names an earlier stage (fold-wise
    needs: an earlier stage running at least the same folds)."""
    seen: dict[str, Stage] = {}
    for stage in stages:
        if stage.name in seen:
            raise ValueError(f"stage {stage.name!r} appears twice")
        for name in stage.needs + stage.needs_fold:
            if name not in seen:
                raise ValueError(f"stage {stage.name!r} needs {name!r}, which is not an earlier stage")
        for name in stage.needs_fold:
            if not stage.folds or not set(stage.folds) <= set(seen[name].folds):
                raise ValueError(f"stage {stage.name!r} needs {name!r} fold by fold, but their folds differ")
        seen[stage.name] = stage


# --------------------------------------------------------------------------- completeness


def _summaries_done(stage: Stage, fold: int | None) -> bool:
    for path in (Path(output.replace(FOLD, str(fold))) for output in stage.outputs):
        try:
            summary = read_json(path)
        except CaseError:
            return False
        if not isinstance(summary, dict) or summary.get("n_failed") != 0:
            return False
    return True


def _training_done(stage: Stage, fold: int | None) -> bool:
    fold_dir = Path(stage.outputs[0]) / f"fold_{fold}"
    if not (fold_dir / "best_model.pth").is_file() or not (fold_dir / "last.pth").is_file():
        return False
    try:
        last = models.load_checkpoint(fold_dir / "last.pth", mmap=True)  # the weights stay on disk
    except ValueError:
        return False
    return last.get("epoch", -1) >= stage.epochs


def _evaluation_done(stage: Stage, fold: int | None) -> bool:
    """evaluate.py's summary.json without problems, whose recorded inputs (checkpoints, splits
    file, data) are unchanged since: a fold trained again makes the evaluation stale."""
    try:
        summary = read_json(stage.outputs[0])
    except CaseError:
        return False
    if not isinstance(summary, dict) or evaluation_problems(summary) or not isinstance(summary.get("inputs"), dict):
        return False
    return not changed_inputs(summary["inputs"], file_fingerprints(summary["inputs"]))


DONE_RULES: dict[str, Callable[[Stage, int | None], bool]] = {"summaries": _summaries_done, "training": _training_done, "evaluation": _evaluation_done}


def is_complete(task: Task) -> bool:
    """Whether the task's outputs say it finished: per-case stages a summary JSON with no failed
    case, training a best model and a ``last.pth`` of the final epoch, evaluation a successful
    summary of the checkpoints and data as they are now."""
    return DONE_RULES[task.stage.done](task.stage, task.fold)


def command(task: Task, python: str = sys.executable) -> list[str]:
    """The command line of ``task``, run from the repository root (torchrun for > 1 GPU)."""
    gpus = task.stage.resources.gpus
    launcher = [python] if gpus <= 1 else [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus)]
    return [*launcher, task.stage.script, *task.stage.argv(task.fold)]


# --------------------------------------------------------------------------- building the plan

FOLDERS = {  # under work_dir
    "isles_train": "preprocessed_isles_train", "isles_eval": "preprocessed_isles_eval",
    "brats": "preprocessed_brats2024_t2flair", "foundation": "preprocessed_stroke_foundation",
    "runs": "runs", "results": "results", "logs": "logs",
}


def _resources(config: Mapping[str, Any], kind: str) -> Resources:
    return Resources(**config["resources"][kind])


def _per_arch(config: Mapping[str, Any], section: str, kind: str, arch: str | None, default: Any) -> Any:
    """config[section][kind], which is a value or a {arch: value} table."""
    value = config.get(section, {}).get(kind, default)
    return value.get(arch, default) if isinstance(value, Mapping) else value


def _extra(config: Mapping[str, Any], kind: str, arch: str | None = None) -> list[str]:
    return [str(v) for v in _per_arch(config, "args", kind, arch, [])]


def _training_args(config: Mapping[str, Any], kind: str, arch: str, res: Resources, epochs: int) -> list[str]:
    """The flags every training task gets: fold, epochs, the grid's extra flags (all training,
    then this kind's), DataLoader workers (the task's CPUs less one per GPU rank) and resuming."""
    workers = max(res.cpus // max(res.gpus, 1) - 1, 0)
    return ["--fold", FOLD, "--epochs", str(epochs), *_extra(config, "train"), *_extra(config, kind, arch), "--workers", str(workers), "--resume-if-exists"]


def _brats_archs(config: Mapping[str, Any]) -> list[str]:
    """Architectures some arm fine-tunes from BraTS, in the order of ``architectures``."""
    wanted = {config["isles"]["pretrain_arch"]} if any(init != "scratch" for _, init in config["isles"]["arms"]) else set()
    if config["stroke"]["datasets"] and any(arm != "scratch" for arm in config["stroke"]["arms"]):
        wanted |= set(config["architectures"])
    return [arch for arch in config["architectures"] if arch in wanted]


def _per_case(name: str, script: str, args: list[str], res: Resources, summaries: list[Path], needs: tuple[str, ...] = ()) -> Stage:
    return Stage(name, script, (*args, "--workers", str(res.cpus)), res, "summaries", tuple(map(str, summaries)), needs=needs)


def _preprocessing(config: Mapping[str, Any], base: Path, work: Path) -> list[Stage]:
    """ISLES (training and evaluation), BraTS and foundation preprocessing, then patches."""
    res, data, stages = _resources(config, "preprocess"), config["data"], []
    if config["isles"]["arms"]:
        isles_in = ["--isles-dir", str(base / data["isles"]), *_extra(config, "preprocess_isles")]
        for name, folder in (("preprocess_v2_isles", "isles_train"), ("preprocess_isles_WITH_BBOX", "isles_eval")):
            out = work / FOLDERS[folder]
            stages.append(_per_case(name, f"{name}.py", [*isles_in, "--output-dir", str(out)], res, [out / "preprocessing_summary.json"]))
    if _brats_archs(config):
        out = work / FOLDERS["brats"]
        args = ["--brats-dir", str(base / data["brats"]), "--output-dir", str(out), *_extra(config, "preprocess_brats")]
        stages.append(_per_case("preprocess_brats2024_t2flair", "preprocess_brats2024_t2flair.py", args, res, [out / "preprocessing_summary.json"]))
    datasets = list(config["stroke"]["datasets"])
    if datasets:
        out = work / FOLDERS["foundation"]
        args = ["--config", str(base / data["foundation_config"]), "--output-base-dir", str(out), "--datasets", *datasets, *_extra(config, "preprocess_foundation")]
        stages.append(_per_case("preprocess_stroke_foundation", "preprocess_stroke_foundation.py", args, res, [out / d / f"{d}_summary.json" for d in datasets]))
        stages += _patch_stages(config, out, datasets)
    return stages


def _patch_stages(config: Mapping[str, Any], foundation: Path, datasets: list[str]) -> list[Stage]:
    """One patch extraction per patch size of the architectures (the paper's two commands)."""
    res, stages = _resources(config, "extract_patches"), {}
    for spec in config["architectures"].values():
        size = int(spec["patch_size"])
        args = ["--input_dir", str(foundation), "--output_dir", str(foundation), "--datasets", *datasets, "--patch_size", str(size),
                "--min_lesion_overlap", str(spec["min_lesion_overlap"]), *_extra(config, "extract_patches")]
        summaries = [foundation / f"{d}_patches_{size}" / f"{d}_{size}_summary.json" for d in datasets]
        stage = _per_case(f"extract_patches_{size}", "extract_patches_96x96x96.py", args, res, summaries, ("preprocess_stroke_foundation",))
        if stages.setdefault(size, stage) != stage:
            raise ValueError(f"architectures share patch size {size} but differ in min_lesion_overlap")
    return list(stages.values())


def _training(config: Mapping[str, Any], kind: str, arch: str, run: Path, script: str, args: list[str], needs: tuple[str, ...], needs_fold: tuple[str, ...]) -> Stage:
    """A per-fold training stage named ``train_<run folder>``."""
    res = _resources(config, kind)
    epochs = int(_per_arch(config, "epochs", kind, arch, None))
    return Stage(f"train_{run.name}", script, (*args, *_training_args(config, kind, arch, res, epochs)), res, "training", (str(run),),
                 tuple(config["folds"]), needs, needs_fold, epochs)


def _pretrained(runs: Path, arch: str) -> str:
    """The BraTS checkpoint a fold fine-tunes from: the same fold (the paper's pairing)."""
    return str(runs / f"brats_{arch}" / f"fold_{FOLD}" / "best_model.pth")


def _brats_training(config: Mapping[str, Any], work: Path) -> list[Stage]:
    runs, data = work / FOLDERS["runs"], work / FOLDERS["brats"]
    stages = []
    for arch in _brats_archs(config):
        run = runs / f"brats_{arch}"
        args = ["--brats-dir", str(data), "--output-dir", str(run), "--arch", arch, "--patch-size", str(config["architectures"][arch]["patch_size"])]
        stages.append(_training(config, "train_brats", arch, run, "train_brats_uctransnet3d.py", args, ("preprocess_brats2024_t2flair",), ()))
    return stages


def _isles_training(config: Mapping[str, Any], work: Path) -> dict[str, Stage]:
    """The ISLES strategies x inits by label ``<strategy>_<init>``; a BraTS-initialised arm's
    fold k needs BraTS fold k."""
    runs, arch, stages = work / FOLDERS["runs"], config["isles"]["pretrain_arch"], {}
    for strategy, init in config["isles"]["arms"]:
        run = runs / f"isles_{strategy}_{init}"
        pretrained = init != "scratch"
        init_args = ["--init", init, *(["--pretrain-ckpt", _pretrained(runs, arch)] if pretrained else [])]
        args = ["--isles-dir", str(work / FOLDERS["isles_train"]), "--output-dir", str(run), "--strategy", strategy, *init_args]
        needs_fold = (f"train_brats_{arch}",) if pretrained else ()
        stages[f"{strategy}_{init}"] = _training(config, "train_isles", arch, run, "train_isles_resnet18.py", args, ("preprocess_v2_isles",), needs_fold)
    return stages


def _stroke_training(config: Mapping[str, Any], work: Path, dataset: str) -> dict[str, Stage]:
    """Architectures x arms on ATLAS or UOA by label ``<arch>_<arm>``; a transfer arm's fold k
    needs BraTS fold k."""
    runs, foundation, stages = work / FOLDERS["runs"], work / FOLDERS["foundation"], {}
    for arch, spec in config["architectures"].items():
        for arm in config["stroke"]["arms"]:
            run = runs / f"{dataset.lower()}_{arch}_{arm}"
            pretrained = arm != "scratch"
            args = ["--dataset", dataset, "--data-dir", str(foundation), "--arch", arch, "--output-dir", str(run), "--patch-size", str(spec["patch_size"])]
            args += ["--pretrain-ckpt", _pretrained(runs, arch)] if pretrained else []
            needs = ("preprocess_stroke_foundation", f"extract_patches_{spec['patch_size']}")
            stages[f"{arch}_{arm}"] = _training(config, "train_stroke", arch, run, "train_stroke.py", args, needs, (f"train_brats_{arch}",) if pretrained else ())
    return stages


def _evaluation(config: Mapping[str, Any], work: Path, dataset: str, runs: Mapping[str, Stage], data_args: list[str], data_stage: str) -> Stage:
    """``evaluate.py`` of one dataset over its runs (``--run label=folder``), with the grid's
    ``compare`` pairs of that dataset; needs every fold of every run and ``data_stage``."""
    out = work / FOLDERS["results"] / dataset
    run_args = [arg for label, stage in runs.items() for arg in ("--run", f"{label}={stage.outputs[0]}")]
    compare_args = [arg for pair in config.get("compare", {}).get(dataset, []) for arg in ("--compare", *pair)]
    args = ["--dataset", dataset, *data_args, *run_args, *compare_args, *_extra(config, "evaluate"), "--output-dir", str(out)]
    needs = (data_stage, *(stage.name for stage in runs.values()))
    return Stage(f"evaluate_{dataset}", "evaluate.py", tuple(args), _resources(config, "evaluate"), "evaluation", (str(out / "summary.json"),), needs=needs)


def build_plan(config: Mapping[str, Any], base: Path, config_path: Path) -> Plan:
    """The plan of an ablation grid (the ``ablation.json`` schema); relative paths in it are
    relative to ``base``. Stage order: preprocessing, BraTS pretraining, ISLES arms and their
    evaluation, then per stroke dataset its arms and evaluation."""
    work = base / config["work_dir"]
    stages = _preprocessing(config, base, work) + _brats_training(config, work)
    isles = _isles_training(config, work)
    if isles:
        isles_data = ["--data-dir", str(work / FOLDERS["isles_eval"]), "--splits-file", str(work / FOLDERS["isles_train"] / "isles2022_splits_5fold.json")]
        stages += [*isles.values(), _evaluation(config, work, "ISLES2022", isles, isles_data, "preprocess_isles_WITH_BBOX")]
    for dataset in config["stroke"]["datasets"]:
        runs = _stroke_training(config, work, dataset)
        data_args = ["--data-dir", str(work / FOLDERS["foundation"])]
        stages += [*runs.values(), _evaluation(config, work, dataset, runs, data_args, "preprocess_stroke_foundation")]
    check_order(stages)
    return Plan(tuple(stages), work, config_path)


def load_plan(path: str | os.PathLike) -> Plan:
    """:func:`build_plan` of the JSON file ``path``; ValueError naming the file and the missing
    or invalid entry when the grid is malformed."""
    path = Path(path).resolve()
    config = read_json(path)
    try:
        return build_plan(config, path.parent, path)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: invalid ablation grid ({type(err).__name__}: {err})") from err


# --------------------------------------------------------------------------- local executor


@dataclass
class _Running:
    task: Task
    process: subprocess.Popen
    log: Any
    started: float
    cpus: int
    gpus: list[int]


def _launch(task: Task, logs: Path, cpus: int, gpus: list[int] | None, python: str) -> _Running:
    """Start ``task`` with ``cpus`` threads (OMP_NUM_THREADS) and, on a GPU machine, only the
    GPUs ``gpus`` visible; output appended to ``logs/<task key>.log``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(cpus))
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    log = open(logs / f"{task.key}.log", "a")
    process = subprocess.Popen(command(task, python), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    return _Running(task, process, log, time.perf_counter(), cpus, gpus or [])


def _pending(plan: Plan) -> tuple[list[Task], set[str]]:
    """Split the plan's tasks into those still to run and the keys of those already complete."""
    todo, done = [], set()
    for task in plan.tasks():
        if is_complete(task):
            done.add(task.key)
            get_logger().info(f"{task.key}: outputs complete, skipped")
        else:
            todo.append(task)
    return todo, done


def run_local(plan: Plan, cpus: int, gpus: int = 0, python: str = sys.executable) -> int:
    """Run the plan's incomplete tasks here, each as a subprocess from the repository root: a
    task starts once the tasks it needs are done and its CPUs (and GPUs) are free, ready tasks in
    plan order (a task asking for more than ``cpus``/``gpus`` gets them all). After a failure nothing new
    starts; the running tasks finish. Returns 0 when every task is complete, else 1 (the log
    names the failed task's log file)."""
    log, logs = get_logger(), plan.work_dir / FOLDERS["logs"]
    logs.mkdir(parents=True, exist_ok=True)
    todo, done = _pending(plan)
    running: list[_Running] = []
    free_cpus, free_gpus, failed = cpus, list(range(gpus)), []
    while todo or running:
        for task in [t for t in todo if all(need.key in done for need in plan.needs(t))] if not failed else []:
            want_cpus, want_gpus = min(task.stage.resources.cpus, cpus), min(task.stage.resources.gpus, gpus)
            if want_cpus > free_cpus or want_gpus > len(free_gpus):
                break  # no task overtakes a ready one that waits for resources
            share, free_gpus, free_cpus = free_gpus[:want_gpus], free_gpus[want_gpus:], free_cpus - want_cpus
            todo.remove(task)
            running.append(_launch(task, logs, want_cpus, share if gpus else None, python))
        time.sleep(0.2)
        for entry in [e for e in running if e.process.poll() is not None]:
            entry.log.close()
            running.remove(entry)
            free_cpus, free_gpus = free_cpus + entry.cpus, free_gpus + entry.gpus
            status = entry.process.returncode
            log.info(f"{entry.task.key}: exit {status} ({time.perf_counter() - entry.started:.0f} s)")
            if status == 0:
                done.add(entry.task.key)
            else:
                failed.append(entry.task)
        if failed and not running:
            break
    for task in failed:
        log.info(f"FAILED {task.key}; see {logs / (task.key + '.log')}")
    return 1 if failed else 0


# --------------------------------------------------------------------------- SLURM executor


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


def _sbatch_script(stage: Stage, plan: Plan, python: str) -> str:
    """One stage's sbatch script: an array over its folds (``$SLURM_ARRAY_TASK_ID`` is the
    fold), the requeue wrapper, and torchrun for more than one GPU. Runs under plain bash too."""
    res, logs = stage.resources, plan.work_dir / FOLDERS["logs"]
    head = [f"#!/bin/bash\n# {stage.name}: {stage.script}, planned by strokeseg.ablation from {plan.config}",
            f"#SBATCH --job-name={stage.name}"]
    if stage.folds:
        head.append(f"#SBATCH --array={','.join(map(str, stage.folds))}")
    if res.gpus:
        head.append(f"#SBATCH --gres=gpu:{res.gpus}")
    head += [f"#SBATCH --cpus-per-task={res.cpus}", f"#SBATCH --mem={res.memory}", f"#SBATCH --time={res.time}",
             "#SBATCH --requeue", "#SBATCH --signal=B:USR1@120", "#SBATCH --open-mode=append",
             f"#SBATCH --output={logs}/%x_{'%A_%a' if stage.folds else '%j'}.out", "set -euo pipefail", f"cd {shlex.quote(str(REPO))}",
             f"PYTHON=${{PYTHON:-{shlex.quote(python)}}}"]
    if stage.folds:
        head.append('FOLD=${SLURM_ARRAY_TASK_ID:?"run as an array task (sbatch) or set SLURM_ARRAY_TASK_ID to the fold"}')
    launcher = '"$PYTHON"' + (f" -m torch.distributed.run --standalone --nproc_per_node {res.gpus}" if res.gpus > 1 else "")
    return "\n".join(head) + f"\nslurm/requeue.sh {launcher} {_shell_args([stage.script, *stage.args])}\n"


SUBMIT_HEAD = r'''#!/bin/bash
# Submit the ablation planned from {config}: every task whose outputs are not complete, in plan
# order. A per-fold stage is submitted as one job per fold (sbatch --array=<fold>): SLURM gives a
# whole array one --dependency, so only one job per fold lets fold k wait for the fold-k jobs it
# needs and nothing else (--dependency=afterok:<ids>). Complete tasks are not submitted and
# their dependants do not wait for them, so re-submitting after a partial run continues it.
# Prints one line per job: "<task>: job <id> [after <ids>]".
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
cd {repo}
PYTHON=${{PYTHON:-{python}}}
mkdir -p {logs}
PENDING=$("$PYTHON" -m strokeseg.ablation --config {config} --pending)
declare -A JOB=()
submit() {{  # submit TASK SCRIPT FOLD|- NEEDED_TASK...
    local task=$1 script=$2 fold=$3 need ids=() id
    shift 3
    if ! grep -qxF "$task" <<<"$PENDING"; then echo "$task: complete, not submitted"; return 0; fi
    for need in "$@"; do
        if [ -n "${{JOB[$need]:-}}" ]; then ids+=("${{JOB[$need]}}"); fi
    done
    local options=(--parsable --kill-on-invalid-dep=yes)
    if [ "$fold" != - ]; then options+=("--array=$fold"); fi
    if [ ${{#ids[@]}} -gt 0 ]; then options+=("--dependency=afterok:$(IFS=:; echo "${{ids[*]}}")"); fi
    id=$(sbatch "${{options[@]}}" "$HERE/$script")
    JOB[$task]=${{id%%;*}}
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
            needs = " ".join(need.key for need in plan.needs(task))
            lines.append(f"submit {task.key} {path.name} {'-' if fold is None else fold}{' ' + needs if needs else ''}")
    values = {"config": plan.config, "repo": REPO, "python": python, "logs": plan.work_dir / FOLDERS["logs"]}
    head = SUBMIT_HEAD.format(**{key: shlex.quote(str(value)) for key, value in values.items()})
    submit = out_dir / "submit.sh"
    write_text(submit, head + "\n".join(lines) + "\n")
    submit.chmod(0o755)
    return [*written, submit]


# --------------------------------------------------------------------------- command line


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
    action.add_argument("--emit-slurm", type=Path, metavar="DIR", help="write one sbatch script per stage and DIR/submit.sh")
    action.add_argument("--pending", action="store_true", help="print the keys of the tasks whose outputs are not complete, one a line")
    parser.add_argument("--cpus", type=int, default=cpu_count(), help="--run: CPU cores to share between tasks (default: all of this machine's)")
    parser.add_argument("--gpus", type=int, default=None, help="--run: GPUs to share between tasks (default: all CUDA devices)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        plan = load_plan(args.config)
    except (CaseError, ValueError) as err:
        print(f"ERROR {err}", file=sys.stderr)
        return 2
    if args.pending:
        print("\n".join(task.key for task in plan.tasks() if not is_complete(task)))
        return 0
    if args.emit_slurm:
        written = emit_slurm(plan, args.emit_slurm)
        print(f"{len(written) - 1} sbatch scripts in {args.emit_slurm}; submit with: bash {written[-1]}")
        return 0
    if args.run:
        gpus = args.gpus if args.gpus is not None else torch.cuda.device_count()
        return run_local(plan, args.cpus, gpus)
    print(describe(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
