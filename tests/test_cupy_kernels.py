"""Every CUDA kernel dtrain builds, checked with the real CuPy on a machine without a GPU.

For each kernel call that dtrain's wrappers make (recorded by running every layer with a
CUDA kernel, forward and backward, in float16, float32 and float64 on the CPU stand-in
for CuPy, tests/fake_cupy, which logs the argument kinds of each call):

(i) CuPy's own argument-type resolution (``ElementwiseKernel._decide_params_type``)
    accepts those arguments: every type placeholder is fixed by an array argument;
(ii) the source CuPy would generate for the call (its kernel code, its headers and its
    compiler options) compiles with NVRTC for sm_80 and sm_90, with 32- and 64-bit
    indexing.

CuPy internals used, which is why the test extra pins the CuPy version:
``ElementwiseKernel._decide_params_type`` and ``.params``,
``cupy._core._kernel._ArgInfo`` and ``_get_elementwise_kernel_code``,
``cupy._core._scalar.CScalar``, ``cupy._core._carray.Indexer``,
``cupy._core.core._cupy_header_list`` and ``assemble_cupy_compiler_options``, and
``cupy_backends.cuda.libs.nvrtc``. CuPy's own compile functions ask the driver for the
current device's architecture, so NVRTC is called directly with the architecture given;
NVRTC itself needs no driver.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
FAKE = REPO / "tests" / "fake_cupy"
ARCHS = ("80", "90")
# _ArgInfo kinds (cupy/_core/_kernel.pxd: enum _ArgKind)
NDARRAY, INDEXER, SCALAR = 1, 2, 3


def real_cupy():
    """The installed CuPy (not the stand-in), or a skip when it or NVRTC is missing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cupy = pytest.importorskip("cupy", reason="install the test extra: pip install '.[test]'")
    if Path(cupy.__file__).is_relative_to(FAKE):
        pytest.fail("the CPU stand-in shadows the real CuPy in the test process")
    if cupy.__version__ != "14.2.0":
        pytest.skip(f"these checks use CuPy 14.2.0's internals; CuPy {cupy.__version__} is installed")
    from cupy_backends.cuda.libs import nvrtc

    try:
        nvrtc.getVersion()
    except Exception as err:  # the NVRTC wheel is missing
        pytest.skip(f"NVRTC is not available ({err}); pip install nvidia-cuda-nvrtc-cu12")
    return cupy


@pytest.fixture(scope="module")
def kernel_calls(tmp_path_factory) -> list[dict]:
    """The distinct kernel calls dtrain's wrappers make (argument kinds and dtypes)."""
    log = tmp_path_factory.mktemp("kernel_log") / "calls.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FAKE), str(REPO)]), "FAKE_CUPY_KERNEL_LOG": str(log)}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "gpu_scripts" / "exercise_kernels.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
    distinct = {line: json.loads(line) for line in log.read_text().splitlines()}
    return list(distinct.values())


def test_every_kernel_dtrain_builds_is_called_in_every_dtype(kernel_calls):
    cupy = real_cupy()
    from dtrain.nn import cuda_kernels

    built = {k.name for k in cuda_kernels.build_kernels(cupy).values()}
    called = {(c["name"], _array_dtype(c)) for c in kernel_calls}
    assert {name for name, _ in called} == built
    for name in built:
        assert {d for n, d in called if n == name} == {"float16", "float32", "float64"}, name


def test_cupy_resolves_the_argument_types(kernel_calls):
    cupy = real_cupy()
    for call in kernel_calls:
        kernel = _kernel(cupy, call)
        in_types, out_types, _ = _resolve(kernel, call)  # raises KeyError('A') for an untyped placeholder
        assert [np.dtype(t).name for t in out_types] == [a["dtype"] for a in call["args"][kernel.nin:]]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("index_32_bits", [True, False], ids=["32-bit index", "64-bit index"])
def test_the_generated_source_compiles_with_nvrtc(kernel_calls, arch, index_32_bits):
    cupy = real_cupy()
    import cupy._core._kernel as internals
    from cupy._core import _carray, _scalar, core
    from cupy_backends.cuda.libs import nvrtc

    options = [*core.assemble_cupy_compiler_options(()), "-ftz=true", f"-arch=sm_{arch}"]
    for call in kernel_calls:
        kernel = _kernel(cupy, call)
        in_types, out_types, type_map = _resolve(kernel, call)
        infos = []
        for arg, dtype in zip(call["args"], (*in_types, *out_types)):
            if arg["kind"] == "ndarray":
                # After CuPy's dimension reduction a C-contiguous array is 1-D.
                infos.append(internals._ArgInfo(NDARRAY, cupy.ndarray, np.dtype(dtype), 1, True, index_32_bits))
            else:
                infos.append(internals._ArgInfo(SCALAR, _scalar.CScalar, np.dtype(dtype), 0, True, True))
        infos.append(internals._ArgInfo(INDEXER, _carray.Indexer, None, 1, True, index_32_bits))
        code = internals._get_elementwise_kernel_code(tuple(infos), type_map, kernel.params, kernel.operation,
                                                      kernel.name, kernel.preamble)
        source = "".join(f"#include <{header}>\n" for header in core._cupy_header_list) + code
        program = nvrtc.createProgram(source, f"{kernel.name}.cu", [], [])
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError:
            pytest.fail(f"{kernel.name} ({_array_dtype(call)}, sm_{arch}) does not compile:\n"
                        f"{nvrtc.getProgramLog(program)}\n{source}")
        finally:
            nvrtc.destroyProgram(program)


def _array_dtype(call: dict) -> str:
    return next(a["dtype"] for a in call["args"] if a["kind"] == "ndarray" and a["dtype"] != "uint8")


def _kernel(cupy, call: dict):
    """The real CuPy kernel dtrain builds under the call's name."""
    from dtrain.nn import cuda_kernels

    return {k.name: k for k in cuda_kernels.build_kernels(cupy).values()}[call["name"]]


def _resolve(kernel, call: dict):
    """CuPy's type resolution for the call: array arguments give their dtype, scalars none."""
    dtypes = [np.dtype(a["dtype"]).type if a["kind"] == "ndarray" else None for a in call["args"]]
    return kernel._decide_params_type(tuple(dtypes[:kernel.nin]), tuple(dtypes[kernel.nin:]))
