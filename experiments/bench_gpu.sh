#!/usr/bin/env bash
# Outer-step cost table on one GPU (sized for < 4 minutes on one H100).
#   experiments/bench_gpu.sh [OUT_STEM] [extra bench flags]
#   experiments/bench_gpu.sh --tiny      CPU smoke test of this script (~1 min)
#   experiments/bench_gpu.sh --multi-gpu [extra bench_distributed flags]
#                                        1 GPU vs one process per visible GPU
#                                        (jax.distributed; ~3 minutes)
# Writes OUT_STEM.md and OUT_STEM.json (default experiments/results/bench/gpu);
# --multi-gpu writes experiments/results/bench_distributed/gpu/.
# The bench stops starting new configurations after 200 s (--time-budget)
# and gives each at most 90 s; skipped ones are listed as such.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-$root/.venv/bin/python}"
preset=gpu
if [[ "${1:-}" == "--multi-gpu" ]]; then
  shift
  gpus="$("$py" -c 'import jax; print(sum(d.platform == "gpu" for d in jax.devices()))')"
  if [[ "$gpus" -lt 2 ]]; then
    echo "--multi-gpu needs 2 or more GPUs visible to jax (found $gpus)" >&2
    exit 1
  fi
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  # n = 8..128 samples split over the GPUs; outer-step time vs one GPU.
  exec "$py" -m experiments.bench_distributed --gpus --processes "$gpus" \
      --samples "$((8 * gpus)),$((32 * gpus)),$((128 / gpus * gpus))" \
      --out experiments/results/bench_distributed/gpu "$@"
fi
if [[ "${1:-}" == "--tiny" ]]; then
  preset=tiny
  shift
fi
out="experiments/results/bench/${preset}"
if [[ $# -gt 0 && "$1" != --* ]]; then
  out="$1"
  shift
fi
if [[ "$preset" == gpu ]]; then
  "$py" -c 'import jax, sys; d = jax.devices()[0]; print("device:", d.device_kind)
sys.exit(0 if d.platform == "gpu" else "no GPU visible to jax (use --tiny on CPU)")'
  # Let each child process take GPU memory as it needs it, so peak_bytes_in_use
  # reflects the configuration and not a preallocated pool.
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
fi
exec "$py" -m experiments.bench --preset "$preset" --out "$out" "$@"
