"""Training-step throughput (and, with ``--memory``, peak step memory) of dtrain against the same network in PyTorch.

    python scripts/bench.py --model alexnet --batch 128 --threads 2 --device cpu
    python scripts/bench.py --model alexnet --memory

Both frameworks train the identical network (same weights, batch, dtype and thread
count) with SGD + momentum on random data; their timed steps are interleaved in one
process so machine noise hits both alike. Each round of one framework starts with one
untimed step: it would time the other framework's idle threads, which still spin on the
cores for a while (PyTorch's OpenMP workers for milliseconds: dtrain's first step after a
PyTorch round took 11.9 ms against 8.0 for the rest, PyTorch's first after dtrain 9.5
against 8.0, simple_cnn, batch 128, two threads), and a training run is a long series of
steps of one framework. Prints images/s for each and the
dtrain/PyTorch ratio (higher is better for dtrain). On a GPU both run full float32
arithmetic unless ``--tf32`` lets both use TF32 tensor cores (PyTorch allows TF32 in
cuDNN convolutions by default; here it is switched off for a like-for-like comparison).

Alongside, in the same run: the GEMM roof (NumPy's float32 GEMM on 2048 x 2048 matrices
with the same threads: the best the BLAS does) and the model's own GEMMs timed alone (every
product of one dtrain training step, recorded at the shapes the layers make them: im2col's,
Winograd's and the fully connected layers'; none for the first layer's input gradient,
which neither framework computes). Each framework's training rate is printed in GFLOP/s
(3 x the forward FLOPs per image of a direct convolution, for both frameworks, although
Winograd's layers multiply less) and as a fraction of the roof; "GEMMs alone" is the rate
dtrain would reach if its step were only its GEMMs, and "in torch" the rate of the very
same GEMMs run by PyTorch's BLAS (``torch.matmul``), which shows how much of a gap is the
BLAS library's. The header names the BLAS kernels (``OPENBLAS_CORETYPE``
picks others) and PyTorch's CPU capability (``ONEDNN_MAX_CPU_ISA=AVX2`` holds oneDNN to AVX2).

``--memory`` runs each framework alone in a fresh child process (so neither sees the
other's allocations; both import the same libraries) and reports host resident memory
after the imports and at its peak over warm-up plus timed steps; the difference is what
training needs: parameters, gradients, optimizer state, activations kept for backward
and workspaces. CPU only: on a GPU, a run's ``summary.json`` has the CuPy pool's bytes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dtrain import limit_openblas_spin  # noqa: E402

limit_openblas_spin()  # as python -m dtrain does, before NumPy loads OpenBLAS

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from dtrain.allocator import keep_freed_memory
from dtrain.backend import synchronize, xp_for
from dtrain.config import load_model_spec
from dtrain.export import to_torch_sequential
from dtrain.models import build_model
from dtrain.nn import gemm
from dtrain.nn.flat import FlatParameters
from dtrain.nn.loss import SoftmaxCrossEntropy
from dtrain.optim import build_optimizer

Step = Callable[[], None]
LR = 1e-4  # small: random labels must not diverge


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="alexnet", help="a conf/model/*.yaml name (comma-separated for several)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--steps", type=int, default=0, help="timed steps per round (0: pick by model size)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--memory", action="store_true", help="peak host memory per step instead of speed (CPU)")
    ap.add_argument("--tf32", action="store_true", help="GPU: TF32 tensor cores for float32 GEMMs and convolutions in "
                                                        "both frameworks (default: off in both)")
    ap.add_argument("--memory-child", choices=["dtrain", "torch"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory and args.device != "cpu":
        ap.error("--memory measures host memory: use --device cpu (GPU runs report CuPy pool bytes in summary.json)")

    import torch

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads, user_api="blas")
    keep_freed_memory()  # as python -m dtrain does; one process: PyTorch's allocations get it too
    set_tf32(args.tf32 and args.device == "gpu", torch)
    if args.memory_child:
        print(json.dumps(measure_memory(args.model, args.memory_child, args, torch)))
        return
    print(f"batch {args.batch}, {args.threads} threads, device {args.device}, float32"
          f"{' (TF32 in both)' if args.tf32 and args.device == 'gpu' else ''}, torch {torch.__version__}")
    if args.device == "cpu":
        print(f"BLAS: {blas_description()}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}")
    if args.memory:
        print(f"{'model':<12}{'':<8}{'imports MiB':>12}{'peak MiB':>10}{'training MiB':>14}")
        for name in args.model.split(","):
            sizes = {fw: memory_in_child(name, fw, args) for fw in ("dtrain", "torch")}
            for fw, m in sizes.items():
                print(f"{name:<12}{fw:<8}{m['imports'] / 2**20:>12.0f}{m['peak'] / 2**20:>10.0f}"
                      f"{(m['peak'] - m['imports']) / 2**20:>14.0f}")
            d, t = (sizes[fw]["peak"] - sizes[fw]["imports"] for fw in ("dtrain", "torch"))
            print(f"{name:<12}training memory dtrain / torch: {d / t:.2f}")
        return
    if args.device == "gpu":
        print(f"{'model':<12}{'dtrain img/s':>14}{'torch img/s':>14}{'ratio':>8}")
        for name in args.model.split(","):
            d, t = bench_model(name, args, torch)
            print(f"{name:<12}{d:>14.1f}{t:>14.1f}{d / t:>8.2f}")
        return
    roof = gemm_roof_gflops()
    print(f"GEMM roof (NumPy float32 2048^3): {roof:.0f} GFLOP/s")
    print(f"{'model':<12}{'dtrain img/s':>14}{'torch img/s':>14}{'ratio':>8}"
          f"{'dtrain GF/s':>13}{'torch GF/s':>12}{'GEMMs alone':>13}{'in torch':>10}"
          f"   fraction of roof: dtrain / torch / GEMMs")
    for name in args.model.split(","):
        d, t = bench_model(name, args, torch)
        per_image = 3 * step_model_flops(name)
        floor, torch_floor = gemm_floor_gflops(name, args, torch)
        rates = [d * per_image / 1e9, t * per_image / 1e9]
        print(f"{name:<12}{d:>14.1f}{t:>14.1f}{d / t:>8.2f}{rates[0]:>13.1f}{rates[1]:>12.1f}{floor:>13.1f}"
              f"{torch_floor:>10.1f}   {rates[0] / roof:.0%} / {rates[1] / roof:.0%} / {floor / roof:.0%}")


def set_tf32(enabled: bool, torch) -> None:
    """The same arithmetic in both frameworks: TF32 on or off for PyTorch's matmuls and cuDNN
    convolutions (whose default is on) and for dtrain's CuPy GEMMs."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    if enabled:
        from dtrain.precision import enable_tf32

        enable_tf32()


def dtrain_setup(name: str, args: argparse.Namespace) -> tuple[Step, Step, object, dict]:
    """(train step, synchronize, model, spec) for dtrain on a fixed random batch."""
    spec = load_model_spec(name)
    xp = xp_for(args.device)
    model = build_model(spec, seed=0).to(xp, np.float32)
    opt = build_optimizer("sgd", FlatParameters(model), lr=LR, momentum=0.9)
    loss_fn = SoftmaxCrossEntropy()
    x_host, y_host = random_batch(spec, args.batch)
    x, y = xp.asarray(x_host), xp.asarray(y_host)

    def step() -> None:
        loss_fn.forward(model.forward(x), y)
        model.backward(loss_fn.backward(), input_grad=False)
        opt.step()

    return step, lambda: synchronize(xp), model, spec


def torch_setup(model, spec: dict, args: argparse.Namespace, torch) -> tuple[Step, Step]:
    """(train step, synchronize) for the PyTorch twin of ``model`` on the same random batch."""
    dev = "cuda" if args.device == "gpu" else "cpu"
    tmodel = to_torch_sequential(model).to(dev)
    opt = torch.optim.SGD(tmodel.parameters(), lr=LR, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    x_host, y_host = random_batch(spec, args.batch)
    x, y = torch.from_numpy(x_host).to(dev), torch.from_numpy(y_host).to(dev)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(tmodel(x), y).backward()
        opt.step()

    return step, (torch.cuda.synchronize if dev == "cuda" else (lambda: None))


def random_batch(spec: dict, batch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((batch, *spec["input_shape"])).astype(np.float32), rng.integers(0, 10, batch)


def timed_steps(model, spec: dict, args: argparse.Namespace) -> int:
    steps = args.steps or max(2, int(2e10 / max(model.flops(tuple(spec["input_shape"])) * args.batch * 3, 1)))
    return min(steps, 200)


def bench_model(name: str, args: argparse.Namespace, torch) -> tuple[float, float]:
    """Median images/s over ``args.rounds`` interleaved rounds: (dtrain, torch)."""
    dtrain_step, dtrain_sync, model, spec = dtrain_setup(name, args)
    torch_step, torch_sync = torch_setup(model, spec, args, torch)
    steps = timed_steps(model, spec, args)

    def timed(step: Step, sync: Step) -> float:
        step()  # untimed: the other framework's threads may still spin (see the module docstring)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        return args.batch * steps / (time.perf_counter() - start)

    for _ in range(2):  # warm-up: workspaces, caches, memory pools
        dtrain_step()
        torch_step()
    dts, tts = [], []
    for _ in range(args.rounds):
        dts.append(timed(dtrain_step, dtrain_sync))
        tts.append(timed(torch_step, torch_sync))
    return statistics.median(dts), statistics.median(tts)


def blas_description() -> str:
    """NumPy's BLAS library, version and the kernels it runs (threadpoolctl's view)."""
    from threadpoolctl import threadpool_info

    found = [f"{i['internal_api']} {i.get('version')} {i.get('architecture') or ''}".strip()
             for i in threadpool_info() if i["user_api"] == "blas"]
    return ", ".join(found) or "none found"


def best_time(fn: Step, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_roof_gflops(n: int = 2048) -> float:
    """NumPy float32 GEMM rate on n x n matrices (best of 5): what the BLAS can do here."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    out = np.empty((n, n), np.float32)
    return 2 * n**3 / best_time(lambda: np.matmul(a, b, out=out)) / 1e9


def step_model_flops(name: str) -> int:
    spec = load_model_spec(name)
    return build_model(spec, seed=0).flops(tuple(spec["input_shape"]))


def model_gemms(name: str, batch: int) -> list[tuple[tuple[int, int], bool, tuple[int, int], bool]]:
    """(a's shape, a transposed, b's shape, b transposed) of every GEMM of one dtrain training
    step on the CPU, recorded as the layers make them: im2col's, Winograd's (alpha^2 per block
    of tiles) and the fully connected layers'."""
    step, _, _, _ = dtrain_setup(name, argparse.Namespace(device="cpu", batch=batch))
    calls = []

    def record(a: np.ndarray, b: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        calls.append((a.shape, not a.flags.c_contiguous, b.shape, not b.flags.c_contiguous))
        return np.matmul(a, b, out=out)

    previous = gemm.set_partitioner(record)
    try:
        step()
    finally:
        gemm.set_partitioner(previous)
    return calls


def gemm_floor_gflops(name: str, args: argparse.Namespace, torch) -> tuple[float, float]:
    """The model's training GFLOP/s if its step were only its GEMMs (each timed alone, best
    of 5): with NumPy's BLAS (dtrain's) and, the same products at the same shapes and
    transpositions, with PyTorch's (``torch.matmul``; MKL in its x86 wheels)."""
    rng = np.random.default_rng(0)
    totals = [0.0, 0.0]
    for a_shape, ta, b_shape, tb in model_gemms(name, args.batch):
        a = rng.standard_normal(a_shape[::-1] if ta else a_shape).astype(np.float32)
        b = rng.standard_normal(b_shape[::-1] if tb else b_shape).astype(np.float32)
        a, b = (a.T if ta else a), (b.T if tb else b)
        out = np.empty((a_shape[0], b_shape[1]), np.float32)
        ta_, tb_, tout = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(out)
        totals[0] += best_time(lambda a=a, b=b, out=out: np.matmul(a, b, out=out))
        totals[1] += best_time(lambda a=ta_, b=tb_, out=tout: torch.matmul(a, b, out=out))
    flops = 3 * step_model_flops(name) * args.batch
    return flops / totals[0] / 1e9, flops / totals[1] / 1e9


def memory_in_child(name: str, framework: str, args: argparse.Namespace) -> dict[str, int]:
    cmd = [sys.executable, __file__, "--model", name, "--batch", str(args.batch), "--threads", str(args.threads),
           "--steps", str(args.steps), "--memory-child", framework]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_memory(name: str, framework: str, args: argparse.Namespace, torch) -> dict[str, int]:
    """Resident bytes after the imports and at the peak of 2 warm-up and a few more steps."""
    imports = read_status_bytes("VmRSS")
    step, sync, model, spec = dtrain_setup(name, args)
    steps = 2 + min(timed_steps(model, spec, args), 5)
    if framework == "torch":
        step, sync = torch_setup(model, spec, args, torch)
        del model  # the twin holds copies of the weights; dtrain's model and optimizer are freed here
    reset_peak_rss()  # the peak from here on: not the moment both frameworks' models existed
    for _ in range(steps):
        step()
    sync()
    return {"imports": imports, "peak": read_status_bytes("VmHWM")}


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS (Linux ``clear_refs`` 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def read_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field} line: --memory needs Linux")


if __name__ == "__main__":
    main()
