#!/usr/bin/env bash
# The device run of issue #11 on one GPU: bench, bench-whitening and a 10-epoch study per norm,
# tabled in ${OUT:-gpu-results}/results.md (and .json). Extra arguments go to benchmarks/gpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python benchmarks/gpu.py --device cuda --out "${OUT:-gpu-results}" "$@"
