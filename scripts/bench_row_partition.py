"""Row-partitioned GEMMs on the CPU: 2 partitions x 1 BLAS thread against 1 x 2 and 1 x 1.

    python scripts/bench_row_partition.py --batch 128 --reps 7 [--step]

The GEMMs are those Conv2d really issues for AlexNet-for-MNIST conv2 (96->256, k5 p2 on
13x13) and conv4 (384->384, k3 p1 on 6x6): one forward and backward of each layer is run
with a recording hook in ``dtrain.nn.gemm``, so shapes and layouts (transposed views)
follow ``dtrain/nn/conv.py``. Configurations:

  1x1  one GEMM, 1 BLAS thread          1x2  one GEMM, 2 BLAS threads (the usual setup)
  2x1  RowPartitioner([0, 1]): two row blocks on two worker threads, 1 BLAS thread each
  2x2  the same with 2 BLAS threads per partition (no budget: 4 threads on 2 cores)

Repetitions rotate through the configurations so load from other processes hits all
alike; the table shows medians (``--stat min``: the fastest repetition, which on a
shared machine is the one least disturbed by other processes), the ratios 1x2/2x1, 1x1/2x1 and 2x2/2x1 (above 1: the
budgeted partitioning is faster), how many cores the process kept busy (CPU time / wall time: 2 means both
partitions really ran at once) and the bytes each setup moves (inputs read + output written, summed over
partitions: every partition reads all of ``b``). ``--step`` adds a whole AlexNet training
step (forward, cross-entropy, backward, SGD) with and without row partitioning.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from functools import partial
from typing import Any, Callable

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dtrain.nn import gemm  # noqa: E402
from dtrain.nn.conv import Conv2d  # noqa: E402
from dtrain.nn.blocks import split_evenly  # noqa: E402
from dtrain.parallel.row_partition import RowPartitioner  # noqa: E402

# (name, per-sample input shape, out_channels, kernel, padding)
LAYERS = [("conv2", (96, 13, 13), 256, 5, 2), ("conv4", (384, 6, 6), 384, 3, 1)]
GEMM_NAMES = ("forward", "weight grad", "input grad")
DEVICES = [0, 1]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per configuration")
    ap.add_argument("--stat", choices=("median", "min"), default="median", help="statistic of the repetitions")
    ap.add_argument("--step", action="store_true", help="also time a whole AlexNet training step")
    ap.add_argument("--step-reps", type=int, default=3)
    return ap.parse_args()


def layout_of(x: np.ndarray) -> tuple[tuple[int, ...], bool]:
    """(shape, is a transposed view)."""
    return tuple(x.shape), not x.flags.c_contiguous and x.flags.f_contiguous


def recorded_gemms(batch: int, in_shape: tuple[int, ...], out_channels: int, kernel: int, padding: int) -> list:
    """Layouts of (a, b, out) of the GEMMs of one Conv2d forward + backward, in call order."""
    calls = []

    def record(a: np.ndarray, b: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        calls.append((layout_of(a), layout_of(b)))
        return np.matmul(a, b, out=out)

    layer = Conv2d(in_shape[0], out_channels, kernel, padding=padding, rng=np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((batch, *in_shape)).astype(np.float32)
    gemm.set_partitioner(record)
    try:
        y = layer(x)
        layer.backward(np.ones_like(y))
    finally:
        gemm.set_partitioner(None)
    return calls


def materialize(layout: tuple[tuple[int, ...], bool], rng: np.random.Generator) -> np.ndarray:
    shape, transposed = layout
    if transposed:
        return rng.standard_normal(shape[::-1], dtype=np.float32).T
    return rng.standard_normal(shape, dtype=np.float32)


def measure(configs: dict[str, Callable[[], Any]], reps: int, stat: str) -> dict[str, tuple[float, float]]:
    """(seconds, cores busy = process CPU time / wall time) per configuration, of the median
    repetition or the fastest one (``stat``); each repetition runs all configurations, in a
    rotating order."""
    names = list(configs)
    for name in names:  # warm-up: threads, page faults of the output
        configs[name]()
    wall: dict[str, list[float]] = {name: [] for name in names}
    busy: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            start, cpu_start = time.perf_counter(), time.process_time()
            configs[name]()
            elapsed = time.perf_counter() - start
            wall[name].append(elapsed)
            busy[name].append((time.process_time() - cpu_start) / elapsed)
    if stat == "min":
        return {name: min(zip(wall[name], busy[name])) for name in names}
    return {name: (statistics.median(wall[name]), statistics.median(busy[name])) for name in names}


def plain(a: np.ndarray, b: np.ndarray, out: np.ndarray, threads: int) -> Callable[[], Any]:
    def run() -> Any:
        with threadpool_limits(limits=threads, user_api="blas"):
            return np.matmul(a, b, out=out)

    return run


def bytes_moved(m: int, k: int, n: int, row_blocks: list[int], itemsize: int) -> int:
    """Inputs read plus output written, summed over the non-empty row blocks."""
    return sum((rows * k + k * n + rows * n) * itemsize for rows in row_blocks if rows)


def bench_gemms(args: argparse.Namespace, partitioner: RowPartitioner, unbudgeted: RowPartitioner) -> None:
    rng = np.random.default_rng(0)
    header = (f"{'layer':6} {'gemm':11} {'a (M x K) @ b (K x N)':>26} {'1x1 ms':>7} {'1x2 ms':>7} {'2x2 ms':>7}"
              f" {'2x1 ms':>7} {'1x2/2x1':>7} {'1x1/2x1':>7} {'2x2/2x1':>7} {'cores 1x2':>9} {'cores 2x1':>9}"
              f" {'MB 1 part':>9} {'MB 2 parts':>10}")
    print(header)
    print("-" * len(header))
    for name, in_shape, out_channels, kernel, padding in LAYERS:
        for gemm_name, (a_layout, b_layout) in zip(GEMM_NAMES, recorded_gemms(args.batch, in_shape, out_channels,
                                                                              kernel, padding)):
            a, b = materialize(a_layout, rng), materialize(b_layout, rng)
            (m, k), n = a.shape, b.shape[1]
            out = np.empty((m, n), dtype=np.float32)
            measured = measure(
                {"1x1": plain(a, b, out, 1), "1x2": plain(a, b, out, 2), "2x2": partial(unbudgeted, a, b, out),
                 "2x1": partial(partitioner, a, b, out)},
                args.reps,
                args.stat,
            )
            t = {config: seconds for config, (seconds, _) in measured.items()}
            cores = {config: busy for config, (_, busy) in measured.items()}
            blocks = [stop - start for start, stop in split_evenly(m, len(DEVICES))]
            shape = f"{m}x{k}{'.T' if a_layout[1] else ''} @ {k}x{n}{'.T' if b_layout[1] else ''}"
            print(f"{name:6} {gemm_name:11} {shape:>26} {t['1x1'] * 1e3:7.1f} {t['1x2'] * 1e3:7.1f}"
                  f" {t['2x2'] * 1e3:7.1f} {t['2x1'] * 1e3:7.1f} {t['1x2'] / t['2x1']:7.2f}"
                  f" {t['1x1'] / t['2x1']:7.2f} {t['2x2'] / t['2x1']:7.2f} {cores['1x2']:9.2f} {cores['2x1']:9.2f}"
                  f" {bytes_moved(m, k, n, [m], 4) / 1e6:9.1f} {bytes_moved(m, k, n, blocks, 4) / 1e6:10.1f}")
    print("(.T: operand is a transposed view; the 2x1 runs split the rows of a in two even blocks)")


def bench_step(args: argparse.Namespace) -> None:
    from dtrain.config import load_model_spec
    from dtrain.models import build_model
    from dtrain.nn.loss import SoftmaxCrossEntropy

    spec = load_model_spec("alexnet")
    model = build_model(spec, seed=0)
    loss_fn = SoftmaxCrossEntropy()
    rng = np.random.default_rng(0)
    x = rng.random((args.batch, 1, 28, 28), dtype=np.float32)  # pixel-like values in [0, 1)
    labels = rng.integers(0, 10, size=args.batch)

    def step() -> None:
        loss_fn(model(x), labels)
        model.backward(loss_fn.backward(), input_grad=False)
        for _, layer, key in model.named_parameters():
            layer.params[key] -= 1e-3 * layer.grads[key]

    def with_threads(threads: int) -> Callable[[], None]:
        def run() -> None:
            with threadpool_limits(limits=threads, user_api="blas"):
                step()

        return run

    def partitioned() -> None:
        with RowPartitioner(DEVICES):  # routes the layers' GEMMs for the step (threads start in ~1 ms)
            step()

    measured = measure({"1x1": with_threads(1), "1x2": with_threads(2), "2x1": partitioned}, args.step_reps, args.stat)
    t = {config: seconds for config, (seconds, _) in measured.items()}
    print(f"\nAlexNet training step, batch {args.batch}: 1x1 {t['1x1']:.2f} s, 1x2 {t['1x2']:.2f} s, "
          f"2x1 {t['2x1']:.2f} s; 1x2/2x1 {t['1x2'] / t['2x1']:.2f}, 1x1/2x1 {t['1x1'] / t['2x1']:.2f}; "
          f"cores busy 1x2 {measured['1x2'][1]:.2f}, 2x1 {measured['2x1'][1]:.2f}")


def main() -> None:
    args = parse_args()
    print(f"batch {args.batch}, float32, {args.stat} of {args.reps} repetitions; devices {DEVICES} (worker threads)\n")
    with RowPartitioner(DEVICES, 1) as partitioner, RowPartitioner(DEVICES, 2) as unbudgeted:
        bench_gemms(args, partitioner, unbudgeted)
    if args.step:
        bench_step(args)


if __name__ == "__main__":
    main()
