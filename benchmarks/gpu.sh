#!/usr/bin/env bash
# The device run of issue #11 on one GPU: bench, bench-whitening and a 10-epoch study per norm,
# tabled in ${OUT:-gpu-results}/results.md (and .json). Extra arguments go to benchmarks/gpu.py.
# PYTHON: the interpreter with torch and exoticnorm's needs (default: the project's .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" benchmarks/gpu.py --device cuda --out "${OUT:-gpu-results}" "$@"
