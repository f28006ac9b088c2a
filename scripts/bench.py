"""Training-step throughput of dtrain against the same network in PyTorch, in one run.

    python scripts/bench.py --model alexnet --batch 128 --threads 2 --device cpu

Both frameworks train the identical network (same weights, batch, dtype and thread
count) with SGD + momentum on random data; their timed steps are interleaved so machine
noise hits both alike. Prints images/s for each and the dtrain/PyTorch ratio (higher is
better for dtrain).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dtrain.backend import synchronize, xp_for  # noqa: E402
from dtrain.export import to_torch_sequential  # noqa: E402
from dtrain.models import build_model, load_model_spec  # noqa: E402
from dtrain.nn.flat import FlatParameters  # noqa: E402
from dtrain.nn.loss import SoftmaxCrossEntropy  # noqa: E402
from dtrain.optim import build_optimizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="alexnet", help="a conf/model/*.yaml name (comma-separated for several)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--steps", type=int, default=0, help="timed steps per round (0: pick by model size)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads, user_api="blas")
    print(f"batch {args.batch}, {args.threads} threads, device {args.device}, float32, torch {torch.__version__}")
    print(f"{'model':<12}{'dtrain img/s':>14}{'torch img/s':>14}{'ratio':>8}")
    for name in args.model.split(","):
        d, t = bench_model(name, args, torch)
        print(f"{name:<12}{d:>14.1f}{t:>14.1f}{d / t:>8.2f}")


def bench_model(name: str, args: argparse.Namespace, torch) -> tuple[float, float]:
    spec = load_model_spec(name)
    xp = xp_for(args.device)
    model = build_model(spec, seed=0).to(xp, np.float32)
    flat = FlatParameters(model)
    opt = build_optimizer("sgd", flat, lr=1e-4, momentum=0.9)  # small: random labels must not diverge
    loss_fn = SoftmaxCrossEntropy()
    tdev = "cuda" if args.device == "gpu" else "cpu"
    tmodel = to_torch_sequential(model).to(tdev)
    topt = torch.optim.SGD(tmodel.parameters(), lr=1e-4, momentum=0.9)
    tloss = torch.nn.CrossEntropyLoss()

    rng = np.random.default_rng(0)
    x_host = rng.standard_normal((args.batch, *spec["input_shape"])).astype(np.float32)
    y_host = rng.integers(0, 10, args.batch)
    x, y = xp.asarray(x_host), xp.asarray(y_host)
    tx, ty = torch.from_numpy(x_host).to(tdev), torch.from_numpy(y_host).to(tdev)

    def dtrain_step() -> None:
        loss_fn.forward(model.forward(x), y)
        model.backward(loss_fn.backward())
        opt.step()

    def torch_step() -> None:
        topt.zero_grad(set_to_none=True)
        tloss(tmodel(tx), ty).backward()
        topt.step()

    def timed(step, sync) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        return args.batch * steps / (time.perf_counter() - start)

    torch_sync = torch.cuda.synchronize if tdev == "cuda" else (lambda: None)
    steps = args.steps or max(2, int(2e10 / max(model.flops(tuple(spec["input_shape"])) * args.batch * 3, 1)))
    steps = min(steps, 200)
    for _ in range(2):  # warm-up: workspaces, caches, memory pools
        dtrain_step()
        torch_step()
    dts, tts = [], []
    for _ in range(args.rounds):
        dts.append(timed(dtrain_step, lambda: synchronize(xp)))
        tts.append(timed(torch_step, torch_sync))
    return statistics.median(dts), statistics.median(tts)


if __name__ == "__main__":
    main()
