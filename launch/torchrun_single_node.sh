#!/usr/bin/env bash
# One machine, N local ranks (GPUs with NCCL when present, else CPU ranks on gloo).
# Usage: NPROC=4 launch/torchrun_single_node.sh [dist-cautious train arguments...]
#   e.g. NPROC=2 launch/torchrun_single_node.sh --optimizer came --backend fsdp2 --steps 300
set -euo pipefail
exec torchrun --standalone --nnodes 1 --nproc-per-node "${NPROC:-2}" \
    -m dist_cautious.cli train "$@"
