"""Forward+backward time of each layer of a model (AlexNet-for-MNIST by default), dtrain against PyTorch, in one run.

    python scripts/bench_layers.py --batch 128 --threads 2 --reps 7
    python scripts/bench_layers.py --layers pool1,pool2,pool5 --phase backward
    python scripts/bench_layers.py --model lenet --conv im2col

``--model lenet`` or ``simple_cnn`` times those models' convolution and pooling layers;
``--conv direct``, ``im2col`` or ``winograd`` makes every dtrain convolution take that
algorithm (Winograd where the layer's geometry allows it: square kernel, stride 1; im2col
elsewhere); the default, ``auto``, lets ``dtrain.nn.cpu_kernels`` choose (``direct_conv_pays``,
``winograd_tile``), as training does.

Both frameworks get the same shapes, dtype (float32) and thread count. For every layer
the timed repetitions alternate between dtrain and PyTorch (the order flips each
repetition) so that load from other processes hits both alike; the table shows medians
and the ratio dtrain / PyTorch (lower is better for dtrain). Each framework gets its input
and output gradient in the memory order its own network hands the layer: PyTorch contiguous
NCHW, dtrain batch-last (an NCHW view of (C, H, W, N) memory). Both sides compute the
input gradient, except for the first layer (``conv1``), whose input gradient training
never computes. ``--phase forward`` or ``backward`` times one
pass alone (the other runs untimed before it). The fully connected layers are included when
``dtrain.nn.linear`` is available.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="BLAS threads for dtrain = torch.set_num_threads")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per framework and layer")
    ap.add_argument("--warmup", type=int, default=2, help="untimed repetitions first (workspaces, caches)")
    ap.add_argument("--layers", default="", help="comma-separated subset, e.g. conv2,pool1")
    ap.add_argument("--phase", default="both", choices=["both", "forward", "backward"], help="what is timed")
    ap.add_argument("--model", default="alexnet", choices=["alexnet", "lenet", "simple_cnn"], help="whose layers")
    ap.add_argument("--conv", default="auto", choices=["auto", "direct", "im2col", "winograd"],
                    help="the algorithm of dtrain's convolutions")
    return ap.parse_args()


ARGS = parse_args()
# BLAS and OpenMP read these when they load, so they must be set before numpy is imported.
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dtrain import limit_openblas_spin  # noqa: E402

limit_openblas_spin()  # as python -m dtrain does

import numpy as np
import torch

from dtrain.allocator import keep_freed_memory
from dtrain.nn import cpu_kernels
from dtrain.nn.conv import Conv2d
from dtrain.nn.activation import ReLU
from dtrain.nn.pool import MaxPool2d

# (name, per-sample input shape, dtrain layer factory, torch layer factory)
Case = tuple[str, tuple[int, ...], Callable[[], Any], Callable[[], torch.nn.Module]]


def conv(name: str, shape: tuple[int, ...], out_channels: int, kernel: int, padding: int, stride: int = 1) -> Case:
    in_channels = shape[0]
    return (name, shape,
            lambda: Conv2d(in_channels, out_channels, kernel, stride, padding, rng=np.random.default_rng(0)),
            lambda: torch.nn.Conv2d(in_channels, out_channels, kernel, stride, padding))


def maxpool(name: str, shape: tuple[int, ...], kernel: int = 3, stride: int = 2) -> Case:
    return (name, shape, lambda: MaxPool2d(kernel, stride), lambda: torch.nn.MaxPool2d(kernel, stride))


def relu(name: str, shape: tuple[int, ...]) -> Case:
    return (name, shape, ReLU, torch.nn.ReLU)


def linear_cases() -> list[Case]:
    """fc6-fc8, or nothing when dtrain has no Linear layer yet."""
    try:
        from dtrain.nn.linear import Linear
    except ImportError:
        return []

    def fc(name: str, n_in: int, n_out: int) -> Case:
        return (name, (n_in,), lambda: Linear(n_in, n_out, rng=np.random.default_rng(0)),
                lambda: torch.nn.Linear(n_in, n_out))

    return [fc("fc6", 1024, 4096), fc("fc7", 4096, 4096), fc("fc8", 4096, 10)]


def alexnet_cases() -> list[Case]:
    return [
        conv("conv1", (1, 28, 28), 96, 5, 2),
        relu("relu1", (96, 28, 28)),
        maxpool("pool1", (96, 28, 28)),
        conv("conv2", (96, 13, 13), 256, 5, 2),
        relu("relu2", (256, 13, 13)),
        maxpool("pool2", (256, 13, 13)),
        conv("conv3", (256, 6, 6), 384, 3, 1),
        conv("conv4", (384, 6, 6), 384, 3, 1),
        conv("conv5", (384, 6, 6), 256, 3, 1),
        maxpool("pool5", (256, 6, 6)),
        *linear_cases(),
    ]


def lenet_cases() -> list[Case]:
    return [conv("conv1", (1, 28, 28), 6, 5, 0), maxpool("pool1", (6, 24, 24), 2, 2),
            conv("conv2", (6, 12, 12), 16, 5, 0), maxpool("pool2", (16, 8, 8), 2, 2)]


def simple_cnn_cases() -> list[Case]:
    return [conv("conv1", (1, 28, 28), 32, 2, 0, 2), conv("conv2", (32, 14, 14), 64, 2, 1, 2),
            conv("conv3", (64, 8, 8), 128, 2, 0, 2)]


# Every model's first layer: neither framework computes its input gradient in training.
FIRST_LAYER = "conv1"


def dtrain_step(layer: Any, x: np.ndarray, grad: np.ndarray, phase: str, input_grad: bool) -> Callable[[], float]:
    """One forward and backward pass; returns the seconds of ``phase``."""
    def step() -> float:
        start = time.perf_counter()
        layer.forward(x)
        middle = time.perf_counter()
        layer.backward(grad, input_grad=input_grad)
        return _phase_seconds(start, middle, time.perf_counter(), phase)

    return step


def torch_step(layer: torch.nn.Module, x: np.ndarray, grad: np.ndarray, phase: str,
               input_grad: bool) -> Callable[[], float]:
    xt = torch.from_numpy(x).requires_grad_(input_grad)
    gt = torch.from_numpy(grad)

    def step() -> float:
        xt.grad = None
        layer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out = layer(xt)
        middle = time.perf_counter()
        out.backward(gt)
        return _phase_seconds(start, middle, time.perf_counter(), phase)

    return step


def _phase_seconds(start: float, middle: float, end: float, phase: str) -> float:
    return {"both": end - start, "forward": middle - start, "backward": end - middle}[phase]


def bench(case: Case, batch: int, reps: int, warmup: int, phase: str) -> tuple[tuple[int, ...], int, float, float]:
    """(output shape, forward FLOPs, median dtrain seconds, median torch seconds) of ``phase``."""
    name, shape, make_dtrain, make_torch = case
    input_grad = name != FIRST_LAYER
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *shape), dtype=np.float32)
    layer = make_dtrain()
    out_shape = (batch, *layer.output_shape(shape))
    grad = rng.standard_normal(out_shape, dtype=np.float32)
    steps = {"dtrain": dtrain_step(layer, as_in_network(x), as_in_network(grad), phase, input_grad),
             "torch": torch_step(make_torch(), x, grad, phase, input_grad)}
    times: dict[str, list[float]] = {"dtrain": [], "torch": []}
    for rep in range(warmup + reps):
        order = ("dtrain", "torch") if rep % 2 == 0 else ("torch", "dtrain")
        for framework in order:
            t = steps[framework]()
            if rep >= warmup:
                times[framework].append(t)
    flops = batch * layer.flops(shape)
    return out_shape, flops, statistics.median(times["dtrain"]), statistics.median(times["torch"])


def as_in_network(a: np.ndarray) -> np.ndarray:
    """``a`` in the memory order a dtrain network hands a layer: an (N, C, H, W) view of
    batch-last memory (see dtrain.nn.layout); 2-D arrays as they are."""
    if a.ndim != 4:
        return a
    return np.ascontiguousarray(a.transpose(1, 2, 3, 0)).transpose(3, 0, 1, 2)


def limit_blas_threads(threads: int) -> None:
    """Cap numpy's BLAS pool with threadpoolctl when it is installed (env vars already ask for it)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(threads, user_api="blas")


def main() -> None:
    torch.set_num_threads(ARGS.threads)
    limit_blas_threads(ARGS.threads)
    keep_freed_memory()  # as python -m dtrain does (both frameworks share the process)
    if ARGS.conv != "auto":
        cpu_kernels.DIRECT_CONV_MAX_MACS = 1 << 62 if ARGS.conv == "direct" else 0
        cpu_kernels.WINOGRAD_MIN_CHANNELS = 1 if ARGS.conv == "winograd" else 1 << 62
    cases = {"alexnet": alexnet_cases, "lenet": lenet_cases, "simple_cnn": simple_cnn_cases}[ARGS.model]()
    if ARGS.layers:
        wanted = ARGS.layers.split(",")
        unknown = sorted(set(wanted) - {c[0] for c in cases})
        if unknown:
            sys.exit(f"unknown layers {unknown}; choose from {[c[0] for c in cases]}")
        cases = [c for c in cases if c[0] in wanted]
    timed = {"both": "forward+backward", "forward": "forward alone", "backward": "backward alone"}[ARGS.phase]
    print(f"{ARGS.model}, batch {ARGS.batch}, {ARGS.threads} threads, float32, {timed}, median of {ARGS.reps}, "
          f"convolutions: {ARGS.conv}; "
          f"torch {torch.__version__}, numpy {np.__version__}")
    # GFLOP/s counts forward + backward as 3x the forward FLOPs (two GEMMs in backward).
    passes = {"both": 3, "forward": 1, "backward": 2}[ARGS.phase]
    print(f"{'layer':<7}{'output':>22}{'dtrain ms':>11}{'torch ms':>10}{'ratio':>7}{'dtrain GF/s':>13}{'torch GF/s':>12}")
    totals = [0.0, 0.0]
    for case in cases:
        out_shape, flops, d, t = bench(case, ARGS.batch, ARGS.reps, ARGS.warmup, ARGS.phase)
        totals[0] += d
        totals[1] += t
        rates = f"{passes * flops / d / 1e9:>13.1f}{passes * flops / t / 1e9:>12.1f}" if flops else ""
        print(f"{case[0]:<7}{out_shape!s:>22}{d * 1e3:>11.2f}{t * 1e3:>10.2f}{d / t:>7.2f}{rates}", flush=True)
    print(f"{'total':<7}{'':>22}{totals[0] * 1e3:>11.2f}{totals[1] * 1e3:>10.2f}{totals[0] / totals[1]:>7.2f}")


if __name__ == "__main__":
    main()
