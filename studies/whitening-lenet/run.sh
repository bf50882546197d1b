#!/usr/bin/env bash
# Whitening norms on d2l's LeNet (FashionMNIST, d2l defaults: SGD, lr 0.1, batch 128, 10 epochs),
# 3 seeds each, beside bn. Runs land in runs/whitening-lenet/ (not committed); the table
# studies/whitening-lenet/results.md is made from their summaries by `exoticnorm summarize`.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=runs/whitening-lenet
for seed in 0 1 2; do
  for spec in "bn" "zca" "block-zca --norm-opt group_size=16" "sparse-zca --norm-opt density=0.5"; do
    set -- $spec
    name=$1; shift
    tag=$name
    if [ $# -gt 0 ]; then tag="$name-${2#*=}"; fi  # e.g. block-zca-16
    dir="$out/$tag-s$seed"
    [ -f "$dir/summary.json" ] && continue
    [ -d "$dir" ] && resume=--resume || resume=
    .venv/bin/exoticnorm study --norm "$name" "$@" --seed "$seed" --out "$dir" --wandb "${WANDB_MODE:-offline}" $resume
  done
done
.venv/bin/exoticnorm summarize "$out"/* > studies/whitening-lenet/results.md
