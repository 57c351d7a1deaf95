"""The per-case loop every stage script shares: progress, one log line per case, failures
collected instead of raised, optional process parallelism, a summary JSON and the exit status.

A caller maps case ids to work items (paths, records) and provides
``process(item) -> CaseResult``, a top-level function or ``functools.partial`` of one so it can
run in worker processes, then calls :func:`run_cases` and :func:`finish`. Preprocessing and patch
stages do not call these themselves: they declare a :class:`strokeseg.core.stage.Stage`.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import logging
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from tqdm import tqdm

from .io import CaseError, one_line, read_json, write_json

__all__ = [
    "CaseResult",
    "RunReport",
    "get_logger",
    "progress",
    "run_cases",
    "write_run_args",
    "finish",
    "add_run_arguments",
    "SETTINGS_NAME",
    "OVERWRITE_ADVICE",
    "check_settings",
    "prepare_output_dir",
    "guard_stage",
]

LOG = logging.getLogger("strokeseg")


class _TqdmHandler(logging.Handler):
    """Log through ``tqdm.write`` so log lines do not break an active progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stdout)
        sys.stdout.flush()


def get_logger() -> logging.Logger:
    """The package logger, configured once: ``HH:MM:SS message`` lines on stdout."""
    if not LOG.handlers:
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        LOG.addHandler(handler)
        LOG.setLevel(logging.INFO)
        LOG.propagate = False
    return LOG


def progress(iterable: Iterable, total: int | None = None, desc: str = "") -> tqdm:
    """A tqdm bar that stays quiet when stdout is not a terminal (SLURM logs, pipes, CI)."""
    return tqdm(iterable, total=total, desc=desc, disable=not sys.stdout.isatty(), leave=False, dynamic_ncols=True)


@dataclass
class CaseResult:
    """Outcome of one case: status is ``done``, ``skipped`` or ``failed``; info is JSON-able."""

    case_id: str
    status: str
    reason: str = ""
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunReport:
    results: list[CaseResult]

    def by_status(self, status: str) -> list[CaseResult]:
        return [r for r in self.results if r.status == status]

    @property
    def n_failed(self) -> int:
        return len(self.by_status("failed"))

    def with_output(self) -> list[str]:
        """Ids of the cases whose output is on disk (done, or skipped because it exists)."""
        return [r.case_id for r in self.results if r.status in ("done", "skipped")]

    def as_dict(self) -> dict[str, Any]:
        return {
            "n_cases": len(self.results),
            "n_done": len(self.by_status("done")),
            "n_skipped": len(self.by_status("skipped")),
            "n_failed": self.n_failed,
            "failed": [{"case_id": r.case_id, "reason": r.reason} for r in self.by_status("failed")],
            "skipped": [{"case_id": r.case_id, "reason": r.reason} for r in self.by_status("skipped")],
            "cases": [asdict(r) for r in sorted(self.results, key=lambda r: r.case_id)],
        }


def _run_one(process: Callable[[Any], CaseResult], case_id: str, item: Any) -> CaseResult:
    start = time.perf_counter()
    try:
        result = process(item)
    except CaseError as err:
        result = CaseResult(case_id, "failed", reason=str(err))
    except Exception as err:  # one bad case must not stop the others; keep its reason
        reason = f"{type(err).__name__}: {one_line(err)}"
        result = CaseResult(case_id, "failed", reason=reason)
    result.seconds = round(time.perf_counter() - start, 3)
    return result


def _log_result(log: logging.Logger, index: int, total: int, result: CaseResult) -> None:
    line = f"[{index}/{total}] {result.case_id}: {result.status} ({result.seconds:.1f} s)"
    if result.reason:
        line += f" - {result.reason}"
    log.info(line)


def _single_threaded_worker() -> None:
    # Parallelism comes from the processes; one intra-op thread each avoids oversubscription.
    torch.set_num_threads(1)


WORKER_DIED = "worker process died on this case (out-of-memory killer or kill -9?); rerun to retry it, or use fewer --workers"


def run_cases(
    cases: Mapping[str, Any],
    process: Callable[[Any], CaseResult],
    workers: int = 1,
    desc: str = "cases",
) -> RunReport:
    """Run ``process(item)`` for every ``case_id -> item`` of ``cases``; never raises per case.

    With ``workers`` > 1 the cases run in that many spawned processes (spawn, not fork, so
    OpenMP/BLAS thread pools of the parent cannot deadlock a child). Exceptions become
    ``failed`` results with a one-line reason; ``process`` may itself return ``skipped``. A
    worker that dies (out-of-memory killer, ``kill -9``) breaks its pool: the cases it left
    unfinished run again in a new pool, except the one it died on, which fails (see
    :func:`_run_in_pools`).
    """
    log = get_logger()
    results: list[CaseResult] = []
    total = len(cases)

    def record(result: CaseResult) -> None:
        results.append(result)
        _log_result(log, len(results), total, result)

    if workers <= 1 or total <= 1:
        for case_id, item in progress(cases.items(), total=total, desc=desc):
            record(_run_one(process, case_id, item))
    else:
        _run_in_pools(cases, process, workers, record, desc)
    return RunReport(results)


def _run_in_pools(
    cases: Mapping[str, Any], process: Callable[[Any], CaseResult], workers: int, record: Callable[[CaseResult], None], desc: str
) -> None:
    """Run every case in pools of ``workers`` processes until each has a result.

    Each worker notes the case it starts in a file named by its pid, so after a worker died the
    cases that were in flight are known; each is rerun alone in a one-process pool, where a
    second death pins it down (failed, :data:`WORKER_DIED`). The other unfinished cases go back
    to a full pool. Every round finishes at least one case, so this ends.
    """
    pending = list(cases)
    with tempfile.TemporaryDirectory(prefix="strokeseg-cases-") as marks:
        while pending:
            left = _run_pool({c: cases[c] for c in pending}, process, workers, record, Path(marks), desc)
            started = {p.read_text() for p in Path(marks).iterdir()}
            suspects = [c for c in left if c in started] or left[:1]
            for case_id in suspects:
                if _run_pool({case_id: cases[case_id]}, process, 1, record, Path(marks), case_id):
                    record(CaseResult(case_id, "failed", reason=WORKER_DIED))
            pending = [c for c in left if c not in suspects]


def _run_pool(
    cases: Mapping[str, Any], process: Callable[[Any], CaseResult], workers: int,
    record: Callable[[CaseResult], None], marks: Path, desc: str,
) -> list[str]:
    """One pool over ``cases``; returns the ids left without a result because a worker died."""
    for old in marks.iterdir():
        old.unlink()
    context = multiprocessing.get_context("spawn")
    left = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_single_threaded_worker) as pool:
        futures = {pool.submit(_run_marked, process, case_id, item, marks): case_id for case_id, item in cases.items()}
        for future in progress(as_completed(futures), total=len(futures), desc=desc):
            try:
                record(future.result())
            except BrokenProcessPool:
                left.append(futures[future])
    return sorted(left, key=list(cases).index)


def _run_marked(process: Callable[[Any], CaseResult], case_id: str, item: Any, marks: Path) -> CaseResult:
    """:func:`_run_one` in a worker, after noting ``case_id`` in ``marks/<pid>``."""
    (marks / str(os.getpid())).write_text(case_id)
    return _run_one(process, case_id, item)


def write_run_args(out_dir: str | Path, args: argparse.Namespace | dict, name: str = "run_args.json") -> None:
    """Record the resolved arguments of a run (plus the command line) in ``out_dir/name``."""
    values = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)
    record = {"argv": sys.argv, "args": values, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(Path(out_dir) / name, record)


def finish(summary_path: str | Path, report: RunReport, extra: dict[str, Any] | None = None) -> int:
    """Write the summary JSON, log the failed/skipped lists, and return the exit status (1 if any failed)."""
    summary = dict(extra or {})
    summary.update(report.as_dict())
    write_json(summary_path, summary)
    log = get_logger()
    log.info(
        f"{summary['n_done']} done, {summary['n_skipped']} skipped, {summary['n_failed']} failed; "
        f"summary: {summary_path}"
    )
    for item in summary["failed"]:
        log.info(f"  FAILED {item['case_id']}: {item['reason']}")
    return 1 if report.n_failed else 0


SETTINGS_NAME = "stage_settings.json"


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, paths strings)."""
    return json.loads(json.dumps(value, default=str))


OVERWRITE_ADVICE = "pass --overwrite to redo every case with the new ones, or choose another output folder"


def check_settings(
    out_dir: Path, settings: Mapping[str, Any], overwrite: bool, may_change: tuple[str, ...] = (), advice: str = OVERWRITE_ADVICE,
) -> bool:
    """Make sure every output in ``out_dir`` comes from the same ``settings``.

    ``settings``: the values that shape the outputs (input folder, target shape, margin,
    config...), never those that do not (workers, output folder). The first run records them in
    ``out_dir/stage_settings.json`` (atomically, before its first case); a later run must pass
    the same ones. With ``overwrite`` the new settings replace the record (every case is then
    redone); keys in ``may_change`` (the splits' seed when only the splits are rebuilt) may
    differ and are updated. A folder with a stage's ``run_args.json`` but no record was made by
    an older version with unknown settings: refused unless ``overwrite``. Raises
    :class:`CaseError` naming the folder (each differing setting, then ``advice``) or the file.
    Returns True when the folder's earlier outputs were made with these settings (as recorded).
    """
    path = Path(out_dir) / SETTINGS_NAME
    wanted = _jsonable(dict(settings))
    if overwrite:
        same = path.is_file() and _recorded_or_none(path) == wanted
        write_json(path, wanted)
        return same
    if not path.exists():
        if (Path(out_dir) / "run_args.json").exists():
            raise CaseError(f"{out_dir}: holds outputs of an older version (run_args.json, no {SETTINGS_NAME}): their settings are unknown; {advice}")
        write_json(path, wanted)
        return False
    recorded = read_json(path)
    if not isinstance(recorded, dict):
        raise CaseError(f"{path}: not a settings record (a JSON object expected, {type(recorded).__name__} found); {advice}")
    differing = [
        f"{key}: {json.dumps(recorded.get(key))} there, {json.dumps(wanted.get(key))} now"
        for key in sorted(set(recorded) | set(wanted)) if recorded.get(key) != wanted.get(key) and key not in may_change
    ]
    if differing:
        raise CaseError(f"{out_dir}: holds outputs made with other settings ({'; '.join(differing)}); {advice}")
    if recorded != wanted:
        write_json(path, wanted)
    return True


def _recorded_or_none(path: Path) -> Any:
    """The settings record at ``path``, or None when it is unreadable (about to be replaced)."""
    try:
        return read_json(path)
    except CaseError:
        return None


def prepare_output_dir(out_dir: Path) -> Path:
    """Create ``out_dir`` (and parents); :class:`CaseError` naming it when it is a file or not
    writable. Returns ``out_dir``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CaseError(f"{out_dir}: output path exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CaseError(f"{out_dir}: cannot create the output folder ({err.strerror or one_line(err)})") from err
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise CaseError(f"{out_dir}: output folder is not writable")
    return out_dir


def guard_stage(body: Callable[[], int]) -> int:
    """Run a stage's ``body``; bad input (:class:`CaseError`) and failed reads or writes
    (OSError: a full disk, a read-only folder, each naming its path) become one ``ERROR`` line
    and exit status 1 instead of a traceback."""
    try:
        return body()
    except (CaseError, OSError) as err:
        get_logger().info(f"ERROR {one_line(err)}")
        return 1


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every per-case stage shares: ``--workers`` and ``--overwrite``."""
    parser.add_argument("--workers", type=int, default=1, help="cases processed in parallel processes (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="redo cases whose output already exists (default: skip them); needed to rerun into a folder made with other settings")
