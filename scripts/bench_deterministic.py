"""What deterministic mode costs: images/s with ``parallel.deterministic=true`` against the
default (bucketed all-reduce) mode, one process, on the same model, batch and thread count.

    python scripts/bench_deterministic.py --model alexnet --batch 96 --steps 8 --threads 2

Runs ``python -m dtrain`` on synthetic data three ways, interleaved ``--repeats`` times:
the default mode with ``--threads`` BLAS threads, deterministic mode with ``--threads``
worker threads (one micro-batch each, one BLAS thread each), and deterministic mode with
one thread. Prints the median images/s of each (every step counts, the first included)
and the ratios: the cost of determinism, and what the worker threads buy over one thread.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchlib import median_run, train_summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="alexnet")
    ap.add_argument("--batch", type=int, default=96, help="global batch (a multiple of --chunks)")
    ap.add_argument("--chunks", type=int, default=6, help="parallel.deterministic_chunks")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each configuration, interleaved; the median counts")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    common = [f"model={args.model}", "data=synthetic", f"data.train_size={args.batch * args.steps}",
              "data.test_size=64", f"trainer.batch_size={args.batch}", "trainer.epochs=1", "trainer.progress=false",
              "device=cpu", "logging.tensorboard=false", "trainer.checkpoint_every=0",
              f"parallel.deterministic_chunks={args.chunks}"]
    configs = {
        f"default, {args.threads} threads": ["parallel.deterministic=false", f"threads={args.threads}"],
        f"deterministic, {args.threads} threads": ["parallel.deterministic=true", f"threads={args.threads}"],
        "deterministic, 1 thread": ["parallel.deterministic=true", "threads=1"],
    }
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name, overrides in configs.items():
                runs[name].append(train_summary([*common, *overrides], Path(tmp), verbose=args.verbose))
    median = {name: median_run(rs)["images_per_sec"] for name, rs in runs.items()}
    print(f"{args.model}, batch {args.batch} ({args.chunks} micro-batches in deterministic mode), {args.steps} steps, "
          f"synthetic data, CPU, 1 process; median of {args.repeats} runs")
    print(f"{'mode':<28} {'img/s':>9}  all runs img/s")
    for name, value in median.items():
        every = ", ".join(f"{r['images_per_sec']:.1f}" for r in runs[name])
        print(f"{name:<28} {value:>9.1f}  {every}")
    names = list(configs)
    print(f"deterministic / default ({args.threads} threads): {median[names[1]] / median[names[0]]:.2f}")
    print(f"deterministic {args.threads} threads / 1 thread: {median[names[1]] / median[names[2]]:.2f}")


if __name__ == "__main__":
    main()
