"""The ablation plan as data: stages, tasks, their dependencies and commands, built from the
grid (``ablation.json``) and the stages' declarations (:mod:`strokeseg.stages`: each script's
flags, outputs and settings record), and when a task is complete: its outputs say so
(:func:`is_complete`), its record (:func:`record_path`) holds the settings the grid now gives it
and the stage's own record of its settings agrees (:func:`task_state`).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import models

from ..core.io import CaseError, changed_inputs, file_fingerprints, read_json
from ..evaluation.engine import evaluation_problems
from ..datasets.registry import dataset_spec
from ..stages import BEST_CHECKPOINT, FOLD, REDO_FLAG, RUN_ONLY, STAGES, StageDecl
from .grid import PLACEHOLDER, validate_grid

__all__ = ["FOLD", "FOLDERS", "REPO", "Resources", "Stage", "Task", "Plan", "build_plan", "load_plan", "input_problems", "is_complete",
           "task_state", "task_record", "record_text", "record_path", "command", "settings_mismatches"]

REPO = Path(__file__).resolve().parents[2]


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
    A planned stage is made from its script's declaration ``decl`` (:data:`strokeseg.stages.STAGES`)
    and ``settings`` (flag dest -> value): args, done and outputs come from them, and the stage's
    own settings record is checked against them (:func:`settings_mismatches`).
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
    settings: Mapping[str, Any] = field(default_factory=dict, hash=False)
    decl: StageDecl | None = field(default=None, hash=False)

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
    outputs and ``logs/``; config is the ablation JSON the plan was built from; inputs: the
    data paths its stages read (checked by :func:`input_problems` before a local run)."""

    stages: tuple[Stage, ...]
    work_dir: Path
    config: Path
    inputs: tuple[Path, ...] = ()

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
    if not (fold_dir / BEST_CHECKPOINT).is_file() or not (fold_dir / "last.pth").is_file():
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


# --------------------------------------------------------------------------- what made a task complete

def settings_args(argv: Sequence[str]) -> list[str]:
    """``argv`` less the flags of :data:`RUN_ONLY` (and their values)."""
    kept, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
        elif arg in RUN_ONLY:
            skip = RUN_ONLY[arg]
        else:
            kept.append(arg)
    return kept


def task_record(plan: Plan, task: Task) -> dict[str, Any]:
    """What a complete ``task`` was made with: script, resolved arguments (less run-only flags;
    the evaluation's include its ``--compare`` pairs), epochs, and a digest of the record of
    every task it needs, so a redone input makes its dependants stale too."""
    needs = {need.key: hashlib.sha256(record_text(plan, need).encode()).hexdigest()[:16] for need in plan.needs(task)}
    return {"task": task.key, "script": task.stage.script, "args": settings_args(task.stage.argv(task.fold)), "epochs": task.stage.epochs, "needs": needs}


def record_text(plan: Plan, task: Task) -> str:
    """:func:`task_record` as the one line of JSON written to :func:`record_path`."""
    return json.dumps(task_record(plan, task), sort_keys=True) + "\n"


def record_path(task: Task) -> Path:
    """``<task key>.plan.json`` beside the task's outputs (a training task's: in its fold folder)."""
    if task.stage.done == "training":
        return Path(task.stage.outputs[0]) / f"fold_{task.fold}" / f"{task.key}.plan.json"
    return Path(task.stage.outputs[0].replace(FOLD, str(task.fold))).parent / f"{task.key}.plan.json"


def settings_mismatches(task: Task) -> list[str]:
    """Where the stage's own settings records (its run_args.json, :meth:`StageDecl.mismatches`)
    disagree with the settings the plan gives ``task``; empty for an undeclared stage."""
    return task.stage.decl.mismatches(task.stage.settings, task.fold) if task.stage.decl else []


def task_state(plan: Plan, task: Task) -> str:
    """``"complete"``: outputs complete (:func:`is_complete`), recorded with the grid's current
    settings, and the stage's own records agree (:func:`settings_mismatches`); ``"stale"``:
    outputs recorded (by the plan or the stage) with other settings (its redo passes
    ``--overwrite``); ``"pending"``: otherwise (not run, unfinished, or finished without a record)."""
    if settings_mismatches(task):
        return "stale"
    try:
        recorded = record_path(task).read_text()
    except OSError:
        return "pending"
    if recorded != record_text(plan, task):
        return "stale"
    return "complete" if is_complete(task) else "pending"


def command(task: Task, python: str = sys.executable, redo: bool = False) -> list[str]:
    """The command line of ``task``, run from the repository root (torchrun for > 1 GPU);
    ``redo``: with ``--overwrite`` instead of ``--resume-if-exists`` (a stale task)."""
    gpus = task.stage.resources.gpus
    launcher = [python] if gpus <= 1 else [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus)]
    argv = task.stage.argv(task.fold)
    if redo:
        argv = [arg for arg in argv if arg != "--resume-if-exists"] + [REDO_FLAG]
    return [*launcher, task.stage.script, *argv]


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


def _declared(name: str, script: str, settings: Mapping[str, Any], extra: Sequence[str], res: Resources, **plan: Any) -> Stage:
    """The stage ``name`` of ``script``'s declaration (:data:`strokeseg.stages.STAGES`) with
    ``settings`` (flag dest -> value) and the grid's ``extra`` arguments; ``plan``: folds,
    needs, needs_fold, epochs."""
    decl = STAGES[script]
    return Stage(name, script, decl.argv(settings, extra), res, decl.done, decl.outputs(settings), settings=dict(settings), decl=decl, **plan)


def _brats_archs(config: Mapping[str, Any]) -> list[str]:
    """Architectures some arm fine-tunes from BraTS, in the order of ``architectures``."""
    wanted = {config["isles"]["pretrain_arch"]} if any(init != "scratch" for _, init in config["isles"]["arms"]) else set()
    if config["stroke"]["datasets"] and any(arm != "scratch" for arm in config["stroke"]["arms"]):
        wanted |= set(config["architectures"])
    return [arch for arch in config["architectures"] if arch in wanted]


def _per_case(name: str, script: str, settings: dict[str, Any], extra: list[str], res: Resources, needs: tuple[str, ...] = ()) -> Stage:
    """A per-case stage of ``script``, with ``--workers`` its CPUs."""
    return _declared(name, script, {**settings, "workers": res.cpus}, extra, res, needs=needs)


def _preprocessing(config: Mapping[str, Any], base: Path, work: Path) -> list[Stage]:
    """ISLES (training and evaluation), BraTS and foundation preprocessing, then patches."""
    res, data, stages = _resources(config, "preprocess"), config["data"], []
    if config["isles"]["arms"]:
        for name, folder in (("preprocess_v2_isles", "isles_train"), ("preprocess_isles_WITH_BBOX", "isles_eval")):
            settings = {"isles_dir": str(base / data["isles"]), "output_dir": str(work / FOLDERS[folder])}
            stages.append(_per_case(name, f"{name}.py", settings, _extra(config, "preprocess_isles"), res))
    if _brats_archs(config):
        settings = {"brats_dir": str(base / data["brats"]), "output_dir": str(work / FOLDERS["brats"])}
        stages.append(_per_case("preprocess_brats2024_t2flair", "preprocess_brats2024_t2flair.py", settings, _extra(config, "preprocess_brats"), res))
    datasets = list(config["stroke"]["datasets"])
    if datasets:
        foundation = work / FOLDERS["foundation"]
        settings = {"config": str(base / data["foundation_config"]), "output_base_dir": str(foundation), "datasets": datasets}
        stages.append(_per_case("preprocess_stroke_foundation", "preprocess_stroke_foundation.py", settings, _extra(config, "preprocess_foundation"), res))
        stages += _patch_stages(config, foundation, datasets)
    return stages


def _patch_stages(config: Mapping[str, Any], foundation: Path, datasets: list[str]) -> list[Stage]:
    """One patch extraction per patch size of the architectures (the paper's two commands)."""
    res, stages = _resources(config, "extract_patches"), {}
    for spec in config["architectures"].values():
        size = int(spec["patch_size"])
        settings = {"input_dir": str(foundation), "output_dir": str(foundation), "datasets": datasets,
                    "patch_size": size, "min_lesion_overlap": spec["min_lesion_overlap"]}
        stage = _per_case(f"extract_patches_{size}", "extract_patches_96x96x96.py", settings, _extra(config, "extract_patches"), res, ("preprocess_stroke_foundation",))
        if stages.setdefault(size, stage) != stage:
            raise ValueError(f"architectures share patch size {size} but differ in min_lesion_overlap")
    return list(stages.values())


def _training(config: Mapping[str, Any], kind: str, arch: str, script: str, settings: Mapping[str, Any], needs: tuple[str, ...], needs_fold: tuple[str, ...]) -> Stage:
    """A per-fold training stage named ``train_<run folder>``: ``settings`` plus what every
    training task gets (fold, epochs, DataLoader workers: the task's CPUs less one per GPU rank,
    resuming) and the grid's extra flags (all training, then this kind's)."""
    res = _resources(config, kind)
    epochs = int(_per_arch(config, "epochs", kind, arch, None))
    run = dict(settings, fold=FOLD, epochs=epochs, workers=max(res.cpus // max(res.gpus, 1) - 1, 0), resume_if_exists=True)
    extra = [*_extra(config, "train"), *_extra(config, kind, arch)]
    return _declared(f"train_{Path(settings['output_dir']).name}", script, run, extra, res,
                     folds=tuple(config["folds"]), needs=needs, needs_fold=needs_fold, epochs=epochs)


def _pretrained(runs: Path, arch: str) -> str:
    """The BraTS checkpoint a fold fine-tunes from: the same fold (the paper's pairing)."""
    return str(runs / f"brats_{arch}" / f"fold_{FOLD}" / BEST_CHECKPOINT)


def _brats_training(config: Mapping[str, Any], work: Path) -> list[Stage]:
    runs, data = work / FOLDERS["runs"], work / FOLDERS["brats"]
    stages = []
    for arch in _brats_archs(config):
        settings = {"brats_dir": str(data), "output_dir": str(runs / f"brats_{arch}"), "arch": arch, "patch_size": config["architectures"][arch]["patch_size"]}
        stages.append(_training(config, "train_brats", arch, "train_brats_uctransnet3d.py", settings, ("preprocess_brats2024_t2flair",), ()))
    return stages


def _isles_training(config: Mapping[str, Any], work: Path) -> dict[str, Stage]:
    """The ISLES strategies x inits by label ``<strategy>_<init>``; a BraTS-initialised arm's
    fold k needs BraTS fold k."""
    runs, arch, stages = work / FOLDERS["runs"], config["isles"]["pretrain_arch"], {}
    for strategy, init in config["isles"]["arms"]:
        pretrained = init != "scratch"
        settings = {"isles_dir": str(work / FOLDERS["isles_train"]), "output_dir": str(runs / f"isles_{strategy}_{init}"), "strategy": strategy,
                    "init": init, "pretrain_ckpt": _pretrained(runs, arch) if pretrained else None}
        needs_fold = (f"train_brats_{arch}",) if pretrained else ()
        stages[f"{strategy}_{init}"] = _training(config, "train_isles", arch, "train_isles_resnet18.py", settings, ("preprocess_v2_isles",), needs_fold)
    return stages


def _stroke_training(config: Mapping[str, Any], work: Path, dataset: str) -> dict[str, Stage]:
    """Architectures x arms on ATLAS or UOA by label ``<arch>_<arm>``; a transfer arm's fold k
    needs BraTS fold k."""
    runs, foundation, stages = work / FOLDERS["runs"], work / FOLDERS["foundation"], {}
    for arch, spec in config["architectures"].items():
        for arm in config["stroke"]["arms"]:
            pretrained = arm != "scratch"
            settings = {"dataset": dataset, "data_dir": str(foundation), "arch": arch, "output_dir": str(runs / f"{dataset.lower()}_{arch}_{arm}"),
                        "patch_size": spec["patch_size"], "pretrain_ckpt": _pretrained(runs, arch) if pretrained else None}
            needs = ("preprocess_stroke_foundation", f"extract_patches_{spec['patch_size']}")
            stages[f"{arch}_{arm}"] = _training(config, "train_stroke", arch, "train_stroke.py", settings, needs, (f"train_brats_{arch}",) if pretrained else ())
    return stages


def _evaluation(config: Mapping[str, Any], work: Path, dataset: str, runs: Mapping[str, Stage], data: Mapping[str, str], data_stage: str) -> Stage:
    """``evaluate.py`` of one dataset (``data``: its data_dir, splits_file) over its runs
    (``--run label=folder``), with the grid's ``compare`` pairs of that dataset; needs every fold
    of every run and ``data_stage``."""
    settings = {"dataset": dataset, **data, "run": [f"{label}={stage.outputs[0]}" for label, stage in runs.items()],
                "compare": [list(pair) for pair in config.get("compare", {}).get(dataset, [])], "output_dir": str(work / FOLDERS["results"] / dataset)}
    needs = (data_stage, *(stage.name for stage in runs.values()))
    return _declared(f"evaluate_{dataset}", "evaluate.py", settings, _extra(config, "evaluate"), _resources(config, "evaluate"), needs=needs)


def build_plan(config: Mapping[str, Any], base: Path, config_path: Path) -> Plan:
    """The plan of an ablation grid (the ``ablation.json`` schema); relative paths in it are
    relative to ``base``. Stage order: preprocessing, BraTS pretraining, ISLES arms and their
    evaluation, then per stroke dataset its arms and evaluation."""
    work = base / config["work_dir"]
    stages = _preprocessing(config, base, work) + _brats_training(config, work)
    isles = _isles_training(config, work)
    if isles:
        isles_data = {"data_dir": str(work / FOLDERS["isles_eval"]), "splits_file": str(work / FOLDERS["isles_train"] / dataset_spec("ISLES2022").splits_name)}
        stages += [*isles.values(), _evaluation(config, work, "ISLES2022", isles, isles_data, "preprocess_isles_WITH_BBOX")]
    for dataset in config["stroke"]["datasets"]:
        runs = _stroke_training(config, work, dataset)
        stages += [*runs.values(), _evaluation(config, work, dataset, runs, {"data_dir": str(work / FOLDERS["foundation"])}, "preprocess_stroke_foundation")]
    check_order(stages)
    data, used = config["data"], {"isles": bool(isles), "brats": bool(_brats_archs(config)), "foundation_config": bool(config["stroke"]["datasets"])}
    return Plan(tuple(stages), work, config_path, tuple(base / data[key] for key, needed in used.items() if needed))


def load_plan(path: str | os.PathLike) -> Plan:
    """:func:`build_plan` of the JSON file ``path``, validated completely first
    (:func:`strokeseg.ablation.grid.validate_grid`); ValueError naming the file and the invalid key."""
    path = Path(path).resolve()
    config = read_json(path)
    try:
        validate_grid(config)
        return build_plan(config, path.parent, path)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: invalid ablation grid: {err}") from err


def input_problems(plan: Plan) -> tuple[list[str], list[str]]:
    """Why the plan cannot run, checked before anything is created: its placeholder paths of the
    shipped grid (work_dir or data), and its inputs that do not exist (here)."""
    placeholders = [f"{path}: placeholder path; set it in {plan.config}" for path in (plan.work_dir, *plan.inputs) if str(path).startswith(PLACEHOLDER)]
    missing = [f"{path}: input not found (set in {plan.config})" for path in plan.inputs if not str(path).startswith(PLACEHOLDER) and not path.exists()]
    return placeholders, missing
