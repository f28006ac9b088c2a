"""Fake CUDA streams and events.

Everything in the fake runs synchronously when it is called, which is one valid
schedule of the real asynchronous semantics: streams and events only keep CuPy's
bookkeeping and checks. A stream belongs to the device current when it was made (the
null stream, ``Stream.null``, to whichever device is current); making a stream current
(``with stream:`` or ``use()``) requires its device to be the current one, as in CuPy.
Each thread has a current stream per device, initially the null stream. An event belongs
to the device current at its creation and can only be recorded on a stream of that
device (``cudaErrorInvalidResourceHandle`` otherwise, as in CUDA). Recording stores
``time.perf_counter()``; :func:`get_elapsed_time` gives the milliseconds between two
recorded timing events of one device, rounded to float32 like CUDA's ``float``.
"""
from __future__ import annotations

import itertools
import threading
import time

import numpy as np

from cupy.cuda import runtime

_handles = itertools.count(0x7F0000001000, 0x10)  # fake stream/event handles: unique, nonzero
_local = threading.local()  # .current: {device: Stream}; .stack: [(device, previous Stream)]


def _current_streams() -> dict[int, Stream]:
    if not hasattr(_local, "current"):
        _local.current, _local.stack = {}, []
    return _local.current


class Event:
    """A CUDA event; ``done`` is always True (the fake never has pending work)."""

    def __init__(self, block: bool = False, disable_timing: bool = False, interprocess: bool = False) -> None:
        if interprocess and not disable_timing:
            raise ValueError("Timing must be disabled for interprocess events")
        self.ptr = next(_handles)
        self._device = runtime.getDevice()
        self._timing = not disable_timing
        self._recorded_at: float | None = None

    @property
    def done(self) -> bool:
        return True

    def record(self, stream: Stream | None = None) -> None:
        """Record on ``stream`` (the current stream by default), which must be on this event's device."""
        stream = get_current_stream() if stream is None else stream
        if stream._resolved_device() != self._device:
            raise runtime.CUDARuntimeError(runtime._INVALID_HANDLE)
        self._recorded_at = time.perf_counter()

    def synchronize(self) -> None:
        """Nothing to wait for."""

    def __repr__(self) -> str:
        return f"<Event 0x{self.ptr:x} (device {self._device})>"


def get_elapsed_time(start_event: Event, end_event: Event) -> float:
    """Milliseconds from ``start_event`` to ``end_event``: recorded timing events of one device."""
    for event in (start_event, end_event):
        if not event._timing or event._recorded_at is None or event._device != start_event._device:
            raise runtime.CUDARuntimeError(runtime._INVALID_HANDLE)
    return float(np.float32((end_event._recorded_at - start_event._recorded_at) * 1e3))


class Stream:
    """A CUDA stream (``null=True``: the legacy default stream, handle 0)."""

    null: Stream  # set below

    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False,
                 priority: int | None = None) -> None:
        if ptds:
            raise NotImplementedError("the fake cupy has no per-thread default stream")
        if null:
            self.ptr, self.device_id = 0, -1
        else:
            self.ptr, self.device_id = next(_handles), runtime.getDevice()
            runtime._register_stream(self, self.ptr, self.device_id)
        self.is_non_blocking = non_blocking

    def _resolved_device(self) -> int:
        return runtime.getDevice() if self.device_id == -1 else self.device_id

    def _check_current_device(self) -> int:
        device, current = self._resolved_device(), runtime.getDevice()
        if device != current:
            raise RuntimeError(f"The device that the stream is created on ({device}) "
                               f"does not match with the current device ({current})")
        return device

    def __enter__(self) -> Stream:
        device = self._check_current_device()
        current = _current_streams()
        _local.stack.append((device, current.get(device, Stream.null)))
        current[device] = self
        return self

    def __exit__(self, *exc: object) -> None:
        device, previous = _local.stack.pop()
        _current_streams()[device] = previous

    def use(self) -> Stream:
        _current_streams()[self._check_current_device()] = self
        return self

    @property
    def done(self) -> bool:
        return True

    def synchronize(self) -> None:
        """Nothing to wait for."""

    def record(self, event: Event | None = None) -> Event:
        """Record ``event`` (a new one by default) on this stream and return it."""
        event = Event() if event is None else event
        event.record(self)
        return event

    def wait_event(self, event: Event) -> None:
        """Later work on this stream waits for ``event``: already true in the fake."""
        if not isinstance(event, Event):
            raise TypeError(f"wait_event needs a cupy.cuda.Event, got {type(event).__name__}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stream) and other.ptr == self.ptr

    def __hash__(self) -> int:
        return self.ptr

    def __repr__(self) -> str:
        return f"<Stream {self.ptr} (device {self.device_id})>"


Stream.null = Stream(null=True)


def get_current_stream(device_id: int = -1) -> Stream:
    """The calling thread's current stream on ``device_id`` (the current device by default)."""
    device = runtime.getDevice() if device_id == -1 else device_id
    return _current_streams().get(device, Stream.null)
