#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv with our dependencies,
# learned-optimization 0.0.1 installed --no-deps (its pins do not install on
# current Python), and the offline Fashion-MNIST Debian package.
# Re-running is cheap: installs happen only when setup.py or this file change.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
venv="$root/.venv"
stamp="$venv/.pathology_fix_installed"
want="$(cat setup.py scripts/bootstrap.sh | sha256sum | cut -c1-16)"

if [ ! -x "$venv/bin/python" ]; then
  echo "[bootstrap] creating virtualenv in $venv"
  "$python" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[bootstrap] installing dependencies (once; about a minute)"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e ".[test]"
  "$venv/bin/python" -m pip install -q --no-deps "learned-optimization==0.0.1"
  echo "$want" > "$stamp"
fi

fmnist=/usr/share/datasets/fashion-mnist
if [ -z "${PATHOLOGY_FIX_FASHION_MNIST_DIR:-}" ] && [ ! -e "$fmnist/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[bootstrap] installing Debian package dataset-fashion-mnist"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
      || echo "[bootstrap] warning: could not install dataset-fashion-mnist; Fashion-MNIST tasks will be unavailable" >&2
  else
    echo "[bootstrap] warning: Fashion-MNIST not found at $fmnist; run 'sudo apt-get install dataset-fashion-mnist' or set PATHOLOGY_FIX_FASHION_MNIST_DIR" >&2
  fi
fi
