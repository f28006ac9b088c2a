"""Data-parallel scaling of a training run: 1 rank vs N ranks, overlap on and off.

    python scripts/bench_scaling.py --model alexnet --ranks 2 --per-rank-batch 64 --steps 12

Runs ``mpirun -n R python -m dtrain`` on synthetic data with the same per-rank batch and
``threads=1`` (one BLAS thread per rank), reads each run's ``summary.json`` and prints
images/s, scaling efficiency (images/s with R ranks / (R x images/s with 1 rank)) and the
share of the step spent waiting on gradient communication, with the mean forward, backward
(where overlapped reductions are driven), communication-wait and optimizer ms per step
(from each run's ``summary.json``, rank 0). The first two steps (start-up,
workspace allocation) count in the figures, so use enough steps to amortize them.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchlib import median_run, train_summary


def run(ranks: int, args: argparse.Namespace, overlap: bool, out: Path) -> dict:
    overrides = [f"model={args.model}", "data=synthetic", f"data.train_size={args.per_rank_batch * ranks * args.steps}",
                 "data.test_size=64", f"trainer.batch_size={args.per_rank_batch * ranks}", "trainer.epochs=1",
                 "trainer.progress=false", "threads=1", "device=cpu", "logging.tensorboard=false",
                 "trainer.checkpoint_every=0", f"parallel.overlap={str(overlap).lower()}",
                 f"parallel.bucket_mb={args.bucket_mb}"]
    return train_summary(overrides, out, ranks, args.verbose)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="alexnet")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--per-rank-batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--bucket-mb", type=float, default=25)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each configuration, interleaved; the median counts")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    configs = [(1, False), (args.ranks, True), (args.ranks, False)]
    with tempfile.TemporaryDirectory() as tmp:
        runs: dict[tuple[int, bool], list[dict]] = {c: [] for c in configs}
        for _ in range(args.repeats):
            for ranks, overlap in configs:
                runs[(ranks, overlap)].append(run(ranks, args, overlap, Path(tmp)))
    median = {c: median_run(rs) for c, rs in runs.items()}
    base = median[(1, False)]["images_per_sec"]
    print(f"{args.model}, per-rank batch {args.per_rank_batch}, 1 BLAS thread per rank, {args.steps} steps, "
          f"synthetic data, CPU; median run of {args.repeats}")
    print(f"{'ranks':>5} {'overlap':>8} {'img/s':>9} {'efficiency':>11} {'comm wait':>10} {'step ms':>9}"
          f" {'fwd ms':>8} {'bwd ms':>8} {'comm ms':>8} {'opt ms':>8}  all runs img/s")
    for (ranks, overlap), s in median.items():
        eff = s["images_per_sec"] / (ranks * base)
        pb = s["phase_breakdown"]
        ms = [pb["phases"][name]["ms_per_step"] for name in ("forward", "backward", "comm", "optimizer")]
        every = ", ".join(f"{r['images_per_sec']:.1f}" for r in runs[(ranks, overlap)])
        print(f"{ranks:>5} {str(overlap) if ranks > 1 else '-':>8} {s['images_per_sec']:>9.1f} {eff:>10.1%} "
              f"{pb['phases']['comm']['share_pct']:>9.1f}% {pb['step_ms']:>9.1f}"
              + "".join(f" {v:>8.1f}" for v in ms) + f"  {every}")


if __name__ == "__main__":
    main()
