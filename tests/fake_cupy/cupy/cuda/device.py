"""Fake ``cupy.cuda.Device``: selects the calling thread's current device (see :mod:`cupy.cuda.runtime`)."""
from __future__ import annotations

from cupy.cuda import runtime


class Device:
    """A device by index (the current one by default).

    As in CuPy, constructing one never fails; ``use()`` and entering it as a context
    manager raise ``CUDARuntimeError`` (101, ``cudaErrorInvalidDevice``) for an index that
    is not visible. The context manager restores the previous device on exit.
    """

    def __init__(self, device: int | None = None) -> None:
        self.id = runtime.getDevice() if device is None else int(device)
        self._previous: list[int] = []

    def use(self) -> None:
        runtime.setDevice(self.id)

    def synchronize(self) -> None:
        """Nothing to wait for (the fake is synchronous); checks that the device exists."""
        with self:
            runtime.deviceSynchronize()

    def __enter__(self) -> Device:
        current = runtime.getDevice()
        if self.id != current:
            self.use()
        self._previous.append(current)
        return self

    def __exit__(self, *exc: object) -> None:
        runtime.setDevice(self._previous.pop())

    def __int__(self) -> int:
        return self.id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self) -> int:
        return self.id

    def __repr__(self) -> str:
        return f"<CUDA Device {self.id}>"
