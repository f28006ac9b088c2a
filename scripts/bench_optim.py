"""One optimizer step over a model's whole parameter set: dtrain against torch.optim, in one run.

    python scripts/bench_optim.py                          # AlexNet, SGD with momentum and Adam
    python scripts/bench_optim.py --model lenet --optim adam --rounds 21

dtrain updates its flat buffer (SGD and Adam as one fused pass per block on the CPU, see
``dtrain/optim/cpu_updates.py``); PyTorch updates the same parameter tensors with
``torch.optim`` as it runs by default and, where it has one, with ``fused=True``. Both get
the same fixed gradients and ``--threads`` threads; the rounds alternate between the
implementations so that machine noise hits them alike. Prints the median milliseconds of a
step and dtrain's time over each PyTorch variant's (lower is better for dtrain).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dtrain import limit_openblas_spin  # noqa: E402

limit_openblas_spin()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from dtrain.config import load_model_spec  # noqa: E402
from dtrain.models import build_model  # noqa: E402
from dtrain.nn.flat import FlatParameters  # noqa: E402
from dtrain.optim import build_optimizer  # noqa: E402

SETTINGS = {"sgd": {"lr": 0.01, "momentum": 0.9}, "adam": {"lr": 1e-4}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="alexnet", help="a conf/model/*.yaml name")
    ap.add_argument("--optim", default="sgd,adam", help="comma-separated: sgd (momentum 0.9), adam")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=11)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads, user_api="blas")
    model = build_model(load_model_spec(args.model), seed=0)
    flat = FlatParameters(model)
    rng = np.random.default_rng(0)
    flat.grads[...] = rng.standard_normal(flat.size).astype(flat.dtype)
    tensors = [torch.from_numpy(e.module.params[e.key].copy()) for e in flat.entries]
    for tensor in tensors:
        tensor.grad = torch.from_numpy(rng.standard_normal(tensor.shape).astype(np.float32))
    print(f"model {args.model}: {sum(t.numel() for t in tensors):,} parameters, float32, {args.threads} threads, "
          f"torch {torch.__version__}")
    print(f"{'optimizer':<10}{'dtrain ms':>11}{'torch ms':>10}{'fused ms':>10}{'vs torch':>10}{'vs fused':>10}")
    for kind in args.optim.split(","):
        settings = SETTINGS[kind]
        cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[kind]
        steps = {"dtrain": build_optimizer(kind, flat, **settings).step,
                 "torch": cls(tensors, **settings).step,
                 "fused": cls(tensors, fused=True, **settings).step}
        ms = timed(steps, args.rounds)
        print(f"{kind:<10}{ms['dtrain']:>11.1f}{ms['torch']:>10.1f}{ms['fused']:>10.1f}"
              f"{ms['dtrain'] / ms['torch']:>10.2f}{ms['dtrain'] / ms['fused']:>10.2f}")


def timed(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median milliseconds of each step over ``rounds`` alternating rounds (after one untimed)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for r in range(rounds + 1):
        for name in order if r % 2 else order[::-1]:
            start = time.perf_counter()
            steps[name]()
            if r:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


if __name__ == "__main__":
    main()
