"""Stopping on request: SIGTERM, SIGUSR1 and Ctrl-C end a run cleanly, with a checkpoint.

Schedulers warn before they take a machine back (Slurm sends SIGTERM at the time limit,
or any signal ``--signal`` names, e.g. SIGUSR1), and a user presses Ctrl-C. A
:class:`StopRequest` turns any of these, on any rank, into the same plan on every rank:
finish the current step, write one checkpoint, and exit with :data:`PREEMPTED`, which
tells a supervisor (:mod:`dtrain.launch`) or a requeued batch job to resume rather than
to count a failure. A second Ctrl-C interrupts at once.

``mpirun`` does not pass signals on to the ranks (it aborts the job on SIGTERM), so a
supervisor asks by file instead: :func:`request_stop` writes :data:`STOP_FILE` into the
run directory, which rank 0 looks for at every step.
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from dtrain.comm.base import Communicator

# Exit status of a run stopped on request after writing its checkpoint (sysexits'
# EX_TEMPFAIL: "try again later").
PREEMPTED = 75

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
STOP_FILE = ".stop"  # in the run directory: its text names the signal the supervisor got


def request_stop(run_dir: Path, signal_name: str) -> None:
    """Ask a running job to stop like on a signal (what a supervisor does with its own)."""
    (run_dir / STOP_FILE).write_text(signal_name)


class Preempted(Exception):
    """The run stopped on request: ``signal_name`` after ``step``, ``checkpoint`` written."""

    def __init__(self, signal_name: str, step: int, checkpoint: str | None) -> None:
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint {checkpoint}; resume it with "
                         f"trainer.resume=auto in the same run directory (exit status {PREEMPTED})")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


class StopRequest:
    """Records a stop signal (handlers installed with :meth:`install`, undone by
    :meth:`uninstall`); :meth:`agreed` tells every rank whether any rank got one."""

    def __init__(self, run_dir: Path | None = None) -> None:
        self.signal_name: str | None = None
        self._stop_file = None if run_dir is None else run_dir / STOP_FILE
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Handle :data:`SIGNALS` in this process (a no-op outside the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signal_name is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal_name = signal.Signals(signum).name

    def agreed(self, comm: Communicator) -> str | None:
        """The signal any rank got, or that a stop file names (rank 0 looks), or None; every
        rank learns it at the same step. One small collective per call on several ranks."""
        mine = self.signal_name
        if mine is None and comm.rank == 0 and self._stop_file is not None and self._stop_file.exists():
            mine = self._stop_file.read_text().strip() or "a stop request"
        if comm.size == 1:
            return mine
        names = [name for name in comm.allgather_object(mine) if name is not None]
        return names[0] if names else None
