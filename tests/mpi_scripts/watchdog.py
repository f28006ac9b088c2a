"""A rank that never reaches a collective: the watchdog on the others aborts the job.

Usage: watchdog.py barrier|reducer
"""
from __future__ import annotations

import sys
import time

import numpy as np
from toy import toy_model

from dtrain.comm import make_communicator
from dtrain.comm.watchdog import install_abort_on_exception
from dtrain.nn.flat import FlatParameters
from dtrain.parallel.gradients import AllReduceGradients
from dtrain.parallel.workers import ComputeWorker
from dtrain.precision import FullPrecision

comm = make_communicator("mpi", "cpu", timeout_s=1.5)
install_abort_on_exception(comm)
comm.barrier()
if comm.rank == comm.size - 1:
    time.sleep(60)  # stuck: never joins the collective below
elif sys.argv[1] == "barrier":
    comm.barrier()
else:
    model = toy_model(comm.rank)
    flat = FlatParameters(model)
    averaging = AllReduceGradients(ComputeWorker(model, flat, FullPrecision(model, flat)), flat, comm, 40_000)
    model.backward(np.zeros(1, dtype=np.float32))
    averaging.reduce()
print(f"NOT ABORTED rank {comm.rank}", flush=True)
