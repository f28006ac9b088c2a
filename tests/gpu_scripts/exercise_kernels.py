"""Run every layer that has a CUDA kernel, forward and backward, on the (stand-in) GPU in
float16, float32 and float64, so that each kernel is called the way dtrain's wrappers call
it. Under tests/fake_cupy with FAKE_CUPY_KERNEL_LOG set, every call's argument kinds are
logged; tests/test_cupy_kernels.py checks them against the real CuPy."""
from __future__ import annotations

import cupy
import numpy as np

from dtrain.nn import AvgPool2d, Conv2d, MaxPool2d, ReLU, Sequential

rng = np.random.default_rng(0)
for dtype in (np.float16, np.float32, np.float64):
    x = cupy.asarray(rng.normal(size=(3, 2, 9, 8)).astype(dtype))
    for layer in (Conv2d(2, 4, 3, stride=2, padding=1, dtype=np.float32), MaxPool2d(3, 2, 1), AvgPool2d(2, 2, 1), ReLU()):
        layer.to(cupy, dtype)
        y = layer.forward(x)
        layer.backward(cupy.ones(y.shape, dtype=dtype))
    # The ReLU fusions: gated col2im and max-pool kernels
    model = Sequential(ReLU(), Conv2d(2, 4, 3, padding=1, dtype=np.float32), ReLU(), MaxPool2d(2)).to(cupy, dtype)
    y = model.forward(x)
    model.backward(cupy.ones(y.shape, dtype=dtype))
print("OK")
