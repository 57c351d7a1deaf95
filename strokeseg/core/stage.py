"""The one skeleton of every per-case stage (preprocessing, patch extraction).

A stage is declared once as a :class:`Stage` (name, output folder, the settings that shape its
files, how its cases are found, the per-case function, its summary and its splits) and run by
:func:`run_stage`, which does, in this order:

1. discover the cases (``case id -> item``; a run-level problem raises :class:`CaseError`);
2. create the output folder and check its settings record (``stage_settings.json``): a folder
   made with other settings is refused before anything is written, unless ``overwrite``
   (:func:`strokeseg.core.runner.check_settings`);
3. write ``run_args.json``, log one line about the cases;
4. run ``process(item, overwrite=...)`` for every case (:func:`strokeseg.core.runner.run_cases`):
   outputs are written atomically by the per-case function (``save_npz``/``write_json``), a
   finished output is skipped unless ``overwrite`` (the folder's settings are then the same),
   an exception fails that case only, with its one-line reason;
5. write the summary JSON (every failed and skipped case with its reason) and the stage's
   extra records (fingerprint, patient list);
6. write the splits over the cases with output;
7. return the exit status: 1 when any case failed or the splits could not be written.

With ``rebuild_splits`` steps 1-5 are replaced by a door check of the folder's settings (those in
``split_settings`` may change) and the cases come from disk (:func:`cases_to_rebuild`).

A script is then a thin front end::

    def main(argv=None):
        args = parse_args(argv)
        stage = lambda: isles_stage(args.isles_dir, args.output_dir, settings_from(args))
        return run_stages([stage], vars(args), args.workers, args.overwrite, args.rebuild_splits)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .io import CaseError
from .runner import (
    SETTINGS_NAME, CaseResult, RunReport, check_settings, finish, get_logger, guard_stage, prepare_output_dir, run_cases,
    write_run_args,
)

__all__ = ["Stage", "run_stage", "run_stages", "cases_to_rebuild", "cases_on_disk", "REBUILD_ADVICE"]

# (case ids with output, this run's report or None when only the splits are rebuilt, overwrite) -> exit status
SplitsWriter = Callable[[Sequence[str], "RunReport | None", bool], int]


@dataclass(frozen=True)
class Stage:
    """Declaration of one per-case stage writing into one output folder.

    name: the stage (script) name, e.g. ``preprocess_v2_isles``. label: the short name of its
    log lines and progress bar (``ISLES``, a dataset name). out_dir: the output folder.
    settings: the JSON-able values that shape the outputs (input folder, target shape, seed...),
    never those that do not (workers, the output folder); recorded in ``stage_settings.json``.
    discover: ``() -> {case id: item}``, raising :class:`CaseError` for a run-level problem
    (missing input, no cases). process: ``process(item, overwrite=bool) -> CaseResult``, a
    top-level function or ``functools.partial`` of one (it may run in worker processes); it
    writes its case's outputs atomically and returns ``skipped`` for a finished one.
    summary_name: the summary JSON in ``out_dir``; summary_fields: its fixed fields;
    report_fields: fields computed from the run's report. describe: the log line about the
    discovered cases. records: writes further per-run files from the report (fingerprint,
    patient list). splits: writes the splits file (:data:`SplitsWriter`); split_settings: the
    settings only the splits depend on (``--rebuild-splits`` may change them). output_suffix:
    the file a finished case leaves last (``<case><suffix>``), counted by ``--rebuild-splits``.
    """

    name: str
    label: str
    out_dir: Path
    settings: Mapping[str, Any]
    discover: Callable[[], Mapping[str, Any]]
    process: Callable[..., CaseResult]
    summary_name: str
    summary_fields: Mapping[str, Any] = field(default_factory=dict)
    report_fields: Callable[[RunReport], Mapping[str, Any]] | None = None
    describe: Callable[[Mapping[str, Any]], str] | None = None
    records: Callable[[RunReport], None] | None = None
    splits: SplitsWriter | None = None
    split_settings: tuple[str, ...] = ()
    output_suffix: str = ".npz"

    @property
    def summary_path(self) -> Path:
        """Where :func:`run_stage` writes the summary JSON."""
        return Path(self.out_dir) / self.summary_name


def run_stage(
    stage: Stage, run_args: Mapping[str, Any], workers: int = 1, overwrite: bool = False, rebuild_splits: bool = False
) -> int:
    """Run ``stage`` (the steps in this module's docstring); returns the exit status (0, or 1
    when any case failed or the splits could not be written). ``run_args``: the resolved
    arguments recorded in ``run_args.json``. Raises :class:`CaseError` for a run-level problem
    (no input, an unusable output folder, a folder made with other settings) before any case
    runs, and ``ValueError`` for ``rebuild_splits`` on a stage without splits."""
    if rebuild_splits:
        if stage.splits is None:
            raise ValueError(f"{stage.name}: writes no splits, so it has none to rebuild")
        case_ids = cases_to_rebuild(stage.out_dir, stage.settings, stage.output_suffix, stage.split_settings)
        return stage.splits(case_ids, None, True)
    report = _run_cases(stage, run_args, workers, overwrite)
    fields = {**stage.summary_fields, **(stage.report_fields(report) if stage.report_fields else {})}
    status = finish(stage.summary_path, report, fields)
    if stage.records is not None:
        stage.records(report)
    if stage.splits is not None:
        status = max(status, stage.splits(report.with_output(), report, overwrite))
    return status


def _run_cases(stage: Stage, run_args: Mapping[str, Any], workers: int, overwrite: bool) -> RunReport:
    """Steps 1-4: discover, prepare and check the folder, record the arguments, run every case."""
    cases = stage.discover()
    prepare_output_dir(stage.out_dir)
    check_settings(stage.out_dir, stage.settings, overwrite)
    write_run_args(stage.out_dir, dict(run_args))
    if stage.describe is not None:
        get_logger().info(stage.describe(cases))
    process = functools.partial(stage.process, overwrite=overwrite)
    return run_cases(cases, process, workers=workers, desc=stage.label)


def run_stages(
    stages: Iterable[Callable[[], Stage]], run_args: Mapping[str, Any], workers: int = 1, overwrite: bool = False,
    rebuild_splits: bool = False,
) -> int:
    """Build and run each stage in turn (one per dataset), each behind
    :func:`strokeseg.core.runner.guard_stage`: a run-level problem of one (raised while it is
    declared or run) is one ``ERROR`` line and status 1, and the next still runs. Returns the
    highest exit status (0 when there are none)."""
    status = 0
    for build in stages:
        status = max(status, guard_stage(lambda: run_stage(build(), run_args, workers, overwrite, rebuild_splits)))
    return status


REBUILD_ADVICE = (
    "--rebuild-splits keeps the cases, so pass the settings they were made with "
    "(or run without --rebuild-splits, with --overwrite, to redo every case)"
)


def cases_to_rebuild(folder: Path, settings: Mapping[str, Any], suffix: str = ".npz", may_change: tuple[str, ...] = ()) -> list[str]:
    """``--rebuild-splits``' door check and its cases: ``folder`` must be a stage's output
    folder (with its ``stage_settings.json``) made with these ``settings``
    (:func:`strokeseg.core.runner.check_settings`; those in ``may_change``, the splits' own,
    may differ). Returns :func:`cases_on_disk`; raises :class:`CaseError` naming the folder,
    before anything is written."""
    if not Path(folder).is_dir():
        raise CaseError(f"{folder}: {'not a' if Path(folder).exists() else 'no such'} folder; --rebuild-splits deals the folds of the cases already preprocessed there")
    if not (Path(folder) / SETTINGS_NAME).is_file():
        raise CaseError(
            f"{folder}: no {SETTINGS_NAME} (not preprocessed by this version of the stage): the settings of its cases are "
            "unknown; run the stage without --rebuild-splits (with --overwrite for an older folder)"
        )
    check_settings(folder, settings, overwrite=False, may_change=may_change, advice=REBUILD_ADVICE)
    return cases_on_disk(folder, suffix)


def cases_on_disk(folder: Path, suffix: str = ".npz") -> list[str]:
    """Case ids of the finished outputs ``<case><suffix>`` in ``folder`` (hidden temporary files
    of atomic writes excluded), sorted."""
    return sorted(p.name[: -len(suffix)] for p in Path(folder).glob(f"*{suffix}") if not p.name.startswith("."))
