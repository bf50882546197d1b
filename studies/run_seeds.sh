#!/usr/bin/env bash
# Usage: studies/run_seeds.sh STUDY "NORM [--norm-opt k=v]" ... — each norm spec on d2l's LeNet
# (FashionMNIST, d2l defaults: SGD, lr 0.1, batch 128, 10 epochs) with seeds ${SEEDS:-0 1 2}.
# EXTRA_RUNS adds run folders to the table (e.g. a bn baseline from another study).
# Runs land in runs/STUDY/ (not committed; finished ones are skipped, killed ones resumed);
# studies/STUDY/results.md is the `exoticnorm summarize` table of their summaries.
set -euo pipefail
cd "$(dirname "$0")/.."
study=$1; shift
specs=("$@")
out=runs/$study
for seed in ${SEEDS:-0 1 2}; do
  for spec in "${specs[@]}"; do
    read -r -a words <<< "$spec"  # NORM [--norm-opt k=v]
    tag=${words[0]}
    if [ ${#words[@]} -gt 2 ]; then tag="$tag-${words[2]#*=}"; fi  # e.g. block-zca-16
    dir="$out/$tag-s$seed"
    [ -f "$dir/summary.json" ] && continue
    [ -f "$dir/checkpoint.pt" ] && resume=--resume || resume=
    .venv/bin/exoticnorm study --norm "${words[@]}" --seed "$seed" --out "$dir" \
      --wandb "${WANDB_MODE:-offline}" --group "$study" $resume
  done
done
.venv/bin/exoticnorm summarize "$out"/* ${EXTRA_RUNS:-} > "studies/$study/results.md"
