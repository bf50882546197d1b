#!/usr/bin/env bash
# Whitening norms beside bn on d2l's LeNet, 3 seeds (issue: whitening norms).
exec "$(dirname "$0")/../run_seeds.sh" whitening-lenet "bn" "zca" \
  "block-zca --norm-opt group_size=16" "sparse-zca --norm-opt density=0.5"
