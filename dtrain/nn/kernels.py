"""The kernel set for an array: :mod:`dtrain.nn.cuda_kernels` on the GPU, :mod:`dtrain.nn.cpu_kernels` on the CPU.

Both modules offer the same functions with the same arguments and results (batch-last
arrays in, new arrays out), so a layer calls ``kernels_for(x).max_pool_forward(...)``
and has one code path for NumPy and CuPy. Two exceptions: only the CPU set has direct
convolution kernels and Winograd transforms; ``direct_conv_pays``, ``direct_weight_grad_pays``
and ``winograd_tile`` (in both) say when a convolution uses them: never on the GPU.
"""
from __future__ import annotations

from types import ModuleType

from dtrain.backend import is_gpu_array
from dtrain.nn import cpu_kernels, cuda_kernels
from dtrain.nn.module import Array


def kernels_for(a: Array) -> ModuleType:
    """The kernel module for the device that holds ``a``."""
    return cuda_kernels if is_gpu_array(a) else cpu_kernels
