#!/bin/bash
# Every GPU figure in one command (about 10 minutes of device time), from the project root:
#
#   bash bench/gpu.sh                      # on a GPU machine: installs .[cuda12] first
#   GPU_BENCH_DRY_RUN=1 bash bench/gpu.sh  # on CPU at tiny sizes (tests/test_bench.py)
#
# Prints: nvidia-smi; the generator forward at 128x128 and 482x512 (float32 and bfloat16);
# the Sinkhorn-GAN step at batch 20, 128x128, bfloat16, per generator remat policy, with XLA's
# memory analysis (temporaries of the programs with and without R1) and the device allocator's
# peak; the quick start's steps/s. GPU_BENCH_SKIP_INSTALL=1 skips the pip install (an
# environment that has jax[cuda12] already); PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if [[ "${GPU_BENCH_DRY_RUN:-0}" == 1 ]]; then
  # The same commands at sizes a 2-core CPU compiles in a few minutes: one tiny
  # generator-only step (a GAN step takes minutes to compile there), the quick start skipped.
  DTYPES=(float32)
  FORWARD=(--config configs/quickstart.py --sizes 16x16 --repeats 1)
  GAN=(--config=configs/quickstart.py:generator --batch_sizes=2 --steps=1
       --config.data.patch_size=16)
  POLICIES=(block)
  QUICK=()
else
  if [[ "${GPU_BENCH_SKIP_INSTALL:-0}" != 1 ]]; then
    "$PY" -m pip install -q -e '.[cuda12]'
  fi
  nvidia-smi
  DTYPES=(float32 bfloat16)
  FORWARD=(--sizes 128x128,482x512 --repeats 5)
  GAN=(--config=configs/gan.py --batch_sizes=20 --steps=3)
  POLICIES=(none attention block)
  QUICK=(--config=configs/quickstart.py --batch_sizes=8 --steps=5)
fi

"$PY" -c 'import jax; print("jax", jax.__version__, "devices", jax.devices())'
echo "== generator forward (batch 1)"
for dtype in "${DTYPES[@]}"; do
  "$PY" bench/forward.py "${FORWARD[@]}" --dtype "$dtype"
done
echo "== Sinkhorn-GAN step, bfloat16, per remat policy (one process each: its own peak)"
for policy in "${POLICIES[@]}"; do
  echo "-- model.remat=$policy"
  "$PY" bench/train_step.py "${GAN[@]}" --config.model.remat="$policy" \
    | grep -E "compiled|ms/step|Error" || echo "-- model.remat=$policy: failed (out of memory?)"
done
echo "== quick start step"
if (( ${#QUICK[@]} )); then
  "$PY" bench/train_step.py "${QUICK[@]}" | grep -E "compiled|ms/step"
fi
