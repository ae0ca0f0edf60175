#!/usr/bin/env bash
# The two commands of the README:
#   ./run.sh demo   set up (once) and run a short meta-training demo
#   ./run.sh test   set up (once) and run the test suite
# With PATHOLOGY_FIX_LO=main both use learned_optimization GitHub main in
# .venv-lo-main (scripts/bootstrap.sh), and `test` runs the `lo_main` subset.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$root"
variant="${PATHOLOGY_FIX_LO:-0.0.1}"
bash scripts/bootstrap.sh "$variant"
if [ "$variant" = main ]; then
  py="$root/.venv-lo-main/bin/python"
  tests=(-m "lo_main and not slow")
else
  py="$root/.venv/bin/python"
  tests=(-m "not slow")
fi
case "${1:-}" in
  demo)
    shift
    exec "$py" -m pathology_fix.demo "$@"
    ;;
  test)
    shift
    exec "$py" -m pytest -q "${tests[@]}" tests "$@"
    ;;
  *)
    echo "usage: [PATHOLOGY_FIX_LO=main] ./run.sh demo|test [extra args]" >&2
    exit 2
    ;;
esac
