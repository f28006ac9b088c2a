"""A rank that never reaches a collective: the watchdog on the others aborts the job.

Usage: watchdog.py barrier|reducer
"""
from __future__ import annotations

import sys
import time

import numpy as np
from toy import toy_model

from dtrain.dist import make_communicator
from dtrain.dist.buckets import GradientReducer
from dtrain.dist.guard import install_abort_on_exception
from dtrain.nn.flat import FlatParameters

comm = make_communicator("mpi", "cpu", timeout_s=1.5)
install_abort_on_exception(comm)
comm.barrier()
if comm.rank == comm.size - 1:
    time.sleep(60)  # stuck: never joins the collective below
elif sys.argv[1] == "barrier":
    comm.barrier()
else:
    model = toy_model(comm.rank)
    reducer = GradientReducer(FlatParameters(model), comm, model, bucket_bytes=40_000)
    model.backward(np.zeros(1, dtype=np.float32))
    reducer.finish()
print(f"NOT ABORTED rank {comm.rank}", flush=True)
