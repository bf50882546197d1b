#!/usr/bin/env bash
# The device run of issue #11 on one GPU: the CUDA tests, the c×c map's options, bench per eigh route,
# a 10-epoch study per norm and bench-whitening,
# tabled in ${OUT:-gpu-results}/results.md (and .json). Extra arguments go to benchmarks/gpu.py.
# PYTHON: the interpreter with torch and exoticnorm's needs (default: the project's .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" benchmarks/gpu.py --device cuda --out "${OUT:-gpu-results}" "$@"
