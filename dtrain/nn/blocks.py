"""Memory-bound layer work in cache-sized blocks, spread over the process's threads.

Pooling, the im2col/col2im copies and the optimizer updates are chains of cheap array
operations over arrays of tens of MB. Applied to a whole array, every operation in the
chain streams it from RAM; applied to a few channels at a time, the chain runs in cache.
ReLU's one or two operations per element only need pieces large enough to be worth a
thread (:func:`elementwise`). NumPy (and the Numba kernels of :mod:`dtrain.nn.cpu_kernels`)
release the GIL, so blocks handed to different threads run in parallel; the number of
threads is the process's BLAS thread budget (:func:`dtrain.threads.current_blas_threads`,
one per rank under MPI), so the copies use the cores the GEMMs may use, and no more.

On the GPU the whole range is one block on the calling thread: the device parallelizes
each operation by itself, small blocks would only add kernel launches, and a CuPy call
from another thread would run on that thread's current device.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dtrain.backend import is_gpu_array
from dtrain.threads import current_blas_threads

# Bytes one block should touch: well inside a core's L2 cache together with its outputs.
BLOCK_BYTES = 1 << 19
# Bytes of work each thread beyond the calling one must get: less, and waking the thread
# and waiting for it costs more than the work it takes over.
THREAD_MIN_BYTES = 2 << 20
# Bytes one block of :func:`elementwise` touches: a chain of one or two streaming
# operations needs no cache blocking, only pieces large enough to outweigh a call's cost.
ELEMENTWISE_BLOCK_BYTES = 4 << 20

_executor: ThreadPoolExecutor | None = None
_executor_pid: int | None = None
_executor_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """The shared worker threads (created again in a forked child, whose copy has none)."""
    global _executor, _executor_pid
    with _executor_lock:
        if _executor is None or _executor_pid != os.getpid():
            _executor = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="dtrain-blocks")
            _executor_pid = os.getpid()
        return _executor


def split_evenly(total: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` consecutive ``(start, stop)`` ranges covering ``0 .. total``, sizes differing by at most 1."""
    return [(total * p // parts, total * (p + 1) // parts) for p in range(parts)]


def for_blocks(fn: Callable[[int, int], None], total: int, bytes_per_item: int, like: Any,
               block_bytes: int | None = None, merge: bool = False) -> None:
    """Call ``fn(start, stop)`` on consecutive ranges that cover ``0 .. total`` once.

    Each range spans about ``block_bytes`` (default :data:`BLOCK_BYTES`) / ``bytes_per_item``
    items (at least one); the ranges are shared out over the thread budget in contiguous
    runs, the calling thread taking the first, each other thread only for at least
    :data:`THREAD_MIN_BYTES` of the work (smaller work runs on the calling thread alone).
    With ``merge``, each thread calls ``fn`` once, over its whole run: for a compiled kernel,
    which needs no cache blocking and pays a fixed cost per call (Numba checks the types of
    every argument). ``fn`` must only write what its range owns. ``like`` is an array of the operation: a
    GPU array means one call over everything. The first exception raised by any block is
    re-raised once all threads are done.
    """
    if total <= 0:
        return
    if is_gpu_array(like):
        fn(0, total)
        return
    per_block = max(1, (block_bytes or BLOCK_BYTES) // max(1, bytes_per_item))
    blocks = split_evenly(total, -(-total // per_block))
    worth = max(1, total * bytes_per_item // THREAD_MIN_BYTES)
    runs = split_evenly(len(blocks), min(current_blas_threads(), len(blocks), worth))

    def run(first: int, last: int) -> None:
        if merge:
            fn(blocks[first][0], blocks[last - 1][1])
            return
        for start, stop in blocks[first:last]:
            fn(start, stop)

    futures = [_pool().submit(run, first, last) for first, last in runs[1:]]
    try:
        run(*runs[0])
    finally:
        for future in futures:
            future.exception()  # wait for every thread before anything is raised
    for future in futures:
        future.result()


def elementwise(fn: Callable[..., None], *arrays: Any) -> None:
    """Call ``fn(*pieces)`` on matching pieces of same-shaped ``arrays``: 1-D views of one
    range of elements of each array, in memory order, spread over the thread budget with
    :func:`for_blocks` (small arrays, under two blocks of :data:`ELEMENTWISE_BLOCK_BYTES`,
    as one piece on the calling thread). The arrays must share one compact layout (as an
    array and its ``empty_like`` do) for the pieces to match; otherwise, and on the GPU,
    ``fn`` gets the whole arrays in one call. ``fn`` must write only its pieces.
    """
    if is_gpu_array(arrays[0]):
        fn(*arrays)
        return
    views = [_memory_order(a) for a in arrays]
    orders = {order for order, _ in views}
    if None in orders or len(orders) > 1:
        fn(*arrays)
        return
    flat = [view for _, view in views]
    per_item = sum(a.itemsize for a in arrays)
    if flat[0].size * per_item < 2 * ELEMENTWISE_BLOCK_BYTES:
        fn(*flat)  # small: a thread hand-off would cost more than it saves
        return
    for_blocks(lambda start, stop: fn(*(v[start:stop] for v in flat)), flat[0].size, per_item, arrays[0],
               block_bytes=ELEMENTWISE_BLOCK_BYTES)


def _memory_order(a: Any) -> tuple[tuple[int, ...] | None, Any]:
    """``(axes from outermost to innermost in memory, 1-D view in that order)`` of ``a``,
    or ``(None, None)`` when its elements do not fill one contiguous run."""
    axes = tuple(sorted(range(a.ndim), key=lambda i: (a.shape[i] != 1, -abs(a.strides[i]), i)))
    inner = a.transpose(axes)
    if not inner.flags.c_contiguous:
        return None, None
    return tuple(i for i in axes if a.shape[i] != 1), inner.reshape(-1)
