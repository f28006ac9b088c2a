"""The BLAS-sensitive tests again, under every OpenBLAS kernel family this CPU can execute.

NumPy's OpenBLAS picks its GEMM kernels by CPU family (``Haswell`` on AVX2 machines,
``SkylakeX`` on AVX-512 ones, ...), and the families round differently: how rows are
grouped, and whether a two-thread GEMM matches a one-thread one. A bit-level claim that
holds on one family only is a bug that shows on the next user's machine. Tests marked
``blas`` make such claims (determinism by construction, blockwise equality, bitwise
resume); this test runs them, each family in its own pytest process with
``OPENBLAS_CORETYPE`` set, for every family the CPU flags allow. The family the suite
itself runs under is skipped here: the suite has just run those tests under it.

By hand: ``OPENBLAS_CORETYPE=SkylakeX bash scripts/test.sh -m blas``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from threadpoolctl import threadpool_info

REPO = Path(__file__).resolve().parent.parent

# OPENBLAS_CORETYPE value -> the Linux CPU flags its kernels need, and the names
# OpenBLAS reports for it (a Prescott request runs the SSE3 kernels it calls Katmai).
FAMILIES = {
    "Prescott": ({"pni"}, {"Prescott", "Katmai"}),
    "Sandybridge": ({"avx"}, {"Sandybridge"}),
    "Haswell": ({"avx2", "fma"}, {"Haswell"}),
    "SkylakeX": ({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}, {"SkylakeX"}),
}


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def blas_architecture() -> str | None:
    """The kernel family of the OpenBLAS that NumPy loaded in this process."""
    for lib in threadpool_info():
        if lib.get("internal_api") == "openblas":
            return lib.get("architecture")
    return None


@pytest.mark.parametrize("family", list(FAMILIES))
def test_blas_sensitive_tests_pass_under_each_kernel_family(family):
    needed, names = FAMILIES[family]
    current = blas_architecture()
    if current is None:
        pytest.skip("NumPy does not use OpenBLAS here: OPENBLAS_CORETYPE has no effect")
    if not needed <= cpu_flags():
        pytest.skip(f"this CPU lacks {sorted(needed - cpu_flags())} for OpenBLAS's {family} kernels")
    if current in names:
        pytest.skip(f"the suite itself runs under the {current} kernels")
    env = {**os.environ, "OPENBLAS_CORETYPE": family}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "blas",
                           str(REPO / "tests")], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    output = proc.stdout + proc.stderr
    reported = next((line for line in output.splitlines() if line.startswith("BLAS: ")), "")
    assert any(f"kernels {name}" in reported for name in names), f"the child did not run {family}:\n{output}"
    assert proc.returncode == 0, f"blas-marked tests failed under OPENBLAS_CORETYPE={family}:\n{output}"
    assert " passed" in output and " failed" not in output, output
