"""One rank raises (in the main thread or a worker thread) while the others wait in a
collective: the whole job must end, non-zero, with the error printed once.

Usage: abort.py main|thread
"""
from __future__ import annotations

import sys
import threading
import time

from dtrain.comm import make_communicator
from dtrain.comm.watchdog import install_abort_on_exception

comm = make_communicator("mpi", "cpu")  # no timeout: only the exception hook can end this job
install_abort_on_exception(comm)
comm.barrier()
failing = comm.size - 1


def fail() -> None:
    raise ValueError(f"boom from rank {comm.rank}")


if comm.rank == failing:
    if sys.argv[1] == "thread":
        threading.Thread(target=fail, name="loader").start()
        time.sleep(60)
    else:
        fail()
comm.barrier()  # the other ranks block here forever unless the job is aborted
print(f"NOT ABORTED rank {comm.rank}", flush=True)
