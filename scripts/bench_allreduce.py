"""All-reduce bandwidth of dtrain's communicator (and of torch.distributed, side by side).

    mpirun -n 2 python scripts/bench_allreduce.py                  # MPI on host buffers
    mpirun -n 2 python scripts/bench_allreduce.py --device gpu     # NCCL on GPU buffers
    mpirun -n 2 python scripts/bench_allreduce.py --no-torch       # dtrain only
    mpirun -n 2 python scripts/bench_allreduce.py --nonblocking    # iallreduce + wait (the reducer's path)

For each float32 buffer size, every repetition is: barrier, one in-place sum all-reduce
(and a device synchronize on GPU); a repetition's time is the slowest rank's, and the
table shows the median over repetitions. Bandwidths follow nccl-tests:
``algbw = bytes / time`` and ``busbw = algbw * 2 (n - 1) / n`` (the per-link traffic of a
ring all-reduce, comparable across rank counts). With torch (gloo on CPU, NCCL on GPU)
the two frameworks' repetitions are interleaved so machine noise hits both alike, and the
last column is dtrain busbw / torch busbw.
"""
from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dtrain.backend import synchronize, xp_for
from dtrain.comm import Communicator, make_communicator

MIB = 2**20


def time_once(comm: Communicator, xp: Any, run: Callable[[], None]) -> float:
    comm.barrier()
    t0 = time.perf_counter()
    run()
    synchronize(xp)
    return time.perf_counter() - t0


def init_torch(comm: Communicator, device: str) -> Any:
    """torch.distributed with gloo (CPU) or NCCL (GPU), rendezvous at rank 0's host. On GPU
    each rank first selects the GPU dtrain's NCCL communicator uses: without that every
    rank would put its tensors on cuda:0 and NCCL stops with "Duplicate GPU detected"."""
    import torch
    import torch.distributed as dist

    if device == "gpu":
        torch.cuda.set_device(comm.device_id)
    address = None
    if comm.rank == 0:
        with socket.socket() as s:  # a free port; closed again before torch binds it
            s.bind(("", 0))
            address = f"tcp://{socket.gethostbyname(socket.gethostname())}:{s.getsockname()[1]}"
    address = comm.bcast_object(address)
    dist.init_process_group("nccl" if device == "gpu" else "gloo", init_method=address,
                            rank=comm.rank, world_size=comm.size)
    return dist


def torch_allreduce(dist: Any, buf: Any, device: str) -> Callable[[], None]:
    import torch

    tensor = torch.as_tensor(buf, device="cuda" if device == "gpu" else "cpu")  # shares memory
    return lambda: dist.all_reduce(tensor)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="auto", choices=["auto", "mpi", "nccl"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--sizes-mib", default="1,2,4,8,16,32,64,100", help="comma-separated buffer sizes in MiB")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--nonblocking", action="store_true",
                    help="time comm.iallreduce(buf).wait(), the overlapped reducer's path, not comm.allreduce")
    ap.add_argument("--no-torch", dest="torch", action="store_false", help="skip the torch.distributed comparison")
    args = ap.parse_args()

    comm = make_communicator(args.backend, args.device)
    if comm.size < 2:
        sys.exit("run under mpirun with at least 2 ranks: mpirun -n 2 python scripts/bench_allreduce.py")
    xp = xp_for(args.device)
    dist = init_torch(comm, args.device) if args.torch else None
    torch_backend = dist.get_backend() if dist else None
    factor = 2 * (comm.size - 1) / comm.size

    rows = []
    for mib in (float(s) for s in args.sizes_mib.split(",")):
        n = int(mib * MIB) // 4
        buf = xp.ones(n, dtype=xp.float32)
        ours = (lambda: comm.iallreduce(buf).wait()) if args.nonblocking else (lambda: comm.allreduce(buf))
        theirs = torch_allreduce(dist, xp.ones(n, dtype=xp.float32), args.device) if dist else None
        times: dict[str, list[float]] = {"dtrain": [], "torch": []}
        for rep in range(args.warmup + args.reps):
            t = time_once(comm, xp, ours)
            if rep >= args.warmup:
                times["dtrain"].append(t)
            if theirs is not None:
                t = time_once(comm, xp, theirs)
                if rep >= args.warmup:
                    times["torch"].append(t)
        check = xp.full(n, comm.rank + 1, dtype=xp.float32)
        comm.allreduce(check)
        assert bool((check == comm.size * (comm.size + 1) / 2).all()), "all-reduce gave a wrong sum"
        slowest = {k: [max(ts) for ts in zip(*comm.allgather_object(v))] for k, v in times.items() if v}
        rows.append((mib, n * 4, {k: statistics.median(v) for k, v in slowest.items()}))
    if dist:
        dist.destroy_process_group()

    if comm.rank != 0:
        return
    call = "iallreduce+wait" if args.nonblocking else "allreduce"
    print(f"{call} (sum, float32, in place): {comm.size} ranks, dtrain backend {comm.name}"
          + (f", torch {torch_backend}" if dist else "") + f"; median of {args.reps} reps; GB/s = 1e9 B/s")
    head = f"{'size MiB':>9} {'time ms':>9} {'algbw':>7} {'busbw':>7}"
    if dist:
        head += f" | {'torch ms':>9} {'busbw':>7} | {'ratio':>5}"
    print(head)
    for mib, nbytes, med in rows:
        algbw = nbytes / med["dtrain"] / 1e9
        line = f"{mib:>9g} {med['dtrain'] * 1e3:>9.2f} {algbw:>7.2f} {algbw * factor:>7.2f}"
        if dist:
            torch_bus = nbytes / med["torch"] / 1e9 * factor
            line += f" | {med['torch'] * 1e3:>9.2f} {torch_bus:>7.2f} | {algbw * factor / torch_bus:>5.2f}"
        print(line)


if __name__ == "__main__":
    main()
