"""Turn a failure on one rank into a prompt end of the whole job, never a hang.

Without help, an exception on one rank leaves the others blocked forever in their next
collective. :func:`install_abort_on_exception` makes an uncaught exception (main thread
or any other thread) print its traceback once, prefixed with the rank, and then call
``comm.abort(1)`` (MPI_Abort), which ends every process of the job. A
:class:`CollectiveWatchdog` covers the other case, a rank that never arrives (stuck,
killed, or far behind): a collective that does not finish within ``timeout_s`` aborts the
job with a message naming the collective, the training step and the ranks that had not
arrived (from the :class:`ArrivalBoard`, where every rank posts its latest collective).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
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


@dataclass(frozen=True)
class Arrival:
    """A rank's latest watched collective: its number in the rank's sequence of collectives
    (the same on every rank of a correct program), its name, the training step and when the
    rank entered it (``time.time()``)."""

    rank: int
    seq: int
    what: str
    step: int | None
    at: float

    def describe(self, now: float) -> str:
        step = "" if self.step is None else f" of step {self.step}"
        return f"rank {self.rank}: last entered {self.what} (#{self.seq}){step} {now - self.at:.1f} s ago"


class ArrivalBoard:
    """Each rank's latest :class:`Arrival`, one small file per rank in ``directory`` (a
    hidden folder of the run directory, which every rank of a job sees on one node, and
    on several when the run directory is on a shared file system). A rank overwrites its
    own record in place at every watched collective (one ``pwrite``); any rank can read
    all of them when a collective times out, to name the ranks that have not arrived."""

    RECORD = 256  # bytes per record: JSON padded with spaces

    def __init__(self, directory: Path, rank: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._fd = os.open(directory / f"rank{rank}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def post(self, arrival: Arrival) -> None:
        record = json.dumps(asdict(arrival)).encode()[: self.RECORD].ljust(self.RECORD)
        os.pwrite(self._fd, record, 0)

    @staticmethod
    def read_all(directory: Path) -> list[Arrival]:
        """Every readable record in ``directory`` (for a supervisor: how far the job got)."""
        arrivals = []
        for path in sorted(directory.glob("rank*")):
            try:
                arrivals.append(Arrival(**json.loads(path.read_bytes())))
            except (OSError, ValueError, TypeError):
                continue
        return arrivals

    def read(self, size: int) -> dict[int, Arrival | None]:
        """Every rank's latest arrival (None: no readable record)."""
        arrivals: dict[int, Arrival | None] = {}
        for rank in range(size):
            try:
                arrivals[rank] = Arrival(**json.loads((self.directory / f"rank{rank}").read_bytes()))
            except (OSError, ValueError, TypeError):
                arrivals[rank] = None
        return arrivals


def stall_report(me: Arrival, arrivals: dict[int, Arrival | None], timeout_s: float, now: float) -> tuple[str, bool]:
    """One line on a collective that has run past its deadline on rank ``me.rank``, and
    whether this rank should be the one to print it: the lowest rank among those waiting
    in the collective reports; a rank that arrived long after the others reports itself."""
    others = {r: a for r, a in arrivals.items() if r != me.rank}
    missing = sorted(r for r, a in others.items() if a is None or a.seq < me.seq)
    elsewhere = sorted(r for r, a in others.items() if a is not None and a.seq == me.seq and a.what != me.what)
    step = "" if me.step is None else f" at step {me.step}"
    head = f"{me.what}{step} did not finish within {timeout_s:g} s"
    if missing:
        details = "; ".join(others[r].describe(now) if others[r] else f"rank {r}: no record" for r in missing)
        waiting = [me.rank, *(r for r, a in others.items() if a is not None and a.seq >= me.seq)]
        return f"{head}: rank(s) {missing} have not arrived ({details})", me.rank == min(waiting)
    if elsewhere:
        details = "; ".join(f"rank {r} is in {others[r].what}" for r in elsewhere)
        return (f"{head}: the ranks called different collectives as their #{me.seq} ({details}), a bug in "
                f"the program"), me.rank == min([me.rank, *elsewhere])
    earliest = min((a.at for a in others.values() if a is not None), default=me.at)
    if me.at - earliest > timeout_s:
        return (f"{head}: this rank arrived {me.at - earliest:.1f} s after the others (it was stopped or far "
                f"behind); the others have given up on it"), True
    return f"{head}: every rank arrived; the collective itself is stuck (a network or library problem)", \
        me.rank == min(arrivals)


class CollectiveWatchdog:
    """Aborts the job when a watched collective runs past ``timeout_s`` seconds, naming the
    collective, the training step and the ranks that have not arrived.

    Every collective of a :class:`~dtrain.comm.base.Communicator` runs inside
    ``watch(what)``: it counts the collective, posts this rank's arrival to the
    :class:`ArrivalBoard` (once :meth:`post_arrivals_to` has given it a directory) and arms
    a deadline. One daemon thread sleeps until the earliest armed deadline (a condition
    variable, no polling); if its block is still running then, one rank prints
    :func:`stall_report`'s line and every rank calls ``comm.abort(1)``. ``step`` is the
    training step the trainer sets. With ``timeout_s=None`` ``watch`` does nothing. Watches
    may nest; each has its own deadline, and the names of nested watches are joined.
    """

    def __init__(self, comm: Communicator, timeout_s: float | None) -> None:
        if timeout_s is not None:
            check_real(timeout_s, "collective timeout_s (seconds, or None)", 0.0, low_open=True)
        self.comm = comm
        self.timeout_s = None if timeout_s is None else float(timeout_s)
        self.step: int | None = None
        self._board: ArrivalBoard | None = None
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, Arrival]] = {}  # token -> (deadline, arrival)
        self._names: list[str] = []  # the names of the watches now open, outermost first
        self._seq = 0
        self._next_token = 0
        self._thread: threading.Thread | None = None

    def post_arrivals_to(self, directory: Path) -> None:
        """Post this rank's arrivals to ``directory`` (every rank of the job must see it)."""
        if self.timeout_s is not None:
            self._board = ArrivalBoard(directory, self.comm.rank)

    @contextlib.contextmanager
    def watch(self, what: str) -> Iterator[None]:
        """Run the body, collective ``what``, under a deadline of ``timeout_s`` seconds from now."""
        if self.timeout_s is None:
            yield
            return
        self._names.append(what)
        token = self._arm(" / ".join(self._names))
        try:
            yield
        finally:
            self._names.pop()
            with self._cond:
                del self._armed[token]

    def _arm(self, what: str) -> int:
        self._seq += 1
        arrival = Arrival(self.comm.rank, self._seq, what, self.step, time.time())
        if self._board is not None:
            self._board.post(arrival)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dtrain-collective-watchdog", daemon=True)
                self._thread.start()
            token = self._next_token
            self._next_token += 1
            self._armed[token] = (time.monotonic() + self.timeout_s, arrival)
            self._cond.notify()
            return token

    def _run(self) -> None:
        with self._cond:
            while True:
                if not self._armed:
                    self._cond.wait()
                    continue
                deadline, arrival = min(self._armed.values(), key=lambda armed: armed[0])
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        arrivals = self._board.read(self.comm.size) if self._board is not None else {}
        if arrivals:
            arrivals[self.comm.rank] = arrival
            report, speak = stall_report(arrival, arrivals, self.timeout_s, time.time())
        else:
            step = "" if arrival.step is None else f" at step {arrival.step}"
            report = (f"{arrival.what}{step} did not finish within {self.timeout_s:g} s: another rank is stuck, has "
                      f"died or is far behind")
            speak = True
        if speak:
            _write_prefixed(self.comm.rank, f"dtrain: {report}; aborting all {self.comm.size} ranks (raise "
                                            f"parallel.timeout_s if a step is legitimately that slow)\n")
        else:  # leave the reporting rank time to say why before this abort ends every rank
            time.sleep(min(self.timeout_s, 5.0))
        self.comm.abort(1)
