"""Model parallelism for GEMMs: split the rows of ``a`` in ``a @ b`` across devices.

``a`` (M, K) is cut into contiguous row blocks, one per listed device; each block's
product with the whole of ``b`` (K, N) runs on its own device at the same time as the
others, and lands in its rows of one (M, N) result on the caller's device.

On the CPU a "device" is a worker thread (``0``, ``1``, ... or ``"cpu:0"``, ...; at most
one per core the process may use). NumPy releases the GIL inside BLAS, so the blocks
really run in parallel, each with its own BLAS thread budget
(``blas_threads_per_partition``, 1 by default). OpenBLAS built with pthreads (NumPy's
wheels) has one process-wide thread count: ``openblas_set_num_threads_local`` exists
in it but writes the same global (OpenBLAS's pthreads build), so there is
no per-thread setting. The partitioner therefore sets the global count to the budget
(:func:`dtrain.threads.blas_threads`) for the duration of each partitioned product and
restores it afterwards; partitioned products are serialized by a lock so that they never
fight over that global.

On GPUs (CuPy) a device is a CUDA device (``0`` or ``"cuda:0"``); each partition gets
its own non-blocking stream on its device (two partitions on one device get two
streams). Blocks on the caller's device are multiplied straight into the result; a
block on another device gets its rows of ``a`` and all of ``b`` by peer copies (peer
access is switched on where ``deviceCanAccessPeer`` allows) and its product copied back
the same way: no host round trips. The streams wait for the caller's stream before
reading and the caller's stream waits for all of them, so the call is asynchronous like
any other CuPy operation.

What equality it gives: each block is an ordinary GEMM of its rows of ``a`` with ``b``,
so the result is bitwise the product computed block by block, ``a[i:j] @ b`` for each
block, with the same BLAS thread count. It is *not* in general bitwise the unsplit
product: BLAS kernels handle rows in groups whose size depends on the CPU family
(OpenBLAS's Haswell and SkylakeX kernels differ), and a row may be rounded by another
kernel variant when it lands elsewhere in a group. Both results are GEMMs summing the
same K products, each within ``K * eps / (1 - K * eps)`` times ``|a| @ |b|`` of the exact
product (the standard dot-product error bound), so they differ by at most twice that,
element by element. Blocks are as even as possible (:func:`split_rows`).
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from dtrain.backend import get_array_module, gpu_available, rank_gpus
from dtrain.checks import check_int
from dtrain.nn import gemm
from dtrain.nn.blocks import split_evenly
from dtrain.threads import blas_threads, usable_cores

# cudaErrorPeerAccessAlreadyEnabled of the CUDA runtime API. CuPy 13 and 14 declare the
# error codes at C level only, so there is no Python attribute to compare with.
PEER_ACCESS_ALREADY_ENABLED = 704

# OpenBLAS's thread count is process-global: one partitioned CPU product at a time.
_BLAS_LOCK = threading.Lock()


@dataclass(frozen=True)
class PartitionDevice:
    """One entry of a device list: ``kind`` is "cpu", "cuda", or None for a bare int,
    which means whatever the operands live on (CPU threads for NumPy, GPUs for CuPy)."""

    kind: str | None
    index: int

    def __str__(self) -> str:
        return f"{self.kind}:{self.index}" if self.kind else str(self.index)


def parse_device(spec: Any) -> PartitionDevice:
    """``0``, ``"cpu:0"``, ``"cuda:0"`` or ``"gpu:0"`` as a :class:`PartitionDevice`."""
    if isinstance(spec, PartitionDevice):
        return spec
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, (bool, np.bool_)):
        if spec < 0:
            raise ValueError(f"unknown device {spec!r}: device indices are >= 0")
        return PartitionDevice(None, int(spec))
    if isinstance(spec, str):
        kind, sep, index = spec.strip().lower().partition(":")
        if sep and kind in ("cpu", "cuda", "gpu") and index.isdigit():
            return PartitionDevice("cuda" if kind == "gpu" else kind, int(index))
    raise ValueError(
        f"unknown device {spec!r}: use an index (0, 1, ...) or 'cpu:<i>' / 'cuda:<i>' (e.g. 'cpu:0')"
    )


def device_count(kind: str) -> int:
    """How many devices of ``kind`` ("cpu": usable cores, "cuda": visible GPUs) exist."""
    if kind == "cpu":
        return usable_cores()
    if not gpu_available():
        return 0
    import cupy

    return cupy.cuda.runtime.getDeviceCount()


def partition_devices(listed: Sequence[int | str], per_rank: int, device: str, local_rank: int,
                      local_size: int) -> list[int | str]:
    """The devices a rank splits its GEMMs across: ``listed`` (``parallel.row_partition.devices``)
    if any, else ``per_rank`` of them (``parallel.devices_per_rank``): the rank's GPUs
    (:func:`dtrain.backend.rank_gpus`) or that many CPU worker threads. A list of one or
    none means plain GEMMs."""
    if listed:
        return list(listed)
    if per_rank < 2:
        return []
    if device == "gpu":
        return list(rank_gpus(local_rank, local_size, per_rank, device_count("cuda")))
    return [f"cpu:{i}" for i in range(per_rank)]


def _check_exists(device: PartitionDevice, kind: str) -> None:
    count = device_count(kind)
    if device.index >= count:
        what = "usable CPU cores" if kind == "cpu" else "visible CUDA devices"
        valid = f"{kind}:0..{kind}:{count - 1}" if count else "none"
        raise ValueError(f"unknown device {kind}:{device.index}: this machine has {count} {what} (valid: {valid})")


def _check_operands(a: Any, b: Any, out: Any, xp: ModuleType) -> None:
    if getattr(a, "ndim", None) != 2 or getattr(b, "ndim", None) != 2:
        raise ValueError(
            f"row-partitioned matmul needs 2-D a (M, K) and b (K, N); got a.shape={getattr(a, 'shape', None)}, "
            f"b.shape={getattr(b, 'shape', None)}"
        )
    if a.shape[1] != b.shape[0]:
        raise ValueError(
            f"row-partitioned matmul: inner dimensions differ, a is {tuple(a.shape)} and b is {tuple(b.shape)} "
            f"(a.shape[1] must equal b.shape[0])"
        )
    if get_array_module(b) is not xp or (out is not None and get_array_module(out) is not xp):
        raise ValueError("row-partitioned matmul: a, b and out must all be NumPy arrays or all CuPy arrays")
    if out is not None and tuple(out.shape) != (a.shape[0], b.shape[1]):
        raise ValueError(
            f"row-partitioned matmul: out has shape {tuple(out.shape)}, a {tuple(a.shape)} @ b {tuple(b.shape)} "
            f"needs {(a.shape[0], b.shape[1])}"
        )


class RowPartitioner:
    """Row partitioner over ``devices``: ``partitioner(a, b, out) -> out``.

    The one API: a context manager. Inside ``with RowPartitioner(devices):`` every
    Conv2d/Linear GEMM (:func:`dtrain.nn.gemm.matmul`) goes through it; on leaving, the
    previous routing comes back and the partitioner closes (its threads stop). Called
    directly, it multiplies whatever it is given. Holds one worker thread per partition
    (CPU) or one stream per partition (GPU), created on first use. A device may be listed
    more than once: each listing is a partition with its own thread/stream.
    """

    def __init__(
        self,
        devices: Sequence[int | str],
        blas_threads_per_partition: int = 1,
    ) -> None:
        if isinstance(devices, (str, int)) or not len(devices):
            raise ValueError(f"RowPartitioner needs a non-empty list of devices, e.g. [0, 1]; got {devices!r}")
        self.devices = tuple(parse_device(d) for d in devices)
        kinds = {d.kind for d in self.devices} - {None}
        if len(kinds) > 1:
            raise ValueError(f"devices {[str(d) for d in self.devices]} mix CPU and GPU; list one kind")
        for device in self.devices:
            if device.kind is not None:
                _check_exists(device, device.kind)
        check_int(blas_threads_per_partition, "RowPartitioner: blas_threads_per_partition", 1)
        self.blas_threads_per_partition = blas_threads_per_partition
        self._workers: list[ThreadPoolExecutor] | None = None
        self._streams: list[Any] | None = None
        self._peers_enabled: set[tuple[int, int]] = set()
        self._closed = False
        self._routed_before: list[Any] = []

    def __repr__(self) -> str:
        return (
            f"RowPartitioner(devices={[str(d) for d in self.devices]}, "
            f"blas_threads_per_partition={self.blas_threads_per_partition})"
        )

    def __call__(self, a: Any, b: Any, out: Any = None) -> Any:
        """``a @ b`` for ``a`` (M, K) and ``b`` (K, N) with the rows of ``a`` split across
        the devices; the (M, N) result is written into ``out`` if given and returned."""
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        xp = get_array_module(a)
        _check_operands(a, b, out, xp)
        kind = "cpu" if xp is np else "cuda"
        self._check_kind(kind)
        spans = [(p, start, stop) for p, (start, stop) in enumerate(split_evenly(a.shape[0], len(self.devices)))
                 if stop > start]
        # Written in place: a C-contiguous out, or on the CPU any out with contiguous rows (a
        # block of a convolution's output columns); the GPU's peer copies need contiguous memory.
        in_place = out is not None and (out.flags.c_contiguous or (kind == "cpu" and out.strides[-1] == out.itemsize))
        direct = in_place and not (xp.may_share_memory(out, a) or xp.may_share_memory(out, b))
        if kind == "cpu":
            result = out if direct else np.empty((a.shape[0], b.shape[1]), dtype=np.result_type(a.dtype, b.dtype))
            self._run_on_threads(a, b, result, spans)
        else:
            _check_same_gpu(a, b, out)
            result = self._run_on_gpus(xp, a, b, out if direct else None, spans)
        if out is not None and result is not out:
            out[...] = result
            return out
        return result

    def close(self) -> None:
        """Stop the worker threads and drop the streams; the partitioner is unusable after."""
        self._closed = True
        for worker in self._workers or ():
            worker.shutdown(wait=True)
        self._workers = self._streams = None

    def __enter__(self) -> RowPartitioner:
        self._routed_before.append(gemm.set_partitioner(self))
        return self

    def __exit__(self, *exc: object) -> None:
        gemm.set_partitioner(self._routed_before.pop())
        self.close()

    def _check_kind(self, kind: str) -> None:
        named = {d.kind for d in self.devices} - {None}
        if named and named != {kind}:
            library = "NumPy" if kind == "cpu" else "CuPy"
            raise ValueError(
                f"devices {[str(d) for d in self.devices]} cannot multiply {library} arrays; "
                f"list {kind}:<i> devices or move the operands with dtrain.backend.to_device"
            )
        for device in self.devices:
            if device.kind is None:
                _check_exists(device, kind)

    # CPU: one single-thread executor per partition, so partition p always runs on the
    # same thread; the caller only waits.
    def _run_on_threads(self, a: np.ndarray, b: np.ndarray, result: np.ndarray, spans: list) -> None:
        if self._workers is None:
            self._workers = [
                ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"row-partition-{p}-cpu{d.index}")
                for p, d in enumerate(self.devices)
            ]
        with _BLAS_LOCK, blas_threads(self.blas_threads_per_partition):
            futures = [
                self._workers[p].submit(np.matmul, a[start:stop], b, out=result[start:stop])
                for p, start, stop in spans
            ]
            wait(futures)  # every block finishes before anyone sees an error
        for future in futures:
            future.result()

    # GPU: everything is queued from this thread; concurrency comes from the streams.
    def _run_on_gpus(self, cp: ModuleType, a: Any, b: Any, out: Any, spans: list) -> Any:
        home = a.device.id
        with cp.cuda.Device(home):
            if self._streams is None:
                self._streams = []
                for d in self.devices:
                    with cp.cuda.Device(d.index):
                        self._streams.append(cp.cuda.Stream(non_blocking=True))
            result = out if out is not None else cp.empty((a.shape[0], b.shape[1]), cp.result_type(a.dtype, b.dtype))
            caller = cp.cuda.get_current_stream()
            if any(self.devices[p].index != home for p, _, _ in spans):
                # Peer copies move raw bytes, so remote partitions need C-contiguous sources.
                a, b = cp.ascontiguousarray(a), cp.ascontiguousarray(b)
            inputs_ready = caller.record()
            finished = []
            for p, start, stop in spans:
                device, stream = self.devices[p].index, self._streams[p]
                with cp.cuda.Device(device), stream:
                    stream.wait_event(inputs_ready)
                    if device == home:
                        cp.matmul(a[start:stop], b, out=result[start:stop])
                    else:
                        self._remote_block(cp, a[start:stop], b, result[start:stop], device, home, stream)
                    finished.append(stream.record())
            for event in finished:
                caller.wait_event(event)
        return result

    def _remote_block(
        self, cp: ModuleType, a_rows: Any, b: Any, out_rows: Any, device: int, home: int, stream: Any
    ) -> None:
        """``out_rows = a_rows @ b`` computed on ``device`` from operands on ``home``.

        Runs with ``device`` and ``stream`` current; the temporaries come from the memory
        pool of this stream, so their reuse is ordered after this block's work."""
        self._enable_peer_access(cp, device, home)
        a_here = cp.empty(a_rows.shape, a_rows.dtype)
        b_here = cp.empty(b.shape, b.dtype)
        _peer_copy(cp, a_here, device, a_rows, home, stream)
        _peer_copy(cp, b_here, device, b, home, stream)
        product = cp.matmul(a_here, b_here).astype(out_rows.dtype, copy=False)
        _peer_copy(cp, out_rows, home, product, device, stream)

    def _enable_peer_access(self, cp: ModuleType, device: int, home: int) -> None:
        runtime = cp.cuda.runtime
        for src, dst in ((device, home), (home, device)):
            if (src, dst) in self._peers_enabled or not runtime.deviceCanAccessPeer(src, dst):
                continue
            with cp.cuda.Device(src):
                try:
                    runtime.deviceEnablePeerAccess(dst)
                except runtime.CUDARuntimeError as error:
                    if error.status != PEER_ACCESS_ALREADY_ENABLED:  # e.g. another partitioner enabled it
                        raise
            self._peers_enabled.add((src, dst))


def _check_same_gpu(a: Any, b: Any, out: Any) -> None:
    """The operands must live on one GPU, the caller's; the partitions move their own copies."""
    for name, x in (("b", b), ("out", out)):
        if x is not None and x.device.id != a.device.id:
            raise ValueError(
                f"row-partitioned matmul: a is on cuda:{a.device.id} but {name} is on cuda:{x.device.id}; "
                "keep a, b and out on the caller's device (the partitions copy what they need)"
            )


def _peer_copy(cp: ModuleType, dst: Any, dst_device: int, src: Any, src_device: int, stream: Any) -> None:
    """Queue a copy of C-contiguous ``src`` into C-contiguous ``dst`` across devices."""
    if src.nbytes:
        cp.cuda.runtime.memcpyPeerAsync(dst.data.ptr, dst_device, src.data.ptr, src_device, src.nbytes, stream.ptr)
