#!/usr/bin/env bash
# The GPU check: what has to run and be measured on a real GPU, as one command and one report.
#
#   bash scripts/gpu_check.sh              # on a machine with one NVIDIA GPU; at most ~8 minutes
#   GPU_CHECK_QUICK=1 bash scripts/gpu_check.sh   # tiny sizes (tests run it on the CPU stand-in)
#
# Steps, each one line PASS/FAIL/SKIP in the report, its output below it:
#   1. environment: GPU, CuPy, NCCL, PyTorch
#   2. the GPU-marked tests (pytest -m gpu)
#   3. AlexNet training step at batch 512, dtrain against PyTorch, TF32 off in both, then on in both
#   4. precision.compute=float16 training (AlexNet)
#   5. a 1-rank NCCL run with logging.timeline=true (phase breakdown from summary.json)
#   6. row partitioning with the one GPU listed twice
# The report goes to stdout and to $GPU_CHECK_REPORT (default: $OUT/gpu_check.txt when the
# device tool sets OUT, else gpu_check.txt). Python packages the GPU machine lacks can be
# carried as wheels: see README's "The GPU path".
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
REPORT="${GPU_CHECK_REPORT:-${OUT:-.}/gpu_check.txt}"
export PYTHONUNBUFFERED=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
if ls .whl/*.whl > /dev/null 2>&1; then  # carried wheels (scripts/gpu_wheels.sh)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/dtrain-site .whl/*.whl
    export PYTHONPATH="/tmp/dtrain-site${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/dtrain-site/bin:$PATH"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${GPU_CHECK_QUICK:-0}" = 1 ]; then
    MODEL=lenet BATCH=8 STEPS=2 ROUNDS=1 TRAIN_SIZE=64
else
    MODEL=alexnet BATCH=512 STEPS=20 ROUNDS=3 TRAIN_SIZE=10240
fi
WORK="$(mktemp -d)"
export PY MODEL BATCH STEPS ROUNDS TRAIN_SIZE WORK
: > "$REPORT"
say() { echo "$*" | tee -a "$REPORT"; }
# step NAME SECONDS COMMAND...: run it with a time limit; exit status 77 means skipped.
step() {
    local name="$1" limit="$2"; shift 2
    local log="$WORK/$(echo "$name" | tr -c 'a-zA-Z0-9\n' '_').log" start=$SECONDS status
    timeout "$limit" bash -c '"$@"' step "$@" > "$log" 2>&1  # bash -c: a step may be a function below
    status=$?
    case $status in
        0) say "PASS  $name ($((SECONDS - start)) s)";;
        77) say "SKIP  $name: $(tail -1 "$log")";;
        124) say "FAIL  $name: over its ${limit} s";;
        *) say "FAIL  $name (exit $status)";;
    esac
    sed 's/^/      /' "$log" | tail -40 | tee -a "$REPORT" > /dev/null
}
dtrain_run() {  # dtrain_run DIR OVERRIDES...: a short training run on synthetic data, prints its summary line
    local dir="$WORK/$1"; shift
    "$PY" -m dtrain model="$MODEL" data=synthetic data.train_size="$TRAIN_SIZE" data.test_size=64 \
        trainer.batch_size="$BATCH" trainer.max_steps="$STEPS" trainer.progress=false device=gpu \
        logging.tensorboard=false hydra.run.dir="$dir" "$@" &&
    "$PY" - "$dir/summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
p = s["phase_breakdown"]["phases"]
print(f"{s['images_per_sec']:.1f} img/s, {s['achieved_gflops_per_sec']:.0f} GFLOP/s, precision {s['precision']},"
      f" peak device pool {s['peak_device_bytes'] / 2**20:.0f} MiB; ms/step " +
      ", ".join(f"{k} {v['ms_per_step']:.1f}" for k, v in p.items()))
EOF
}

export -f dtrain_run
say "dtrain GPU check, $(date -u +%Y-%m-%dT%H:%MZ), git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
step "environment" 120 "$PY" - <<'EOF'
import platform, cupy
from cupy.cuda import nccl
print("python", platform.python_version(), "| cupy", cupy.__version__, "| GPUs", cupy.cuda.runtime.getDeviceCount(),
      "| NCCL", nccl.available)
try:
    import torch
    print("torch", torch.__version__, "| CUDA", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except ImportError:
    print("torch not installed")
EOF
step "GPU-marked tests" 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests
torch_cuda() { "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 77)" 2>/dev/null; }
bench() {  # bench [--tf32]: dtrain against PyTorch on the same model, batch and precision
    if ! torch_cuda; then echo "PyTorch sees no CUDA device here"; return 77; fi
    "$PY" scripts/bench.py --device gpu --model "$MODEL" --batch "$BATCH" --rounds "$ROUNDS" --steps "$STEPS" "$@"
}
export -f torch_cuda bench
step "$MODEL batch $BATCH vs PyTorch, TF32 off in both" 180 bench
step "$MODEL batch $BATCH vs PyTorch, TF32 on in both" 180 bench --tf32
step "precision.compute=float16 ($MODEL)" 120 dtrain_run fp16 precision.compute=float16
step "1-rank NCCL with the timeline" 120 dtrain_run nccl parallel.backend=nccl logging.timeline=true
step "row partitioning, one GPU listed twice" 120 dtrain_run rows "parallel.row_partition.devices=[0,0]"
say "report: $REPORT"
rm -rf "$WORK"
