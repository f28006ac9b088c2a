"""Failure handling: the watchdog in process (with a recording abort), and under mpirun a
raising rank or a missing rank must end the whole job promptly and say why."""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from mpirun_helper import launch, run_mpi

from dtrain.comm.single import SingleCommunicator
from dtrain.comm.watchdog import (
    Arrival,
    ArrivalBoard,
    CollectiveWatchdog,
    install_abort_on_exception,
    stall_report,
)

REPO = Path(__file__).resolve().parent.parent


class RecordingComm:
    """Stands in for a communicator: abort() records the call instead of ending the process."""

    rank, size = 3, 4

    def __init__(self) -> None:
        self.aborted = threading.Event()
        self.codes: list[int] = []

    def abort(self, code: int = 1) -> None:
        self.codes.append(code)
        self.aborted.set()


def test_watchdog_aborts_a_collective_that_overruns(capsys):
    comm = RecordingComm()
    watchdog = CollectiveWatchdog(comm, timeout_s=0.05)
    with watchdog.watch("gradient all-reduce"):
        assert comm.aborted.wait(timeout=30), "watchdog never fired"
    assert comm.codes == [1]
    err = capsys.readouterr().err
    assert err.startswith("[rank 3] dtrain: gradient all-reduce did not finish within 0.05 s")


def test_watchdog_stays_quiet_when_collectives_finish():
    comm = RecordingComm()
    watchdog = CollectiveWatchdog(comm, timeout_s=60)
    for _ in range(100):
        with watchdog.watch("barrier"), watchdog.watch("nested"):
            pass
    assert not watchdog._armed and not comm.aborted.is_set()


def test_watchdog_without_timeout_starts_no_thread():
    watchdog = CollectiveWatchdog(RecordingComm(), timeout_s=None)
    with watchdog.watch("barrier"):
        pass
    assert watchdog._thread is None


@pytest.mark.parametrize("bad", [0, -1.0, True, "10"])
def test_watchdog_rejects_bad_timeouts(bad):
    with pytest.raises((ValueError, TypeError), match="timeout_s"):
        CollectiveWatchdog(RecordingComm(), timeout_s=bad)


def test_world_of_one_keeps_the_default_excepthook(monkeypatch):
    import sys

    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    install_abort_on_exception(SingleCommunicator())
    assert sys.excepthook is sys.__excepthook__


@pytest.mark.mpi
@pytest.mark.parametrize("where", ["main", "thread"])
def test_raising_rank_ends_every_rank_and_reports_once(where):
    result = run_mpi("abort.py", 3, where, timeout=30)
    assert result.returncode != 0, result.output
    assert "NOT ABORTED" not in result.output
    assert result.output.count("ValueError: boom from rank 2") == 1, result.output
    assert "[rank 2] ValueError: boom from rank 2" in result.stderr


@pytest.mark.mpi
@pytest.mark.parametrize("collective", ["barrier", "reducer"])
def test_watchdog_aborts_when_a_rank_never_arrives(collective):
    result = run_mpi("watchdog.py", 2, collective, timeout=30)
    assert result.returncode != 0, result.output
    assert "NOT ABORTED" not in result.output
    what = "barrier" if collective == "barrier" else "gradient all-reduce"
    assert f"[rank 0] dtrain: {what} did not finish within 1.5 s" in result.stderr, result.output


# -- the report of a collective that does not finish ----------------------------------------
def arrival(rank, seq, what="gradient all-reduce", step=7, at=100.0):
    return Arrival(rank, seq, what, step, at)


def test_the_report_names_the_collective_the_step_and_the_ranks_that_have_not_arrived():
    me = arrival(0, 12, at=100.0)
    others = {1: arrival(1, 11, "barrier", 6, at=90.0), 2: arrival(2, 12, at=100.5), 3: None}
    report, speak = stall_report(me, {0: me, **others}, timeout_s=5, now=106.0)
    assert report.startswith("gradient all-reduce at step 7 did not finish within 5 s: rank(s) [1, 3] have not "
                             "arrived (rank 1: last entered barrier (#11) of step 6 16.0 s ago; rank 3: no record)")
    assert speak  # rank 0 is the lowest of the ranks waiting in it
    _, speak = stall_report(others[2], {0: me, **others}, timeout_s=5, now=106.0)
    assert not speak  # rank 2 leaves the report to rank 0


def test_a_rank_that_arrives_long_after_the_others_says_so_itself():
    me = arrival(1, 12, at=130.0)  # stopped (SIGSTOP) for half a minute, then woken
    report, speak = stall_report(me, {0: arrival(0, 12, at=100.0), 1: me}, timeout_s=5, now=136.0)
    assert speak and "this rank arrived 30.0 s after the others (it was stopped or far behind)" in report
    assert "another rank" not in report


def test_ranks_in_different_collectives_are_a_program_bug():
    me = arrival(0, 5, "gradient all-reduce")
    report, _ = stall_report(me, {0: me, 1: arrival(1, 5, "evaluation all-gather")}, timeout_s=5, now=106.0)
    assert "called different collectives as their #5 (rank 1 is in evaluation all-gather)" in report


def test_arrivals_travel_through_the_board(tmp_path):
    board = ArrivalBoard(tmp_path / "board", rank=1)
    board.post(arrival(1, 3, "object all-gather", None, at=5.0))
    board.post(arrival(1, 4, "barrier", 2, at=6.0))  # overwritten in place
    assert board.read(3) == {0: None, 1: arrival(1, 4, "barrier", 2, at=6.0), 2: None}


def test_every_collective_runs_under_the_watchdog(monkeypatch):
    comm = SingleCommunicator(timeout_s=30)
    seen = []
    original = comm.watchdog.watch

    def spy(what):
        seen.append(what)
        return original(what)

    monkeypatch.setattr(comm.watchdog, "watch", spy)
    buf = np.zeros(4, dtype=np.float32)
    comm.allreduce(buf)
    comm.iallreduce(buf).wait()
    comm.broadcast(buf)
    comm.bcast_object(1)
    comm.allgather_object(1)
    comm.barrier()
    assert seen == ["all-reduce", "all-reduce (non-blocking)", "broadcast", "object broadcast", "object all-gather",
                    "barrier"]


@pytest.mark.mpi
def test_a_stalled_rank_is_named_with_the_collective_and_the_step(tmp_path):
    # Rank 1 hangs before its third step's forward pass; rank 0 waits for it in the
    # gradient all-reduce of that step.
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import os, time\n"
        "if os.environ.get('OMPI_COMM_WORLD_RANK') == '1':\n"
        "    import dtrain.parallel.workers as w\n"
        "    _fb = w.ComputeWorker.forward_backward\n"
        "    def forward_backward(self, x, y, step, *args, **kwargs):\n"
        "        if step == 2:\n"
        "            time.sleep(120)\n"
        "        return _fb(self, x, y, step, *args, **kwargs)\n"
        "    w.ComputeWorker.forward_backward = forward_backward\n")
    app = [sys.executable, "-m", "dtrain", "model=lenet", "data=synthetic", "data.train_size=256", "trainer.batch_size=32",
           "trainer.progress=false", "logging.tensorboard=false", "device=cpu", "parallel.timeout_s=4",
           f"hydra.run.dir={tmp_path / 'run'}"]
    result = launch(["-x", f"PYTHONPATH={hooks}:{REPO}", "-n", "2", *app], timeout=90, cwd=tmp_path)
    assert result.returncode != 0
    assert ("[rank 0] dtrain: gradient all-reduce at step 2 did not finish within 4 s: rank(s) [1] have not arrived "
            "(rank 1: last entered") in result.stderr, result.output
    assert "another rank" not in result.stderr
