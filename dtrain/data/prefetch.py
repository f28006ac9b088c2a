"""Computing the next few results of a map in a background thread while the consumer works."""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_POLL_S = 0.05  # how often blocked calls look at the stop flag / the worker's liveness
_RESULT, _END, _FAILURE = "result", "end", "failure"


def prefetched(fn: Callable[[T], R], items: Iterable[T], depth: int) -> Iterator[R]:
    """``fn(item)`` for each item, in order; up to ``depth`` results are computed ahead in a
    daemon thread (``depth == 0``: no thread, computed on demand).

    An exception in ``fn`` is re-raised in the consumer at the position it happened. Closing
    the iterator early (``break``, garbage collection, ``close()``) stops the thread and waits
    for it, so no thread outlives the iteration.
    """
    if depth == 0:
        yield from map(fn, items)
        return
    results: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(message: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                results.put(message, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not offer((_RESULT, fn(item))):
                    return
            offer((_END, None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            offer((_FAILURE, exc))

    worker = threading.Thread(target=work, name="dtrain-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = _next_message(results, worker)
            if kind == _END:
                return
            if kind == _FAILURE:
                raise value
            yield value
    finally:
        stop.set()
        worker.join()


def _next_message(results: queue.Queue, worker: threading.Thread) -> tuple[str, Any]:
    while True:
        try:
            return results.get(timeout=_POLL_S)
        except queue.Empty:
            if not worker.is_alive() and results.empty():
                raise RuntimeError("the prefetch thread ended without delivering its results") from None
