#!/usr/bin/env bash
# Outer-step cost table on one GPU (sized for < 4 minutes on one H100).
#   experiments/bench_gpu.sh [OUT_STEM] [extra bench flags]
#   experiments/bench_gpu.sh --tiny      CPU smoke test of this script (~1 min)
# Writes OUT_STEM.md and OUT_STEM.json (default experiments/results/bench/gpu).
# The bench stops starting new configurations after 200 s (--time-budget)
# and gives each at most 90 s; skipped ones are listed as such.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-$root/.venv/bin/python}"
preset=gpu
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
