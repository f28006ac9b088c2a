"""Fake ``cupy.ElementwiseKernel``: the kernel is compiled as C++ by g++ and run on the host.

What follows CuPy 14 (``cupy/_core/_kernel.pyx``):

* parameters are ``[raw] TYPE name`` with TYPE a NumPy dtype name or a one-letter type
  placeholder; bad declarations, kernel names and the parameter name ``i`` are rejected
  at construction with CuPy's errors;
* type resolution (``_decide_params_type``): a placeholder takes the dtype of the *arrays*
  declared with it (inputs and outputs, raw or not); Python and NumPy scalars never decide
  one, so a placeholder found only on scalars raises ``KeyError(placeholder)``; arrays that
  disagree raise ``TypeError``. Scalars are then cast to their parameter's type;
* the generated code: ``typedef <C type> <placeholder>;`` per resolved placeholder, the
  preamble, then a loop over ``i`` that binds each non-raw input as ``const T &x =
  _raw_x[i]`` and each non-raw output as ``T &y = _raw_y[i]`` before the operation; raw
  arrays are pointers to their first element (index them ``x[flat index]``), scalars are
  values. The loop runs over the broadcast shape of the non-raw arrays (or ``size=``);
* arrays on another device than the current one follow the fake array rule (implicit
  peer access with a ``PerformanceWarning``, or ``ValueError`` without peer access);
* outputs may be passed (their shapes must match) or left out (then allocated).

Differences: ``reduce_dims``, ``options`` (NVRTC flags), ``stream`` and ``block_size`` are
accepted and ignored; raw arrays must be C-contiguous (``NotImplementedError``), since kernel code
gets a plain pointer where CuPy passes a ``CArray`` (so ``x.size()``, ``x[index array]``,
``_ind`` and CUDA intrinsics do not compile); non-raw arrays of any layout are handled
through contiguous copies. C types: float16 is GCC's ``_Float16`` (x86-64; its arithmetic
may keep float precision between operations, CUDA's ``half`` rounds each one); complex
dtypes are unsupported. Compilation uses ``g++ -O1 -shared -fPIC -std=c++17``, cached per
process, or across processes in ``FAKE_CUPY_KERNEL_CACHE``.

When ``FAKE_CUPY_KERNEL_LOG`` names a file, every call appends one JSON line before
anything is checked: the kernel's name, parameter strings, operation and preamble, and
for each argument in call order ``{"kind": "ndarray", "dtype", "ndim", "c_contiguous"}``,
``{"kind": "scalar", "python_type": "int"|"float"|"bool"|"complex"|"numpy", "dtype": <name
for NumPy scalars, else null>}`` or ``{"kind": "other", "type": <qualified name>}``.
"""
from __future__ import annotations

import atexit
import ctypes
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from typing import Any

import numpy as np

from cupy._array import check_devices, is_scalar, ndarray
from cupy.cuda.compiler import CompileException

_C_TYPES = {
    np.dtype(np.float16): "float16", np.dtype(np.float32): "float", np.dtype(np.float64): "double",
    np.dtype(np.int8): "signed char", np.dtype(np.int16): "short", np.dtype(np.int32): "int",
    np.dtype(np.int64): "long long", np.dtype(np.uint8): "unsigned char", np.dtype(np.uint16): "unsigned short",
    np.dtype(np.uint32): "unsigned int", np.dtype(np.uint64): "unsigned long long", np.dtype(np.bool_): "bool",
}
_HEADER = """#include <algorithm>
#include <cmath>
#include <cstdint>
using std::max;
using std::min;
typedef _Float16 float16;
"""
_COMPILER = ("g++", "-O1", "-shared", "-fPIC", "-std=c++17")
_compile_lock = threading.Lock()
_libraries: dict[str, ctypes.CDLL] = {}
_cache_dir: list[str] = []  # the directory, once chosen


class _Param:
    """One parameter declaration, parsed as CuPy's ``ParameterInfo``."""

    def __init__(self, text: str, is_const: bool) -> None:
        words = text.split()
        if len(words) < 2:
            raise Exception(f"Syntax error: {text}")  # noqa: TRY002 (CuPy's own)
        type_name, self.name = words[-2:]
        self.is_const = is_const
        self.raw = False
        for word in words[:-2]:
            if word != "raw":
                raise Exception(f'Unknown keyword "{word}"')  # noqa: TRY002 (CuPy's own)
            self.raw = True
        self.placeholder: str | None = None
        self.dtype: np.dtype | None = None
        if len(type_name) == 1:
            self.placeholder = type_name
        else:
            self.dtype = np.dtype(type_name)
            if self.dtype.name != type_name:
                raise ValueError(f"Wrong type {type_name}")


def _parse(params: str, is_const: bool) -> tuple[_Param, ...]:
    return tuple(_Param(p.strip(), is_const) for p in params.split(",") if p)


def _describe(arg: Any) -> dict[str, Any]:
    """An argument's kind for the call log."""
    if isinstance(arg, ndarray):
        return {"kind": "ndarray", "dtype": arg.dtype.name, "ndim": arg.ndim, "c_contiguous": arg.flags.c_contiguous}
    if isinstance(arg, np.generic):
        return {"kind": "scalar", "python_type": "numpy", "dtype": arg.dtype.name}
    if is_scalar(arg):
        return {"kind": "scalar", "python_type": type(arg).__name__, "dtype": None}
    return {"kind": "other", "type": f"{type(arg).__module__}.{type(arg).__qualname__}"}


def _library(source: str) -> ctypes.CDLL:
    """The compiled ``source``, built once per process (or once in ``FAKE_CUPY_KERNEL_CACHE``)."""
    key = hashlib.sha256(" ".join(_COMPILER).encode() + b"\n" + source.encode()).hexdigest()[:32]
    with _compile_lock:
        if key in _libraries:
            return _libraries[key]
        if not _cache_dir:
            chosen = os.environ.get("FAKE_CUPY_KERNEL_CACHE")
            if not chosen:
                chosen = tempfile.mkdtemp(prefix="fake_cupy_kernels_")
                atexit.register(shutil.rmtree, chosen, True)
            os.makedirs(chosen, exist_ok=True)
            _cache_dir.append(chosen)
        path = os.path.join(_cache_dir[0], f"{key}.so")
        if not os.path.exists(path):
            stem = os.path.join(_cache_dir[0], f"{key}.{os.getpid()}")
            with open(f"{stem}.cpp", "w") as f:
                f.write(source)
            build = subprocess.run([*_COMPILER, f"{stem}.cpp", "-o", f"{stem}.so"], capture_output=True, text=True,
                                   check=False)
            os.remove(f"{stem}.cpp")
            if build.returncode:
                raise CompileException(f"g++ could not compile the kernel:\n{build.stderr}\n{source}")
            os.replace(f"{stem}.so", path)  # atomic: concurrent processes see a whole library or none
        library = _libraries[key] = ctypes.CDLL(path)
        library._fake_cupy_launch.argtypes = (ctypes.c_longlong, ctypes.POINTER(ctypes.c_void_p))
        library._fake_cupy_launch.restype = None
    return library


class ElementwiseKernel:
    """An elementwise kernel (see the module docstring)."""

    def __init__(self, in_params: str, out_params: str, operation: str, name: str = "kernel",
                 reduce_dims: bool = True, preamble: str = "", no_return: bool = False, return_tuple: bool = False,
                 *, loop_prep: str = "", after_loop: str = "", options: tuple = ()) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f'Invalid kernel name: "{name}"')
        self.in_params, self.out_params = _parse(in_params, True), _parse(out_params, False)
        if "i" in [p.name for p in self.in_params + self.out_params]:
            raise ValueError("Can not use 'i' as a parameter name")
        self.name, self.operation, self.preamble = name, operation, preamble
        self.no_return, self.return_tuple = no_return, return_tuple
        self.nin, self.nout = len(self.in_params), len(self.out_params)
        self.nargs = self.nin + self.nout
        self._texts = (in_params, out_params)
        self._loop_prep, self._after_loop = loop_prep, after_loop

    def __call__(self, *args: Any, size: int | None = None, stream: Any = None, block_size: int | None = None) -> Any:
        """Run the kernel on ``args`` (inputs, then optionally outputs); returns the outputs."""
        self._log(args)
        if len(args) not in (self.nin, self.nargs):
            raise TypeError(f"Wrong number of arguments for {self.name}")
        if block_size is not None and block_size <= 0:
            raise ValueError("block_size must be greater than zero")
        for arg in args:
            if not isinstance(arg, ndarray) and not is_scalar(arg):
                raise TypeError(f"Unsupported type {type(arg)}")
        in_args, out_args = args[:self.nin], args[self.nin:]
        check_devices([a for a in args if isinstance(a, ndarray)])
        nonraw = any(not p.raw and (k >= self.nin or isinstance(a, ndarray))
                     for k, (p, a) in enumerate(zip(self.in_params + self.out_params, args + (None,) * self.nout)))
        if size is not None and nonraw:
            raise ValueError("Specified 'size' can be used only if all of the ndarray are 'raw'.")
        if size is None and not nonraw:
            raise ValueError("Loop size is undecided.")
        in_types, out_types, placeholders = self._decide_types(in_args, out_args)
        params = self.in_params + self.out_params
        shapes = [a.shape for p, a in zip(params, args) if not p.raw and isinstance(a, ndarray)]
        shape = (size,) if size is not None else np.broadcast_shapes(*shapes)
        outputs = self._outputs(out_args, out_types, shape, size is not None)
        if 0 in shape:
            return self._returned(outputs)
        self._launch(in_args + tuple(outputs), in_types + out_types, placeholders, shape)
        return self._returned(outputs)

    def _log(self, args: tuple) -> None:
        path = os.environ.get("FAKE_CUPY_KERNEL_LOG")
        if path:
            record = {"name": self.name, "in_params": self._texts[0], "out_params": self._texts[1],
                      "operation": self.operation, "preamble": self.preamble, "args": [_describe(a) for a in args]}
            with open(path, "a") as log:
                log.write(json.dumps(record) + "\n")

    def _decide_types(self, in_args: tuple, out_args: tuple) -> tuple[tuple, tuple, dict[str, np.dtype]]:
        """CuPy's ``_decide_params_type_core``: the parameter types and the placeholders' dtypes."""
        resolved: dict[str, np.dtype] = {}

        def unify(p: _Param, dtype: np.dtype) -> None:
            if p.dtype is not None:
                if dtype != p.dtype:
                    raise TypeError(f"Type is mismatched. {p.name} {dtype.type} {p.dtype.type}")
            elif p.placeholder in resolved:
                if dtype != resolved[p.placeholder]:
                    raise TypeError(f"Type is mismatched. {p.name} {dtype.type} {resolved[p.placeholder].type} "
                                    f"{p.placeholder}")
            else:
                resolved[p.placeholder] = dtype

        for p, a in zip(self.out_params, out_args):
            if not isinstance(a, ndarray):
                raise TypeError(f"Output arguments type must be cupy.ndarray, not {type(a)}")
            unify(p, a.dtype)
        for p, a in zip(self.in_params, in_args):
            if isinstance(a, ndarray):
                unify(p, a.dtype)
        in_types = tuple(resolved[p.placeholder] if p.dtype is None else p.dtype for p in self.in_params)
        out_types = tuple(resolved[p.placeholder] if p.dtype is None else p.dtype for p in self.out_params)
        return in_types, out_types, resolved

    def _outputs(self, out_args: tuple, out_types: tuple, shape: tuple, sized: bool) -> list[ndarray]:
        if not out_args:
            if any(p.raw for p in self.out_params) and not sized:
                raise ValueError("Output array size is Undecided")
            return [ndarray(shape, t) for t in out_types]
        for p, a in zip(self.out_params, out_args):
            if not p.raw and a.shape != tuple(shape):
                raise ValueError(f"Out shape is mismatched: {a.shape} while {tuple(shape)} is expected.")
        return list(out_args)

    def _returned(self, outputs: list[ndarray]) -> Any:
        if self.no_return:
            return None
        if not self.return_tuple and self.nout == 1:
            return outputs[0]
        return tuple(outputs)

    def _launch(self, args: tuple, types: tuple, placeholders: dict[str, np.dtype], shape: tuple) -> None:
        """Compile (once) and run the loop over ``prod(shape)`` elements."""
        for dtype in types:
            if np.dtype(dtype) not in _C_TYPES:
                raise NotImplementedError(f"the fake ElementwiseKernel does not support {np.dtype(dtype)}")
        params = self.in_params + self.out_params
        buffers: list[np.ndarray] = []  # what each pointer points into, kept alive for the call
        copy_back: list[tuple[np.ndarray, np.ndarray]] = []  # (contiguous copy, output it stands for)
        for p, a, dtype in zip(params, args, types):
            if not isinstance(a, ndarray):
                buffers.append(np.asarray(a, dtype=dtype))  # a scalar, cast to its parameter's type
            elif p.raw:
                if not a._a.flags.c_contiguous:
                    raise NotImplementedError(f"the fake ElementwiseKernel needs C-contiguous raw arrays; "
                                              f"{p.name} has strides {a.strides} for shape {a.shape}")
                buffers.append(a._a)
            elif p.is_const:
                buffers.append(np.ascontiguousarray(np.broadcast_to(a._a, shape)))
            elif a._a.flags.c_contiguous:
                buffers.append(a._a)
            else:
                buffers.append(np.ascontiguousarray(a._a))
                copy_back.append((buffers[-1], a._a))
        kinds = tuple("scalar" if not isinstance(a, ndarray) else "raw" if p.raw else "array"
                      for p, a in zip(params, args))
        library = _library(self._source(kinds, types, placeholders))
        pointers = (ctypes.c_void_p * len(buffers))(*[b.__array_interface__["data"][0] for b in buffers])
        library._fake_cupy_launch(int(np.prod(shape)), pointers)
        for contiguous, output in copy_back:
            output[...] = contiguous

    def _source(self, kinds: tuple[str, ...], types: tuple, placeholders: dict[str, np.dtype]) -> str:
        """The C++ translation unit of one specialization (see the module docstring)."""
        signature, binds, launch = ["long long _n"], [], ["_n"]
        for k, (p, kind, dtype) in enumerate(zip(self.in_params + self.out_params, kinds, types)):
            ctype = p.placeholder or _C_TYPES[np.dtype(dtype)]
            if kind == "scalar":
                signature.append(f"{ctype} {p.name}")
                launch.append(f"*static_cast<{ctype}*>(_args[{k}])")
            elif kind == "raw":
                signature.append(f"{ctype}* {p.name}")
                launch.append(f"static_cast<{ctype}*>(_args[{k}])")
            else:
                signature.append(f"{ctype}* _raw_{p.name}")
                binds.append(f"{'const ' if p.is_const else ''}{ctype} &{p.name} = _raw_{p.name}[i];")
                launch.append(f"static_cast<{ctype}*>(_args[{k}])")
        typedefs = "".join(f"typedef {_C_TYPES[np.dtype(t)]} {name};\n" for name, t in sorted(placeholders.items()))
        body = "\n".join(binds)
        return (f"{_HEADER}{typedefs}{self.preamble}\n"
                f'extern "C" void {self.name}({", ".join(signature)}) {{\n{self._loop_prep}\n'
                f"for (long long i = 0; i < _n; ++i) {{\n{body}\n{self.operation};\n}}\n{self._after_loop}\n}}\n"
                f'extern "C" void _fake_cupy_launch(long long _n, void** _args) {{ {self.name}({", ".join(launch)}); }}\n')
