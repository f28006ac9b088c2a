"""The benchmark scripts run end to end on tiny settings and print their tables (no timings are judged)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mpirun_helper import launch

ROOT = Path(__file__).resolve().parent.parent


def run_script(name: str, *args: str, timeout: float = 240) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def table_row(output: str, first: str) -> list[str]:
    rows = [line.split() for line in output.splitlines() if line.split()[:1] == [first]]
    assert rows, f"no row starting with {first!r} in:\n{output}"
    return rows[0]


def test_bench_prints_throughput_and_ratio():
    out = run_script("bench.py", "--model", "lenet,simple_cnn", "--batch", "8", "--steps", "1", "--rounds", "1",
                     "--threads", "1")
    for model in ("lenet", "simple_cnn"):
        dtrain, torch_, ratio, _, _, gemms, torch_gemms = map(float, table_row(out, model)[1:8])
        assert dtrain > 0 and torch_ > 0 and ratio == pytest.approx(dtrain / torch_, abs=0.01)
        assert gemms > 0 and torch_gemms > 0


def test_bench_memory_measures_each_framework_in_its_own_process():
    out = run_script("bench.py", "--model", "lenet", "--batch", "8", "--steps", "1", "--threads", "1", "--memory")
    rows = [line.split() for line in out.splitlines() if line.startswith("lenet ")]
    frameworks = {row[1]: list(map(float, row[2:5])) for row in rows if row[1] in ("dtrain", "torch")}
    assert set(frameworks) == {"dtrain", "torch"}
    for imports, peak, training in frameworks.values():
        assert peak >= imports and training == pytest.approx(peak - imports, abs=1)
    assert "training memory dtrain / torch" in out


def test_bench_memory_refuses_gpu():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--memory", "--device", "gpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--device cpu" in proc.stderr


@pytest.mark.parametrize("phase", ["both", "backward"])
def test_bench_layers_prints_a_ratio_per_layer(phase):
    out = run_script("bench_layers.py", "--batch", "2", "--reps", "1", "--warmup", "0", "--threads", "1",
                     "--layers", "conv2,relu2,pool1,fc7", "--phase", phase)
    assert ("backward alone" in out) == (phase == "backward")
    for layer in ("conv2", "relu2", "pool1", "fc7"):
        assert len(table_row(out, layer)) >= 4


@pytest.mark.parametrize("conv", ["direct", "im2col", "winograd"])
def test_bench_layers_times_a_small_model_under_each_convolution(conv):
    out = run_script("bench_layers.py", "--batch", "2", "--reps", "1", "--warmup", "0", "--threads", "1",
                     "--model", "lenet", "--conv", conv)
    assert f"convolutions: {conv}" in out
    for layer in ("conv1", "pool1", "conv2", "pool2"):
        assert len(table_row(out, layer)) >= 4


def test_bench_optim_times_each_optimizer_against_torch():
    out = run_script("bench_optim.py", "--model", "lenet", "--rounds", "1", "--threads", "1")
    for kind in ("sgd", "adam"):
        assert len(table_row(out, kind)) == 6


def test_bench_run_memory_compares_a_whole_run_with_its_pytorch_twin():
    out = run_script("bench_run_memory.py", "--model", "lenet", "--steps", "3", "--threads", "1")
    peaks = {name: float(table_row(out, name)[3]) for name in ("dtrain", "torch")}
    assert all(peak > 50 for peak in peaks.values())
    ratio = float(out.rsplit("dtrain / torch:", 1)[1])
    assert ratio == pytest.approx(peaks["dtrain"] / peaks["torch"], abs=0.01)


def test_bench_allreduce_reports_bus_bandwidth_on_two_ranks():
    result = launch(["-n", "2", sys.executable, str(ROOT / "scripts" / "bench_allreduce.py"), "--sizes-mib", "1,2",
                     "--reps", "2", "--warmup", "1", "--no-torch"], timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.output
    assert "busbw" in result.stdout
    for size in ("1", "2"):
        time_ms, algbw, busbw = map(float, table_row(result.stdout, size)[1:4])
        assert time_ms > 0 and busbw == pytest.approx(algbw, rel=0.02)  # 2 ranks: busbw = algbw * 2(n-1)/n


def test_bench_deterministic_prints_the_cost_of_determinism():
    out = run_script("bench_deterministic.py", "--model", "lenet", "--batch", "12", "--steps", "2", "--repeats", "1")
    for mode in ("default,", "deterministic,"):
        assert table_row(out, mode)
    ratio = float(out.split("deterministic / default (2 threads):")[1].split()[0])
    assert ratio > 0


def test_bench_scaling_prints_efficiency():
    out = run_script("bench_scaling.py", "--model", "lenet", "--ranks", "2", "--per-rank-batch", "8", "--steps", "2",
                     "--repeats", "1")
    assert "efficiency" in out and len(table_row(out, "2")) >= 9


def load_script(name: str):
    """A script of scripts/ as a module (its main() is not run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), ROOT / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_allreduce_puts_each_rank_on_its_own_gpu(monkeypatch):
    import torch
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend)))
    comm = type("Comm", (), {"rank": 1, "size": 2, "device_id": 1, "bcast_object": lambda self, obj: "tcp://x:1"})()
    load_script("bench_allreduce.py").init_torch(comm, "gpu")
    assert calls == [("set_device", 1), ("init", "nccl")]


def test_bench_compares_full_float32_unless_tf32_is_asked_for_in_both():
    import torch

    bench = load_script("bench.py")
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True  # PyTorch's default
        bench.set_tf32(False, torch)
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_gpu_check_runs_every_step_on_the_cpu_stand_in(tmp_path):
    # The plumbing of scripts/gpu_check.sh on tests/fake_cupy; PyTorch has no CUDA here, so
    # the comparisons against it are skipped, and said so.
    from fake_cupy.run import fake_pythonpath

    report = tmp_path / "report.txt"
    env = {**os.environ, "PYTHONPATH": fake_pythonpath(), "PYTHON": sys.executable, "GPU_CHECK_QUICK": "1",
           "GPU_CHECK_REPORT": str(report)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in report.read_text().splitlines() if line[:4] in ("PASS", "FAIL", "SKIP")]
    assert len(lines) == 7 and not [line for line in lines if line.startswith("FAIL")], report.read_text()
    assert [line.split()[0] for line in lines].count("SKIP") == 2 and "PyTorch sees no CUDA" in lines[2]
