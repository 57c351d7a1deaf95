"""The paper's stage scripts, declared once: the flags a plan passes to each, the outputs each
writes as a function of its settings, and the record of its settings (``run_args.json``) that
those outputs can be checked against.

A stage's *settings* are a mapping from a flag's ``dest`` (the name in the script's parsed
arguments, and so in its ``run_args.json`` "args") to its value: a string, number, list (a flag
of several values, e.g. ``--datasets``), a list of items for a repeated flag (``--run``,
``--compare``), True for a switch, None or absent for a flag not given. ``{fold}`` (:data:`FOLD`)
in a string stands for the fold of a per-fold stage. The ablation plan
(:mod:`strokeseg.ablation`) builds every command, output path and completeness check from
these declarations; a flag the plan passes that a script renames is changed here only
(``tests/test_ablation_declared.py`` parses every planned command with the script's own parser).

Example: the ISLES training of fold 0 from BraTS::

    settings = {"isles_dir": "pre", "output_dir": "runs/isles", "strategy": "shared", "init": "brats",
                "pretrain_ckpt": "runs/brats/fold_{fold}/best_model.pth", "fold": FOLD, "epochs": 100,
                "workers": 7, "resume_if_exists": True}
    STAGES["train_isles_resnet18.py"].argv(settings)       # --isles-dir pre --output-dir ... --resume-if-exists
    STAGES["train_isles_resnet18.py"].mismatches(settings, 0)  # [] unless runs/isles/fold_0/run_args.json disagrees
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .core.io import CaseError, read_json
from .datasets.registry import RUN_ARGS_NAME
from .training.patch_stage import patch_dir_name, patch_summary_name

__all__ = ["FOLD", "RUN_ONLY", "REDO_FLAG", "BEST_CHECKPOINT", "MISMATCH_EXIT", "Flag", "StageDecl", "STAGES", "with_fold", "main"]

FOLD = "{fold}"  # stands for the fold in a per-fold stage's settings
RUN_ONLY = {"--workers": 1, "--resume-if-exists": 0, "--overwrite": 0}  # flag -> values: how a task runs, not what it makes
REDO_FLAG = "--overwrite"  # every stage script's flag to redo outputs made with other settings
BEST_CHECKPOINT = "best_model.pth"  # a training stage's best model in <output-dir>/fold_<k>/
MISMATCH_EXIT = 3  # ``python -m strokeseg.stages --check``: the stage's records disagree with the settings


@dataclass(frozen=True)
class Flag:
    """One flag a plan passes: ``name`` on the command line, ``dest`` in the script's parsed
    arguments (and its run_args.json); ``repeat``: given once per item of a list value (argparse
    ``action="append"``), each item one value or a list of values."""

    name: str
    dest: str
    repeat: bool = False

    def words(self, value: Any) -> list[str]:
        """The command-line words of ``value``: none for None or False, the flag alone for True."""
        if value is None or value is False:
            return []
        if value is True:
            return [self.name]
        items = value if self.repeat else [value]
        return [word for item in items for word in (self.name, *_values(item))]


def _values(item: Any) -> list[str]:
    return [str(v) for v in item] if isinstance(item, (list, tuple)) else [str(item)]


def with_fold(value: Any, fold: int | None) -> Any:
    """``value`` with :data:`FOLD` in its strings (also inside lists) replaced by ``fold``."""
    if isinstance(value, str):
        return value.replace(FOLD, str(fold))
    if isinstance(value, (list, tuple)):
        return [with_fold(v, fold) for v in value]
    return value


def _same(planned: Any, recorded: Any) -> bool:
    """Whether a planned value is what a script recorded after parsing it: numbers compare as
    numbers (``"0.01"`` and 0.01, ``"0"`` and 0.0), paths and names as text, lists item by item."""
    if isinstance(planned, (list, tuple)):
        return isinstance(recorded, list) and len(planned) == len(recorded) and all(map(_same, planned, recorded))
    if isinstance(recorded, bool) or recorded is None or isinstance(planned, bool):
        return planned == recorded
    if isinstance(recorded, (int, float)):
        try:
            return float(planned) == recorded
        except (TypeError, ValueError):
            return False
    return str(planned) == str(recorded)


Paths = Callable[[Mapping[str, Any]], tuple[str, ...]]


@dataclass(frozen=True)
class StageDecl:
    """One stage script as the plan sees it.

    script: the file at the repository root; flags: those the plan passes, in command-line
    order; extra_before: the flag before which the grid's free extra arguments go (None: last);
    done: how completeness is read from the outputs (``"summaries"``: each output a summary JSON
    with ``n_failed`` 0; ``"training"``: the output is the run folder with
    ``fold_<k>/best_model.pth`` and a final ``last.pth``; ``"evaluation"``: evaluate.py's
    summary.json of unchanged inputs); outputs / recorded: settings -> the output paths and the
    ``run_args.json`` files the stage writes (strings, ``{fold}`` kept).
    """

    script: str
    flags: tuple[Flag, ...]
    done: str
    outputs: Paths
    recorded: Paths
    extra_before: str | None = None

    def argv(self, settings: Mapping[str, Any], extra: Sequence[str] = ()) -> tuple[str, ...]:
        """The arguments of ``settings`` (an unknown dest is a ValueError), ``extra`` inserted
        before :attr:`extra_before`."""
        unknown = sorted(set(settings) - {flag.dest for flag in self.flags})
        if unknown:
            raise ValueError(f"{self.script}: no declared flag for {', '.join(unknown)}")
        words: list[str] = []
        for flag in self.flags:
            if flag.name == self.extra_before:
                words += extra
            words += flag.words(settings.get(flag.dest))
        if self.extra_before not in {flag.name for flag in self.flags}:
            words += extra
        return tuple(words)

    def mismatches(self, settings: Mapping[str, Any], fold: int | None) -> list[str]:
        """How the stage's own records (its run_args.json files, where they exist) disagree with
        ``settings`` for ``fold``: one line per setting recorded otherwise. Run-only flags
        (:data:`RUN_ONLY`), flags not given and settings an older record lacks are not compared;
        an unreadable record is one line."""
        compared = [f for f in self.flags if f.name not in RUN_ONLY and settings.get(f.dest) not in (None, False)]
        problems = []
        for path in (Path(with_fold(p, fold)) for p in self.recorded(settings)):
            if not path.is_file():
                continue
            try:
                recorded = read_json(path).get("args", {})
            except (CaseError, AttributeError):
                problems.append(f"{path}: unreadable record of the stage's settings")
                continue
            for flag in compared:
                planned = with_fold(settings[flag.dest], fold)
                if flag.dest in recorded and not _same(planned, recorded[flag.dest]):
                    problems.append(f"{path}: {flag.name} was {recorded[flag.dest]!r}, the plan asks {planned!r}")
        return problems


# --------------------------------------------------------------------------- output paths


def _in(dest: str, *names: str) -> Paths:
    """settings -> ``<settings[dest]>/<names...>``."""
    return lambda settings: (str(Path(settings[dest], *names)),)


def _foundation_files(name: str) -> Paths:
    """settings -> ``<output_base_dir>/<D>/<name>`` per dataset D (``{D}`` in name: the dataset)."""
    return lambda s: tuple(str(Path(s["output_base_dir"], d, name.format(D=d))) for d in s["datasets"])


def _patch_files(name: Callable[[str, int], str]) -> Paths:
    """settings -> ``<output_dir>/<patch folder of D>/<name(D, P)>`` per dataset D at patch size P."""
    def paths(s: Mapping[str, Any]) -> tuple[str, ...]:
        size = int(s["patch_size"])
        return tuple(str(Path(s["output_dir"], patch_dir_name(d, size), name(d, size))) for d in s["datasets"])
    return paths


# --------------------------------------------------------------------------- the declarations

WORKERS = Flag("--workers", "workers")
RESUME = Flag("--resume-if-exists", "resume_if_exists")
TRAINING_TAIL = (Flag("--fold", "fold"), Flag("--epochs", "epochs"), WORKERS, RESUME)
RUN_FOLD_ARGS = _in("output_dir", f"fold_{FOLD}", RUN_ARGS_NAME)


def _isles_preprocessing(script: str) -> StageDecl:
    flags = (Flag("--isles-dir", "isles_dir"), Flag("--output-dir", "output_dir"), WORKERS)
    return StageDecl(script, flags, "summaries", _in("output_dir", "preprocessing_summary.json"), _in("output_dir", RUN_ARGS_NAME), "--output-dir")


def _training(script: str, flags: tuple[Flag, ...]) -> StageDecl:
    return StageDecl(script, (*flags, *TRAINING_TAIL), "training", _in("output_dir"), RUN_FOLD_ARGS, "--workers")


DECLARATIONS = (
    _isles_preprocessing("preprocess_v2_isles.py"),
    _isles_preprocessing("preprocess_isles_WITH_BBOX.py"),
    StageDecl("preprocess_brats2024_t2flair.py", (Flag("--brats-dir", "brats_dir"), Flag("--output-dir", "output_dir"), WORKERS), "summaries",
              _in("output_dir", "preprocessing_summary.json"), _in("output_dir", RUN_ARGS_NAME), "--workers"),
    StageDecl("preprocess_stroke_foundation.py", (Flag("--config", "config"), Flag("--output-base-dir", "output_base_dir"), Flag("--datasets", "datasets"), WORKERS),
              "summaries", _foundation_files("{D}_summary.json"), _foundation_files(RUN_ARGS_NAME), "--workers"),
    StageDecl("extract_patches_96x96x96.py", (Flag("--input_dir", "input_dir"), Flag("--output_dir", "output_dir"), Flag("--datasets", "datasets"),
                                              Flag("--patch_size", "patch_size"), Flag("--min_lesion_overlap", "min_lesion_overlap"), WORKERS),
              "summaries", _patch_files(patch_summary_name), _patch_files(lambda d, size: RUN_ARGS_NAME), "--workers"),
    _training("train_brats_uctransnet3d.py", (Flag("--brats-dir", "brats_dir"), Flag("--output-dir", "output_dir"), Flag("--arch", "arch"), Flag("--patch-size", "patch_size"))),
    _training("train_isles_resnet18.py", (Flag("--isles-dir", "isles_dir"), Flag("--output-dir", "output_dir"), Flag("--strategy", "strategy"),
                                          Flag("--init", "init"), Flag("--pretrain-ckpt", "pretrain_ckpt"))),
    _training("train_stroke.py", (Flag("--dataset", "dataset"), Flag("--data-dir", "data_dir"), Flag("--arch", "arch"), Flag("--output-dir", "output_dir"),
                                  Flag("--patch-size", "patch_size"), Flag("--pretrain-ckpt", "pretrain_ckpt"))),
    StageDecl("evaluate.py", (Flag("--dataset", "dataset"), Flag("--data-dir", "data_dir"), Flag("--splits-file", "splits_file"), Flag("--run", "run", repeat=True),
                              Flag("--compare", "compare", repeat=True), Flag("--output-dir", "output_dir")),
              "evaluation", _in("output_dir", "summary.json"), _in("output_dir", RUN_ARGS_NAME), "--output-dir"),
)
STAGES: dict[str, StageDecl] = {decl.script: decl for decl in DECLARATIONS}  # script file name -> its declaration


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m strokeseg.stages --check SCRIPT SETTINGS_JSON FOLD``: print how the records
    of the declared stage SCRIPT disagree with SETTINGS_JSON (flag dest -> value) for FOLD
    (``-`` for a stage that runs once), one line each; exit :data:`MISMATCH_EXIT` when they do,
    0 when not. An emitted SLURM job runs it to redo such a task with ``--overwrite``."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--check", nargs=3, required=True, metavar=("SCRIPT", "SETTINGS_JSON", "FOLD"))
    script, settings, fold = parser.parse_args(argv).check
    problems = STAGES[script].mismatches(json.loads(settings), None if fold == "-" else int(fold))
    for problem in problems:
        print(problem)
    return MISMATCH_EXIT if problems else 0


if __name__ == "__main__":
    sys.exit(main())
