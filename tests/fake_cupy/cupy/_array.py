"""Fake ``cupy.ndarray``: a NumPy array that lives on a fake device.

An array wraps a NumPy array (``_a``) and knows its device: the device of the memory
under it (:mod:`cupy.cuda.memory`), so a view is on its base's device and anything newly
allocated is on the calling thread's current device. It is *not* a ``numpy.ndarray``,
and it enforces CuPy's boundary between host and device:

* ``numpy.asarray(a)`` and every other implicit conversion raise ``TypeError`` (CuPy's
  message): copies to the host are explicit, ``a.get()`` or ``cupy.asnumpy(a)``;
* an operation mixing it with a ``numpy.ndarray`` (0-d ones included) raises
  ``TypeError('Unsupported type <class 'numpy.ndarray'>')``; Python and NumPy scalars are
  fine; copies to the device are explicit, ``cupy.asarray(host)``;
* an operation that computes with an array of another device than the current one
  follows CuPy: it enables peer access implicitly and warns (``PerformanceWarning``),
  or raises ``ValueError`` when peer access is impossible; results go to the current device.

Operators go through ``__array_ufunc__`` (NumPy's ufunc on the unwrapped arrays, ``out=``
written in place); NumPy functions called on fake arrays dispatch through
``__array_function__`` to the fake ``cupy`` functions. Results keep CuPy's types: an
operation returns an array even where NumPy returns a scalar (``a.sum()``, ``a[0, 0]``
are 0-d arrays, the latter a view as in CuPy), and ``out=`` returns the given array.
Methods are CuPy 14's public ones, computed by NumPy.

Everything runs synchronously, and the fake uses NumPy's type promotion and arithmetic,
which for elementwise operations and reductions may round differently from CUDA's.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

from cupy._util import PerformanceWarning
from cupy.cuda import memory, runtime
from cupy.cuda.device import Device

_IMPLICIT_CONVERSION = ("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")
_PYTHON_SCALARS = (bool, int, float, complex)

# CuPy 14's public ndarray methods and attributes that NumPy computes the same way; the
# others are defined on the class. Anything else (``ctypes``, ``setflags``, ...) is an
# AttributeError, as in CuPy.
_NUMPY_METHODS = frozenset({
    "all", "any", "argmax", "argmin", "argpartition", "argsort", "choose", "clip", "compress", "conj",
    "conjugate", "cumprod", "cumsum", "diagonal", "dot", "flatten", "imag", "mT", "max", "mean", "min",
    "nonzero", "partition", "prod", "put", "ravel", "real", "repeat", "reshape", "round", "searchsorted",
    "sort", "squeeze", "std", "sum", "swapaxes", "take", "tobytes", "trace", "transpose", "var", "view",
})


def is_scalar(x: Any) -> bool:
    """A Python or NumPy scalar: what CuPy accepts next to arrays (exact Python types, as CuPy)."""
    return type(x) in _PYTHON_SCALARS or isinstance(x, np.generic)


def _unwrap(x: Any, operands: list[ndarray]) -> Any:
    """``x`` with fake arrays replaced by their NumPy arrays (collected in ``operands``),
    looking into lists and tuples; a NumPy array is host memory: ``TypeError``."""
    if isinstance(x, ndarray):
        operands.append(x)
        return x._a
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type {type(x)}")
    if type(x) in (list, tuple):
        return type(x)(_unwrap(v, operands) for v in x)
    return x


def _allocates(result: Any, operands: list[ndarray]) -> bool:
    """Whether ``result`` holds new memory (a computed array), not only views of ``operands``."""
    if isinstance(result, np.generic):
        return True
    if isinstance(result, np.ndarray):
        return all(memory.owner_of(result) is not memory.owner_of(x._a) for x in operands)
    if isinstance(result, (list, tuple)):
        return any(_allocates(r, operands) for r in result)
    return False


def check_devices(operands: list[ndarray]) -> None:
    """CuPy's rule for computing with arrays of other devices than the current one."""
    current = runtime.getDevice()
    for device in sorted({x._device for x in operands} - {current}):
        message = f"The device where the array resides ({device}) is different from the current device ({current})."
        if not runtime._enable_peer_access(current, device):
            raise ValueError(f"{message} Peer access is unavailable between these devices.")
        warnings.warn(f"{message} Peer access has been activated automatically.", PerformanceWarning, stacklevel=3)


def wrap_result(result: Any, operands: list[ndarray]) -> Any:
    """NumPy results as fake arrays: an operand's own array maps back to that operand (so
    ``out=`` returns the given array), new arrays and NumPy scalars become arrays."""
    if isinstance(result, np.ndarray):
        for x in operands:
            if x._a is result:
                return x
        return ndarray._wrap(result)
    if isinstance(result, np.generic):
        return ndarray._wrap(np.asarray(result))
    if isinstance(result, tuple):
        items = [wrap_result(r, operands) for r in result]
        return type(result)(*items) if hasattr(result, "_fields") else tuple(items)
    if isinstance(result, list):
        return [wrap_result(r, operands) for r in result]
    return result


def call(fn: Any, args: tuple, kwargs: dict[str, Any], operands: list[ndarray]) -> Any:
    """``fn`` (a NumPy function or bound method) on fake arguments, with CuPy's checks.

    ``operands`` may hold arrays already involved (a method's own array). The device rule
    applies when the call computes: it writes ``out``, works in place (returns None) or
    returns new memory; views of an array on another device are free, as in CuPy.
    """
    operands = list(operands)
    result = fn(*_unwrap(args, operands), **{k: _unwrap(v, operands) for k, v in kwargs.items()})
    if result is None or kwargs.get("out") is not None or _allocates(result, operands):
        check_devices(operands)
    return wrap_result(result, operands)


def from_host(obj: Any, dtype: Any = None, order: str = "K", ndmin: int = 0) -> ndarray:
    """A host-to-device copy of host data (NumPy array, list, scalar) onto the current device."""
    host = np.array(obj, dtype=dtype, copy=True, order=order, ndmin=ndmin)
    if host.dtype == object:
        raise ValueError(f"Unsupported dtype {host.dtype}")
    return ndarray._wrap(host)


class _Flags:
    """``ndarray.flags``: CuPy's flags have no ``writeable`` (device arrays are always writable)."""

    def __init__(self, a: np.ndarray) -> None:
        self.c_contiguous = bool(a.flags.c_contiguous)
        self.f_contiguous = bool(a.flags.f_contiguous)
        self.owndata = a.base is None

    def __getitem__(self, name: str) -> bool:
        return {"C_CONTIGUOUS": self.c_contiguous, "F_CONTIGUOUS": self.f_contiguous, "OWNDATA": self.owndata}[name]

    def __repr__(self) -> str:
        return f"  C_CONTIGUOUS : {self.c_contiguous}\n  F_CONTIGUOUS : {self.f_contiguous}\n  OWNDATA : {self.owndata}"


class ndarray(NDArrayOperatorsMixin):
    """A device array (see the module docstring). ``ndarray(shape, dtype)`` allocates an
    uninitialized array on the current device, like CuPy's constructor."""

    __slots__ = ("__weakref__", "_a", "_device")

    def __init__(self, shape: Any, dtype: Any = float, memptr: Any = None, strides: Any = None,
                 order: str = "C") -> None:
        if memptr is not None or strides is not None:
            raise NotImplementedError("the fake cupy.ndarray() takes no memptr or strides")
        self._a = np.empty(shape, dtype=dtype, order=order)
        self._device = memory.device_of(self._a)

    @classmethod
    def _wrap(cls, a: np.ndarray) -> ndarray:
        array = cls.__new__(cls)
        array._a = a
        array._device = memory.device_of(a)
        return array

    # -- attributes ------------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    size = property(lambda self: self._a.size)
    ndim = property(lambda self: self._a.ndim)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)

    @property
    def flags(self) -> _Flags:
        return _Flags(self._a)

    @property
    def T(self) -> ndarray:
        return ndarray._wrap(self._a.T)

    @property
    def data(self) -> memory.MemoryPointer:
        """The device pointer of the first element (``.ptr``) and its device (``.device_id``)."""
        return memory.MemoryPointer(memory._address(self._a), self._device)

    @property
    def device(self) -> Device:
        return Device(self._device)

    def __getattr__(self, name: str) -> Any:
        if name not in _NUMPY_METHODS:
            raise AttributeError(f"'cupy.ndarray' object has no attribute {name!r} (fake cupy)")
        value = getattr(self._a, name)
        if callable(value):
            return lambda *args, **kwargs: call(value, args, kwargs, [self])
        return wrap_result(value, [self])

    # -- host transfers ----------------------------------------------------------------
    def get(self, stream: Any = None, order: str = "C", out: np.ndarray | None = None,
            blocking: bool = True) -> np.ndarray:
        """A NumPy copy (the device-to-host copy), or the contents copied into ``out``."""
        if out is None:
            return np.array(self._a, order=order, copy=True)
        if not isinstance(out, np.ndarray):
            raise TypeError("Only numpy.ndarray can be obtained from cupy.ndarray")
        if out.dtype != self.dtype:
            raise TypeError(f"{out.dtype} array cannot be obtained from {self.dtype} array")
        if out.shape != self.shape:
            raise ValueError(f"Shape mismatch. Expected shape: {self.shape}, actual shape: {out.shape}")
        out[...] = self._a
        return out

    def set(self, arr: np.ndarray, stream: Any = None) -> None:
        """Copy the host array ``arr`` (same dtype and shape) into this C-contiguous array."""
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray, got {type(arr)}")
        if arr.dtype != self.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        if arr.shape != self.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        if not self._a.flags.c_contiguous:
            raise RuntimeError("Cannot set to non-contiguous array")
        self._a[...] = arr

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise TypeError(_IMPLICIT_CONVERSION)

    def item(self, *args: Any) -> Any:
        return self._a.item(*args)

    def tolist(self) -> Any:
        return self._a.tolist()

    def __float__(self) -> float:
        return float(self._a)

    def __int__(self) -> int:
        return int(self._a)

    def __complex__(self) -> complex:
        return complex(self._a)

    def __bool__(self) -> bool:
        return bool(self._a)

    def __format__(self, spec: str) -> str:
        return format(self._a, spec)

    def __repr__(self) -> str:
        return repr(self._a)

    def __str__(self) -> str:
        return str(self._a)

    def __reduce__(self) -> tuple:
        """Pickles as its host copy; unpickling copies it to the current device (as CuPy)."""
        return (from_host, (self.get(),))

    # -- copies ------------------------------------------------------------------------
    def copy(self, order: str = "C") -> ndarray:
        """A copy on the current device (also from another device: an explicit copy needs no peer access)."""
        return ndarray._wrap(self._a.copy(order=order))

    def __copy__(self) -> ndarray:
        return self.copy()

    def __deepcopy__(self, memo: dict) -> ndarray:
        with self.device:
            return self.copy()

    def astype(self, dtype: Any, order: str = "K", casting: str | None = None, subok: Any = None,
               copy: bool = True) -> ndarray:
        if not copy and np.dtype(dtype) == self.dtype and (order in "KA" or self._a.flags[f"{order}_CONTIGUOUS"]):
            return self
        check_devices([self])
        return ndarray._wrap(self._a.astype(dtype, order=order, casting=casting or "unsafe"))

    def fill(self, value: Any) -> None:
        operands = [self]
        if isinstance(value, (ndarray, np.ndarray)):
            if value.shape != ():
                raise ValueError(f"non-scalar {type(value).__module__.split('.')[0]}.ndarray cannot be used for fill")
            value = value._a if isinstance(value, ndarray) else value.item()
        elif not is_scalar(value):
            raise TypeError(f"Unsupported type {type(value)}")
        check_devices(operands)
        self._a.fill(value)

    # -- indexing ----------------------------------------------------------------------
    @staticmethod
    def _index(key: Any, operands: list[ndarray]) -> tuple:
        """``key`` as a NumPy index tuple ending in ``...`` (so that NumPy returns a 0-d view,
        never a scalar, as CuPy does). Index arrays may be fake, NumPy (copied to the device
        by CuPy) or lists."""
        items = key if type(key) is tuple else (key,)
        items = tuple(_unwrap(k, operands) if isinstance(k, ndarray) else k for k in items)
        if not any(k is Ellipsis for k in items):
            items += (Ellipsis,)
        return items

    def __getitem__(self, key: Any) -> ndarray:
        operands = [self]
        result = self._a[self._index(key, operands)]
        if _allocates(result, operands):
            check_devices(operands)
        return wrap_result(result, operands)

    def __setitem__(self, key: Any, value: Any) -> None:
        operands = [self]
        index = self._index(key, operands)
        if isinstance(value, ndarray):
            operands.append(value)
            value = value._a
        elif isinstance(value, np.ndarray):
            advanced = any(isinstance(k, (np.ndarray, list)) for k in index)
            if value.ndim and not advanced:
                raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
        elif not is_scalar(value):
            raise TypeError(f"Unsupported type {type(value)}")
        check_devices(operands)
        self._a[index] = value

    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self) -> Iterator[ndarray]:
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self)))

    # -- NumPy protocols ---------------------------------------------------------------
    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        operands: list[ndarray] = []
        inputs = _unwrap(inputs, operands)
        kwargs = {k: _unwrap(v, operands) for k, v in kwargs.items()}
        check_devices(operands)
        return wrap_result(getattr(ufunc, method)(*inputs, **kwargs), operands)

    def __array_function__(self, func: Any, types: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        import cupy

        if func.__module__ == "numpy":
            return getattr(cupy, func.__name__)(*args, **kwargs)
        return call(func, args, kwargs, [])
