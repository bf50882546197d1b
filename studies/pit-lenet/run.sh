#!/usr/bin/env bash
# PIT norm (both outputs) on d2l's LeNet, 3 seeds, tabled beside the bn runs of
# studies/whitening-lenet (same settings).
cd "$(dirname "$0")/../.."
EXTRA_RUNS="$(ls -d runs/whitening-lenet/bn-s* 2>/dev/null | tr '\n' ' ')" \
  exec studies/run_seeds.sh pit-lenet "pit --norm-opt output=normal" "pit --norm-opt output=uniform"
