"""Turn a failure on one rank into a prompt end of the whole job, never a hang.

Without help, an exception on one rank leaves the others blocked forever in their next
collective. :func:`install_abort_on_exception` makes an uncaught exception (main thread
or any other thread) print its traceback once, prefixed with the rank, and then call
``comm.abort(1)`` (MPI_Abort), which ends every process of the job. A
:class:`CollectiveWatchdog` covers the other case, a rank that never arrives (stuck,
killed, or far behind): a collective that does not finish within ``timeout_s`` aborts the
job with a message saying so.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING

from dtrain.checks import check_real

if TYPE_CHECKING:
    from dtrain.comm.base import Communicator


def _write_prefixed(rank: int, text: str) -> None:
    prefix = f"[rank {rank}] "
    sys.stderr.write("".join(prefix + line for line in text.splitlines(keepends=True)))
    if not text.endswith("\n"):
        sys.stderr.write("\n")


def install_abort_on_exception(comm: Communicator) -> None:
    """Abort every rank when any rank dies of an uncaught exception.

    Installs ``sys.excepthook`` and ``threading.excepthook``: the first uncaught exception
    is printed once to stderr, each line prefixed ``[rank R]``, then ``comm.abort(1)``
    ends the job (exit status non-zero on every rank). A world of one keeps Python's
    default behaviour (a normal exit, so ``atexit`` handlers still run).
    """
    if comm.size == 1:
        return
    lock = threading.Lock()

    def report_and_abort(exc_type: type[BaseException], exc: BaseException | None,
                         tb: TracebackType | None) -> None:
        # A second failure while the first is being reported (another thread) must not
        # print again: it just waits for the abort already under way.
        if lock.acquire(blocking=False):
            text = "".join(traceback.format_exception(exc_type, exc, tb))
            _write_prefixed(comm.rank, text + f"uncaught {exc_type.__name__}: aborting all {comm.size} ranks\n")
        comm.abort(1)

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:  # a thread calling sys.exit() is not a failure
            return
        report_and_abort(args.exc_type, args.exc_value, args.exc_traceback)

    sys.excepthook = report_and_abort
    threading.excepthook = thread_hook


class CollectiveWatchdog:
    """Aborts the job when a watched collective runs past ``timeout_s`` seconds.

    ``with watchdog.watch("gradient all-reduce"): handle.wait()`` arms a deadline; one
    daemon thread per communicator sleeps until the earliest armed deadline (a condition
    variable, no polling) and, if the block is still running then, prints which
    collective timed out and calls ``comm.abort(1)``. With ``timeout_s=None`` ``watch``
    does nothing. Watches may nest; each has its own deadline.
    """

    def __init__(self, comm: Communicator, timeout_s: float | None) -> None:
        if timeout_s is not None:
            check_real(timeout_s, "collective timeout_s (seconds, or None)", 0.0, low_open=True)
        self.comm = comm
        self.timeout_s = None if timeout_s is None else float(timeout_s)
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, str]] = {}  # token -> (deadline, what)
        self._next_token = 0
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watch(self, what: str) -> Iterator[None]:
        """Run the body under a deadline of ``timeout_s`` seconds from now."""
        if self.timeout_s is None:
            yield
            return
        token = self._arm(what)
        try:
            yield
        finally:
            with self._cond:
                del self._armed[token]

    def _arm(self, what: str) -> int:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dtrain-collective-watchdog", daemon=True)
                self._thread.start()
            token = self._next_token
            self._next_token += 1
            self._armed[token] = (time.monotonic() + self.timeout_s, what)
            self._cond.notify()
            return token

    def _run(self) -> None:
        with self._cond:
            while True:
                if not self._armed:
                    self._cond.wait()
                    continue
                deadline, what = min(self._armed.values())
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        _write_prefixed(
            self.comm.rank,
            f"dtrain: {what} did not finish within {self.timeout_s:g} s: another rank is stuck, "
            f"has died or is far behind; aborting all {self.comm.size} ranks "
            f"(raise the collective timeout, parallel.timeout_s, if this step is legitimately that slow)\n",
        )
        self.comm.abort(1)
