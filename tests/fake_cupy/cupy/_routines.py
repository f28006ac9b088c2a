"""The fake ``cupy``'s module-level functions.

Host data enters only through :func:`asarray` / :func:`array` (a host-to-device copy onto
the current device) and leaves only through :func:`asnumpy` or ``ndarray.get()``. Every
other function is NumPy's, called on the unwrapped arrays by :func:`numpy_fallback`
with the fake array rules (a NumPy array argument is a ``TypeError``, results are device
arrays, 0-d where NumPy gives a scalar, ``out=`` returns the given array).
"""
from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import numpy as np

from cupy._array import call, from_host, ndarray


def asarray(a: Any, dtype: Any = None, order: str | None = None, *, blocking: bool = False) -> ndarray:
    """``a`` itself if it is a device array of that dtype (and order), else a copy on the current device."""
    return array(a, dtype, copy=False, order=order or "K")


def array(obj: Any, dtype: Any = None, copy: bool = True, order: str = "K", subok: bool = False, ndmin: int = 0,
          *, blocking: bool = False) -> ndarray:
    """A device array of ``obj``: host data is copied to the current device; a device array
    is copied unless ``copy=False`` and it already has the dtype, order and ``ndmin``."""
    if isinstance(obj, ndarray):
        return call(np.array, (obj,), {"dtype": dtype, "copy": True if copy else None, "order": order,
                                       "ndmin": ndmin}, [])
    return from_host(obj, dtype, order, ndmin)


def asnumpy(a: Any, stream: Any = None, order: str = "C", out: np.ndarray | None = None, *,
            blocking: bool = True) -> np.ndarray:
    """A host copy of a device array; host data is returned as ``numpy.asarray`` gives it."""
    if isinstance(a, ndarray):
        return a.get(order=order, out=out)
    host = np.asarray(a, order=order)
    if out is None:
        return host
    out[...] = host
    return out


def get_array_module(*args: Any) -> ModuleType:
    """The fake ``cupy`` if any argument is a device array, else ``numpy``."""
    import cupy

    return cupy if any(isinstance(a, ndarray) for a in args) else np


def count_nonzero(a: ndarray, axis: Any = None) -> ndarray:
    """Counts as a device array (NumPy returns a Python int for ``axis=None``, CuPy a 0-d array)."""
    return call(lambda x: np.asarray(np.count_nonzero(x, axis=axis), dtype=np.intp), (a,), {}, [])


def numpy_fallback(name: str) -> Any:
    """``cupy.<name>`` for a name the fake does not define: NumPy's dtypes, classes and
    constants as they are, NumPy's functions wrapped by the fake array rules."""
    value = getattr(np, name, None) if not name.startswith("_") else None
    if value is None or isinstance(value, ModuleType):
        raise AttributeError(f"module 'cupy' has no attribute {name!r} (the fake cupy provides NumPy's "
                             f"functions, dtypes and constants, not its submodules)")
    if isinstance(value, type) or not callable(value):
        return value

    @functools.wraps(value)
    def function(*args: Any, **kwargs: Any) -> Any:
        return call(value, args, kwargs, [])

    return function
