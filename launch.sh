#!/usr/bin/env bash
# Multi-process launcher for cswin_jax.main.
#
#   ./launch.sh N [main.py flags...]       start N processes on this machine (an equal share of
#                                          its GPUs each, else CPU processes) and wait for all
#   srun ./launch.sh 1 [flags...]          under SLURM: each task runs one process; jax
#                                          auto-detects the cluster (SLURM_* variables)
#   torchrun-style env (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK) is also understood by
#   cswin_jax.main, so `N=1` with those variables set joins an existing job.
#
# Example: ./launch.sh 2 --config=configs/quickstart.py --workdir=/tmp/run
set -euo pipefail
n=${1:?usage: launch.sh NUM_PROCESSES [cswin_jax.main flags...]}
shift
python=${PYTHON:-python}
if [[ "$n" -le 1 ]]; then
  exec "$python" -m cswin_jax.main "$@"
fi
port=${JAX_COORDINATOR_PORT:-$((20000 + RANDOM % 20000))}
gpus=$( (nvidia-smi -L 2>/dev/null || true) | wc -l)
pids=()
for ((i = 0; i < n; i++)); do
  env_vars=(JAX_COORDINATOR_ADDRESS="127.0.0.1:${port}" JAX_NUM_PROCESSES="$n" JAX_PROCESS_ID="$i")
  if [[ "$gpus" -ge "$n" ]]; then
    # An equal share of this machine's GPUs per process (8 GPUs, N=2: 0-3 and 4-7).
    per=$((gpus / n))
    share=$(seq -s, $((i * per)) $(((i + 1) * per - 1)))
    env_vars+=(CUDA_VISIBLE_DEVICES="$share")
  fi
  env "${env_vars[@]}" "$python" -m cswin_jax.main "$@" &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
