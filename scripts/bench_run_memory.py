"""Peak resident memory of a whole training run: ``python -m dtrain`` against a PyTorch twin doing the same work.

    python scripts/bench_run_memory.py                       # the main job's settings, 30 steps
    python scripts/bench_run_memory.py --model lenet --steps 100 --eval-batch 2000

dtrain runs as a user runs it (``python -m dtrain``, the configured model with its
optimizer, TensorBoard, the final checkpoint), on the built-in MNIST sample (4,000 training
and 1,000 test digits): ``--steps`` training steps at ``--batch`` images, then one evaluation
of the test split at ``--eval-batch`` images per batch. The twin, a separate process, does
the same in PyTorch: the same network and initial weights (``dtrain.export``), the same
optimizer and hyperparameters, the same normalized batches, evaluation under
``torch.no_grad()`` at the same eval batch, and ``torch.save`` of the model and optimizer
state at the end. Both use ``--threads`` threads. Each process's peak resident set size
is the kernel's ``ru_maxrss`` for that child, read when it exits: everything it ever held
at once, the libraries it imported included.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="alexnet", help="a conf/model/*.yaml name")
    ap.add_argument("--batch", type=int, default=64, help="training batch (the main job's default)")
    ap.add_argument("--eval-batch", type=int, default=500, help="evaluation batch (the main job's default)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--twin", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.twin:
        torch_twin(args)
        return
    print(f"model {args.model}, batch {args.batch}, eval batch {args.eval_batch}, {args.steps} steps, "
          f"{args.threads} threads, data mnist_sample")
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"model={args.model}", "data=mnist_sample", f"trainer.batch_size={args.batch}",
                     f"trainer.eval_batch_size={args.eval_batch}", f"trainer.max_steps={args.steps}", "device=cpu",
                     f"threads={args.threads}", "trainer.progress=false", f"hydra.run.dir={tmp}/run"]
        peaks = {"dtrain": peak_rss([sys.executable, "-m", "dtrain", *overrides]),
                 "torch": peak_rss([sys.executable, __file__, *sys.argv[1:], "--twin"], cwd=tmp)}
    for name, peak in peaks.items():
        print(f"{name:<8}peak resident {peak / 2**20:>8.0f} MiB")
    print(f"peak resident memory dtrain / torch: {peaks['dtrain'] / peaks['torch']:.2f}")


def peak_rss(cmd: list[str], cwd: str | Path = ROOT) -> int:
    """Run ``cmd`` to completion; the child's peak resident set size in bytes."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{proc.stderr.read()}")
    return usage.ru_maxrss * 1024  # KiB on Linux


def torch_twin(args: argparse.Namespace) -> None:
    """The dtrain run's work in PyTorch, in this process."""
    import numpy as np
    import torch
    from hydra import compose, initialize_config_dir

    from dtrain.config import config_dir, validate
    from dtrain.data import load_dataset
    from dtrain.data.loader import normalize
    from dtrain.export import to_torch_sequential
    from dtrain.models import build_model

    torch.set_num_threads(args.threads)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = validate(compose(config_name="config", overrides=[f"model={args.model}"]))
    model = to_torch_sequential(build_model(cfg.model.model_dump(), seed=cfg.seed)).train()
    train_set = load_dataset("mnist_sample", "train", root=str(ROOT / "data"), download=False)
    test_set = load_dataset("mnist_sample", "test", root=str(ROOT / "data"), download=False)
    optimizer = torch_optimizer(cfg.optim, model.parameters(), torch)
    loss_fn = torch.nn.CrossEntropyLoss()
    order = np.random.default_rng(0).permutation(len(train_set))
    for step in range(args.steps):
        ids = order[(step * args.batch) % (len(order) - args.batch):][: args.batch]
        x = torch.from_numpy(normalize(train_set, train_set.images[ids], np.float32))
        y = torch.from_numpy(train_set.labels[ids])
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        for start in range(0, len(test_set), args.eval_batch):
            images = test_set.images[start:start + args.eval_batch]
            model(torch.from_numpy(normalize(test_set, images, np.float32))).argmax(dim=1)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, "twin.pt")


def torch_optimizer(o, parameters, torch):
    """PyTorch's optimizer for dtrain's ``optim`` config section (its state is what counts here)."""
    if o.name == "sgd":
        return torch.optim.SGD(parameters, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, dampening=o.dampening,
                               weight_decay=o.weight_decay)
    if o.name in ("adam", "adamw"):
        adam = torch.optim.AdamW if o.decoupled or o.name == "adamw" else torch.optim.Adam
        return adam(parameters, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    return torch.optim.RMSprop(parameters, lr=o.lr, alpha=o.alpha, eps=o.eps, momentum=o.momentum,
                               centered=o.centered, weight_decay=o.weight_decay)


if __name__ == "__main__":
    main()
