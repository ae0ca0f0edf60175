#!/usr/bin/env bash
# The two commands of the README:
#   ./run.sh demo   set up (once) and run a short meta-training demo
#   ./run.sh test   set up (once) and run the test suite
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$root"
bash scripts/bootstrap.sh
py="$root/.venv/bin/python"
case "${1:-}" in
  demo)
    shift
    exec "$py" -m pathology_fix.demo "$@"
    ;;
  test)
    shift
    exec "$py" -m pytest -q -m "not slow" tests "$@"
    ;;
  *)
    echo "usage: ./run.sh demo|test [extra args]" >&2
    exit 2
    ;;
esac
