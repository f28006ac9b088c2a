"""Fake ``cupy.cuda.runtime``: the visible devices, the current device, peer access and peer copies.

Devices: ``FAKE_CUPY_GPUS`` (default 2) physical GPUs, filtered by ``CUDA_VISIBLE_DEVICES``
the way the CUDA runtime does it: the listed physical indices in order, up to the first
entry that is not a valid, not yet listed index (``"1"`` of 2 GPUs: one visible device;
``"0,5,1"``: only ``0``). Visible devices are numbered 0, 1, ... as in CUDA; the count is
read once, at first use, like CUDA reads it at initialization. No visible device makes
every device query fail with ``cudaErrorNoDevice``, as CUDA does.

The current device is per host thread and starts at 0, as in CUDA. Peer access is
possible between any two distinct devices, unless ``FAKE_CUPY_PEER_ACCESS=0`` (then
``deviceCanAccessPeer`` says 0, like GPUs without P2P, and operations that touch another
device's array raise ``ValueError`` as CuPy does there). Peer copies always work (CUDA
stages them through the host when there is no P2P).

Differences from CuPy: only the functions dtrain needs exist; nothing is asynchronous
(``memcpyPeerAsync`` copies before it returns, a valid schedule of the real call); and
pointers passed to copies must lie in live fake device arrays of the stated devices
(``cudaErrorInvalidValue`` otherwise), where CUDA would fault or read garbage. Like CuPy
14, the module has no ``errorPeerAccessAlreadyEnabled``-style constants: compare
``CUDARuntimeError.status`` with the number (704).
"""
from __future__ import annotations

import ctypes
import functools
import os
import threading
import weakref

# The CUDA errors the fake raises, with the name and message cudaGetErrorName/String give.
_INVALID_VALUE = 1
_NO_DEVICE = 100
_INVALID_DEVICE = 101
_PEER_UNSUPPORTED = 217
_INVALID_HANDLE = 400
_PEER_ALREADY_ENABLED = 704
_ERRORS = {
    _INVALID_VALUE: ("cudaErrorInvalidValue", "invalid argument"),
    _NO_DEVICE: ("cudaErrorNoDevice", "no CUDA-capable device is detected"),
    _INVALID_DEVICE: ("cudaErrorInvalidDevice", "invalid device ordinal"),
    _PEER_UNSUPPORTED: ("cudaErrorPeerAccessUnsupported", "peer access is not supported between these two devices"),
    _INVALID_HANDLE: ("cudaErrorInvalidResourceHandle", "invalid resource handle"),
    _PEER_ALREADY_ENABLED: ("cudaErrorPeerAccessAlreadyEnabled", "peer access is already enabled"),
}

_local = threading.local()  # .device: this thread's current device
_lock = threading.Lock()
_peer_enabled: set[tuple[int, int]] = set()  # (device, peer): device may access peer's memory
_streams: dict[int, int] = {}  # live stream handle -> its device


class CUDARuntimeError(RuntimeError):
    """A CUDA runtime error; ``status`` is the ``cudaError_t`` number (e.g. 101, 704)."""

    def __init__(self, status: int) -> None:
        self.status = status
        name, message = _ERRORS.get(status, ("unrecognized error code", "unrecognized error code"))
        super().__init__(f"{name}: {message}")

    def __reduce__(self) -> tuple:
        return (type(self), (self.status,))


@functools.cache
def _visible() -> tuple[int, ...]:
    """The physical GPU of each visible device."""
    physical = int(os.environ.get("FAKE_CUPY_GPUS", "2"))
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return tuple(range(physical))
    visible: list[int] = []
    for entry in listed.split(","):
        entry = entry.strip()
        if not entry.isdigit() or int(entry) >= physical or int(entry) in visible:
            break
        visible.append(int(entry))
    return tuple(visible)


def _physical_id(device: int) -> int:
    """Which physical GPU the visible ``device`` is (what NCCL sees as the GPU's bus id)."""
    _check_device(device)
    return _visible()[device]


def _check_device(device: int) -> None:
    count = len(_visible())
    if count == 0:
        raise CUDARuntimeError(_NO_DEVICE)
    if not 0 <= device < count:
        raise CUDARuntimeError(_INVALID_DEVICE)


def getDeviceCount() -> int:
    """The number of visible fake GPUs (``cudaErrorNoDevice`` when there is none)."""
    if not _visible():
        raise CUDARuntimeError(_NO_DEVICE)
    return len(_visible())


def getDevice() -> int:
    """The calling thread's current device."""
    device = getattr(_local, "device", 0)
    _check_device(device)
    return device


def setDevice(device: int) -> None:
    """Make ``device`` current for the calling thread (``cudaErrorInvalidDevice`` if not visible)."""
    _check_device(device)
    _local.device = device


def deviceSynchronize() -> None:
    """Nothing to wait for: the fake runs everything synchronously."""
    getDevice()


def runtimeGetVersion() -> int:
    return 12080


def _peer_capable() -> bool:
    return os.environ.get("FAKE_CUPY_PEER_ACCESS", "1") != "0"


def deviceCanAccessPeer(device: int, peer: int) -> int:
    """1 if ``device`` can map ``peer``'s memory (any two distinct devices), else 0."""
    _check_device(device)
    _check_device(peer)
    return int(device != peer and _peer_capable())


def deviceEnablePeerAccess(peer: int) -> None:
    """Let the current device access ``peer``'s memory; 704 if that is already enabled
    (also when CuPy enabled it implicitly, for an operation on another device's array)."""
    device = getDevice()
    _check_device(peer)
    if peer == device:
        raise CUDARuntimeError(_INVALID_DEVICE)
    if not _peer_capable():
        raise CUDARuntimeError(_PEER_UNSUPPORTED)
    with _lock:
        if (device, peer) in _peer_enabled:
            raise CUDARuntimeError(_PEER_ALREADY_ENABLED)
        _peer_enabled.add((device, peer))


def _enable_peer_access(device: int, peer: int) -> bool:
    """CuPy's implicit peer access (``cupy.cuda.device._enable_peer_access``): enable
    ``device`` -> ``peer`` if possible, already enabled or not; False when impossible."""
    if not deviceCanAccessPeer(device, peer):
        return False
    with _lock:
        _peer_enabled.add((device, peer))
    return True


def _register_stream(stream: object, ptr: int, device: int) -> None:
    """Remember a live stream's handle so that calls taking a stream pointer can check it."""
    with _lock:
        _streams[ptr] = device
    weakref.finalize(stream, _streams.pop, ptr, None)


def _stream_device(ptr: int) -> int:
    """The device of the live stream ``ptr`` (0, the legacy default stream: the current
    device); ``cudaErrorInvalidResourceHandle`` for an unknown handle."""
    if ptr == 0:
        return getDevice()
    device = _streams.get(ptr)
    if device is None:
        raise CUDARuntimeError(_INVALID_HANDLE)
    return device


def memcpyPeer(dst: int, dstDevice: int, src: int, srcDevice: int, size: int) -> None:
    """Copy ``size`` bytes from ``src`` on ``srcDevice`` to ``dst`` on ``dstDevice``."""
    from cupy.cuda import memory

    _check_device(dstDevice)
    _check_device(srcDevice)
    for ptr, device in ((dst, dstDevice), (src, srcDevice)):
        if not memory._is_device_memory(ptr, size, device):
            raise CUDARuntimeError(_INVALID_VALUE)
    ctypes.memmove(dst, src, size)


def memcpyPeerAsync(dst: int, dstDevice: int, src: int, srcDevice: int, size: int, stream: int) -> None:
    """:func:`memcpyPeer` queued on ``stream``; the fake copies before returning."""
    _stream_device(stream)
    memcpyPeer(dst, dstDevice, src, srcDevice, size)
