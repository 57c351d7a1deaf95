"""Per-case functions that misbehave on purpose, importable by the spawned worker processes of
``strokeseg.core.runner.run_cases`` (a test module's own functions would drag pytest into them)."""
from __future__ import annotations

import os
import signal

from strokeseg.core.runner import CaseResult
from strokeseg.core.case import Case
from strokeseg.datasets.isles import preprocess_isles_case

DOOMED = "sub-strokecase0003"


def isles_case_killed_on_doomed(case: Case, **kwargs) -> CaseResult:
    """:func:`preprocess_isles_case`, except that the worker process dies (SIGKILL, as from the
    out-of-memory killer) on case ``DOOMED``."""
    if case.case_id == DOOMED:
        os.kill(os.getpid(), signal.SIGKILL)
    return preprocess_isles_case(case, **kwargs)
