"""Failure handling: the watchdog in process (with a recording abort), and under mpirun a
raising rank or a missing rank must end the whole job promptly and say why."""
from __future__ import annotations

import threading

import pytest
from mpirun_helper import run_mpi

from dtrain.comm.single import SingleCommunicator
from dtrain.comm.watchdog import CollectiveWatchdog, install_abort_on_exception


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
