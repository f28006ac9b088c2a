"""A fake CuPy for tests: dtrain's GPU code paths run unchanged, on the CPU.

This package is NOT CuPy. It is a stand-in used only by dtrain's tests, in subprocesses
started with ``tests/fake_cupy`` first on ``PYTHONPATH`` (``tests/fake_cupy/run.py`` has the
helpers), so that ``import cupy`` finds it there. The pytest process itself never imports
it. It provides the part of CuPy 14's API that dtrain uses:

* :class:`ndarray` (:mod:`cupy._array`): a NumPy array tagged with its fake device, which
  refuses silent host/device mixing like CuPy (``TypeError`` for NumPy array operands and
  for ``numpy.asarray(device_array)``);
* module functions (:mod:`cupy._routines`): ``asarray``/``array``/``asnumpy``/
  ``get_array_module`` and NumPy's functions, dtypes and constants under the array rules;
* :class:`ElementwiseKernel` (:mod:`cupy._kernel`): kernels compiled as C++ by g++ and run
  on the host, with CuPy's parameter parsing and type resolution;
* :mod:`cupy.cuda`: devices (``FAKE_CUPY_GPUS``, ``CUDA_VISIBLE_DEVICES``), streams, events,
  peer access and copies, the memory pool's figures, and ``cupy.cuda.nccl`` over MPI;
* :mod:`cupy._core._routines_linalg`: the TF32 compute-type switch, recorded.

Environment variables read by the fake:

* ``FAKE_CUPY_GPUS``: physical GPUs (default 2), before ``CUDA_VISIBLE_DEVICES`` filtering;
* ``FAKE_CUPY_PEER_ACCESS=0``: GPUs without peer access (default: any two can);
* ``FAKE_CUPY_KERNEL_LOG``: a file that gets one JSON line per kernel call;
* ``FAKE_CUPY_KERNEL_CACHE``: a directory keeping compiled kernels across processes
  (default: a temporary directory per process).

Deliberate differences from CuPy, besides the missing API: everything runs synchronously
on the calling thread (streams and events keep only CuPy's bookkeeping and checks, which
is one valid schedule of the real semantics); arithmetic is NumPy's (and g++'s in
kernels), so results may round differently from a GPU's; each module's docstring lists
its own differences.
"""
from __future__ import annotations

from typing import Any

from numpy import (
    bool_,
    complex64,
    complex128,
    float16,
    float32,
    float64,
    int8,
    int16,
    int32,
    int64,
    uint8,
    uint16,
    uint32,
    uint64,
)

from cupy import _core as _core
from cupy import _util as _util
from cupy import cuda
from cupy._array import ndarray
from cupy._kernel import ElementwiseKernel
from cupy._routines import (
    array,
    asarray,
    asnumpy,
    count_nonzero,
    get_array_module,
    numpy_fallback,
)
from cupy.cuda.memory import get_default_memory_pool

__version__ = "0.0.0+fake"

__all__ = ["ElementwiseKernel", "array", "asarray", "asnumpy", "bool_", "complex64", "complex128",
           "count_nonzero", "cuda", "float16", "float32", "float64", "get_array_module", "get_default_memory_pool",
           "int8", "int16", "int32", "int64", "ndarray", "uint8", "uint16", "uint32", "uint64"]


def __getattr__(name: str) -> Any:
    """NumPy's functions, dtypes and constants for the names defined nowhere above."""
    value = numpy_fallback(name)
    globals()[name] = value  # found once
    return value
