"""Transport between the ranks of a job: one :class:`Communicator` class per strategy.

``make_communicator`` picks the backend: a world of one (``single``), MPI on host arrays
(``mpi``, mpi4py) or NCCL on GPU arrays (``nccl``, CuPy). Failure handling (an error on
one rank ends all, a stuck collective times out) is :mod:`dtrain.comm.watchdog`. What is
sent (gradients, statistics) is decided by the strategies in :mod:`dtrain.parallel`.
"""
from __future__ import annotations

from dtrain.comm.base import Communicator, Handle
from dtrain.comm.env import launched_by_mpi, world_size_from_env
from dtrain.comm.single import SingleCommunicator

BACKENDS = ("auto", "nccl", "mpi", "single")
DEVICES = ("cpu", "gpu")

__all__ = ["BACKENDS", "Communicator", "Handle", "make_communicator"]


def make_communicator(backend: str = "auto", device: str = "cpu", timeout_s: float | None = None,
                      devices_per_rank: int = 1, mpi_piece_bytes: int | None = None) -> Communicator:
    """The communicator for ``backend`` on ``device`` (``cpu`` or ``gpu``).

    ``auto`` means ``single`` when the process was not started by an MPI launcher, else
    ``nccl`` on GPU and ``mpi`` on CPU. ``timeout_s`` bounds barriers and gradient
    reductions (None: no limit); see :class:`dtrain.comm.watchdog.CollectiveWatchdog`.
    ``devices_per_rank`` > 1 (hybrid data + row parallelism on GPUs): node-local rank
    ``r`` owns GPUs ``r*K .. r*K+K-1`` and communicates from the first of them.
    ``mpi_piece_bytes``: the MPI backend's all-reduce piece size (None: its default; 0: whole buffers).
    """
    if backend not in BACKENDS:
        raise ValueError(f"parallel backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if device not in DEVICES:
        raise ValueError(f"make_communicator: device must be 'cpu' or 'gpu' (resolve 'auto' first); got {device!r}")
    if backend == "auto":
        backend = "single" if not launched_by_mpi() else ("nccl" if device == "gpu" else "mpi")
    if backend == "single":
        launched = world_size_from_env()
        if launched is not None and launched > 1:
            raise ValueError(
                f"backend=single, but the launcher started {launched} processes: each would train alone "
                f"on the whole data set; use backend=auto (or mpi/nccl), or run without mpirun"
            )
        return SingleCommunicator(timeout_s=timeout_s)
    if backend == "nccl" and device != "gpu":
        raise ValueError("backend=nccl needs device=gpu; use backend=mpi (or auto) for CPU training")
    if backend == "mpi" and device != "cpu":
        raise ValueError("backend=mpi reduces host (NumPy) arrays; with device=gpu use backend=nccl (or auto)")
    try:
        import mpi4py  # noqa: F401  (only checks that it is installed)
    except ImportError as exc:
        raise RuntimeError(
            f"backend={backend} needs mpi4py and an MPI library: pip install 'dtrain[mpi]' "
            f"(or run one process without mpirun and backend=single)"
        ) from exc
    if backend == "mpi":
        from dtrain.comm.mpi import DEFAULT_PIECE_BYTES, MpiCommunicator

        piece = DEFAULT_PIECE_BYTES if mpi_piece_bytes is None else mpi_piece_bytes
        return MpiCommunicator(timeout_s=timeout_s, piece_bytes=piece)
    from dtrain.comm.nccl import NcclCommunicator

    return NcclCommunicator(timeout_s=timeout_s, devices_per_rank=devices_per_rank)
