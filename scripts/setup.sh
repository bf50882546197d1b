#!/usr/bin/env bash
# Set-up for a fresh machine, idempotent (a second run takes a second):
#  1. .venv with the known-good pins of scripts/constraints.txt and exoticnorm (editable);
#  2. FashionMNIST from the Debian package dataset-fashion-mnist where apt-get can install it.
set -euo pipefail
cd "$(dirname "$0")/.."

quiet_pip() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

stamp=.venv/.exoticnorm-setup
want=$(cat pyproject.toml scripts/constraints.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  py=$(command -v python3.11 || command -v python3)
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  echo "setup: installing torch and exoticnorm into .venv (a few minutes the first time)"
  quiet_pip .venv/bin/python -m pip install -q --disable-pip-version-check \
    -c scripts/constraints.txt torch torchvision
  quiet_pip .venv/bin/python -m pip install -q --disable-pip-version-check \
    -c scripts/constraints.txt -e '.[test,bench,report,ray,slurm,paper]'
  echo "setup: building the PIT and whitening CPU kernels (C++, about a minute; the norms fall back to torch ops without them)"
  .venv/bin/python -c "from exoticnorm.kernels import pit_cpu, whiten_cpu; pit_cpu(); whiten_cpu()" || true
  echo "$want" > "$stamp"
fi

have_data() {  # the layouts exoticnorm/data.py accepts
  for d in "${EXOTICNORM_DATA:-}" "${XDG_CACHE_HOME:-$HOME/.cache}/exoticnorm" /usr/share/datasets/fashion-mnist; do
    [ -n "$d" ] || continue
    for sub in "" /FashionMNIST/raw /raw; do
      for ext in "" .gz; do
        [ -e "$d$sub/train-images-idx3-ubyte$ext" ] && return 0
      done
    done
  done
  return 1
}
if ! have_data; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: installing FashionMNIST (Debian package dataset-fashion-mnist)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } >/dev/null ||
      echo "setup: apt-get could not install dataset-fashion-mnist; exoticnorm will try torchvision's download"
  else
    echo "setup: FashionMNIST not found and apt-get unavailable; exoticnorm will try torchvision's download"
  fi
fi
