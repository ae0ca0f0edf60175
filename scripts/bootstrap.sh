#!/usr/bin/env bash
# Idempotent set-up of a virtualenv with our dependencies and one
# learned_optimization (LO), installed --no-deps (its pins do not install on
# current Python), plus the offline Fashion-MNIST Debian package.
#
#   scripts/bootstrap.sh          .venv          LO 0.0.1 from PyPI (the default)
#   scripts/bootstrap.sh main     .venv-lo-main  LO GitHub main (tested commit below)
#
# The variant can also come from PATHOLOGY_FIX_LO (0.0.1 or main). For main,
# LO_MAIN_WHEEL names a wheel to install; otherwise a wheel in shared/lo_main/
# inside the checkout, else the LO main already in .venv-lo-main (kept as it
# is), else the pinned commit from GitHub. Machines without GitHub access set
# LO_MAIN_WHEEL.
# Both venvs get pathology_fix_startup.pth, so that LO's own binaries import
# the plugin first (see pathology_fix_startup.py).
# Our dependencies come at the tested versions of constraints.txt.
# Re-running is cheap: installs happen only when setup.py, pyproject.toml, constraints.txt,
# this file or the LO wheel change.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
LO_MAIN_COMMIT=32186aa46a96f26ba0625755f93c55659adcd523

variant="${1:-${PATHOLOGY_FIX_LO:-0.0.1}}"
case "$variant" in
  0.0.1|pypi)
    venv="$root/.venv"
    lo_spec="learned-optimization==0.0.1"
    ;;
  main)
    venv="$root/.venv-lo-main"
    lo_spec="${LO_MAIN_WHEEL:-}"
    if [ -z "$lo_spec" ]; then
      for candidate in "$root"/shared/lo_main/*.whl; do
        if [ -f "$candidate" ]; then lo_spec="$candidate"; break; fi
      done
    fi
    # Only main has truncated_step.py: an installed main is kept.
    if [ -z "$lo_spec" ] && compgen -G "$venv/lib/python*/site-packages/learned_optimization/outer_trainers/truncated_step.py" >/dev/null; then
      lo_spec=installed
    fi
    lo_spec="${lo_spec:-git+https://github.com/google/learned_optimization@$LO_MAIN_COMMIT}"
    ;;
  *)
    echo "[bootstrap] unknown learned_optimization variant '$variant' (0.0.1 or main)" >&2
    exit 2
    ;;
esac
stamp="$venv/.pathology_fix_installed"
lo_hash="$lo_spec"
[ -f "$lo_spec" ] && lo_hash="$(sha256sum "$lo_spec" | cut -c1-16)"
want="$( (cat setup.py pyproject.toml constraints.txt scripts/bootstrap.sh; echo "$lo_hash") | sha256sum | cut -c1-16)"

if [ ! -x "$venv/bin/python" ]; then
  echo "[bootstrap] creating virtualenv in $venv"
  "$python" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[bootstrap] installing dependencies and learned_optimization $variant (once; about a minute)"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -c constraints.txt -e ".[test]"
  if [ "$lo_spec" != installed ]; then
    "$venv/bin/python" -m pip install -q --no-deps --force-reinstall "$lo_spec"
  fi
  "$venv/bin/python" -m pathology_fix_startup
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
