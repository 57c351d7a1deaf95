"""The per-case loop every stage script shares: progress, one log line per case, failures
collected instead of raised, optional process parallelism, a summary JSON and the exit status.

A stage script maps case ids to work items (paths, records) and provides
``process(item) -> CaseResult``, a top-level function or ``functools.partial`` of one so it can
run in worker processes, then calls :func:`run_cases` and :func:`finish`.
"""
from __future__ import annotations

import argparse
import multiprocessing
import logging
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from tqdm import tqdm

from .io import CaseError, one_line, write_json

__all__ = [
    "CaseResult",
    "RunReport",
    "get_logger",
    "progress",
    "run_cases",
    "write_run_args",
    "finish",
    "add_run_arguments",
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


def run_cases(
    cases: Mapping[str, Any],
    process: Callable[[Any], CaseResult],
    workers: int = 1,
    desc: str = "cases",
) -> RunReport:
    """Run ``process(item)`` for every ``case_id -> item`` of ``cases``; never raises per case.

    With ``workers`` > 1 the cases run in that many spawned processes (spawn, not fork, so
    OpenMP/BLAS thread pools of the parent cannot deadlock a child). Exceptions become
    ``failed`` results with a one-line reason; ``process`` may itself return ``skipped``.
    """
    log = get_logger()
    results: list[CaseResult] = []
    total = len(cases)
    if workers <= 1 or total <= 1:
        for case_id, item in progress(cases.items(), total=total, desc=desc):
            results.append(_run_one(process, case_id, item))
            _log_result(log, len(results), total, results[-1])
        return RunReport(results)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_single_threaded_worker) as pool:
        futures = [pool.submit(_run_one, process, case_id, item) for case_id, item in cases.items()]
        for future in progress(as_completed(futures), total=total, desc=desc):
            results.append(future.result())
            _log_result(log, len(results), total, results[-1])
    return RunReport(results)


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


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every per-case stage shares: ``--workers`` and ``--overwrite``."""
    parser.add_argument("--workers", type=int, default=1, help="cases processed in parallel processes (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="redo cases whose output already exists (default: skip them)")
