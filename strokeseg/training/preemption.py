"""Preemption. SIGTERM or SIGUSR1 (SLURM's ``--signal=B:USR1@120``; the time limit and
``scancel`` send SIGTERM to the whole process group, DataLoader workers ignore both) only sets
a flag (:class:`StopFlag`), from the start of :func:`strokeseg.training.engine.fit` on. The
loop checks it once the run is set up, after every training step and after every validation
case (a signal while the epoch's files are written is seen after the next step); all ranks
agree on it, ``last.pth`` is written *mid-epoch* with the number of steps done, and the process
exits with status 75 (:data:`EXIT_PREEMPTED`, EX_TEMPFAIL), which the sbatch scripts turn into
``scontrol requeue``. Mid-epoch rather than end-of-epoch state because an ATLAS epoch
(thousands of 96³ steps) can outlast the warning period: saving at the next step boundary loses
at most one step, and since the sampler skips exactly the batches already trained on, the
resumed epoch continues as if never stopped. A signal during validation saves the state "all
steps done" and the resumed run validates again.
"""
from __future__ import annotations

import signal
from typing import Any, Iterator

from .distributed import DistContext, all_sum

__all__ = ["EXIT_PREEMPTED", "StopFlag"]

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"; the sbatch scripts requeue on it


class StopFlag:
    """Set by SIGTERM / SIGUSR1; the handlers are installed for the duration of a ``with``."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "StopFlag":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def batches(self, loader: Any) -> Iterator[Any]:
        """``loader``'s batches; when a signal to the whole process group (``kill -TERM -PGID``,
        ``scancel`` without ``--batch``) has also killed a DataLoader worker, the epoch just
        ends early and the loop saves the last completed step instead of crashing."""
        try:
            yield from loader
        except RuntimeError:
            if self.signal_name is None:
                raise

    def agreed(self, ctx: DistContext) -> bool:
        """True on every rank as soon as any rank received a signal."""
        return all_sum([1.0 if self.signal_name else 0.0], ctx)[0] > 0
