#!/usr/bin/env bash
# The GPU check, for a machine with one or more NVIDIA GPUs (never needed by CI):
#   1. set-up with a GPU TensorFlow and Horovod built with NCCL (scripts/setup.sh picks the
#      NCCL build, under its own cache key, when nvcc and /dev/nvidia* are present);
#   2. the float64 oracle tests (GradAlign, uneven micro-batches, 1 and 2 workers) on the GPU;
#   3. the step-cost benchmark at global batch 2048 with 16 micro-batches per worker;
#   4. mixed precision: the mixed_float16 / mixed_bfloat16 oracle tests (loss scaling over
#      both passes, an overflow on one worker) and the step throughput of float32,
#      mixed_bfloat16 and mixed_float16 for the data-parallel step and GradAlign.
# Figures land in benchmarks/results/gpu/ (override with OUT=DIR): the pytest summaries,
# nvidia-smi's view of the machine, step_cost.json and precision_throughput.json.
#
#   bash benchmarks/gpu_check.sh
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/benchmarks/results/gpu}"
VENV="${HVD_GRADALIGN_VENV:-$REPO/.venv}"
mkdir -p "$OUT"
if ! command -v nvidia-smi >/dev/null || [ -z "$(ls /dev/nvidia* 2>/dev/null)" ]; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi or /dev/nvidia* missing); nothing to check" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpus.csv"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# A GPU TensorFlow before the set-up, so that Horovod is built against it.
TF_VERSION="$(sed -n 's/^tensorflow==//p' "$REPO/scripts/constraints.txt")"
"$VENV/bin/pip" install -q "tensorflow[and-cuda]==${TF_VERSION}"
bash "$REPO/scripts/setup.sh"
"$VENV/bin/python" - <<'PY' > "$OUT/devices.txt"
import tensorflow as tf
print(tf.config.list_physical_devices("GPU"))
PY
export TF_CPP_MIN_LOG_LEVEL=2
cd "$REPO"
"$VENV/bin/python" -m pytest -q tests/test_oracle.py 2>&1 | tee "$OUT/oracle_tests.txt" | tail -n 3
"$VENV/bin/python" benchmarks/step_cost.py --global-batch 2048 --micro-batches 16 --workers 1 \
  --out "$OUT/step_cost.json"
"$VENV/bin/python" -m pytest -q tests/test_mixed_precision.py 2>&1 | tee "$OUT/mixed_precision_tests.txt" | tail -n 3
"$VENV/bin/python" benchmarks/precision_throughput.py --batch 2048 --micro-batches 16 \
  --out "$OUT/precision_throughput.json"
echo "gpu_check: figures in $OUT"
