#!/usr/bin/env bash
# The DeepSpeed launcher (pdsh/ssh to every host of the hostfile; `slots` = GPUs per host).
# Usage: HOSTFILE=launch/hostfile launch/deepspeed.sh [dist-cautious train arguments...]
#   e.g. HOSTFILE=launch/hostfile launch/deepspeed.sh --backend deepspeed --optimizer cautious-lion
# Without HOSTFILE it runs on this machine only (NUM_GPUS local ranks, default: all GPUs).
# The launcher sets RANK / WORLD_SIZE / MASTER_ADDR for each rank; `dist-cautious train` joins
# that job with any backend (--backend deepspeed needs the DeepSpeed integration, see report).
set -euo pipefail
args=()
if [[ -n "${HOSTFILE:-}" ]]; then
    args+=(--hostfile "$HOSTFILE")
else
    args+=(--num_gpus "${NUM_GPUS:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}")
fi
exec deepspeed "${args[@]}" --master_port "${MASTER_PORT:-29500}" --no_local_rank \
    --module dist_cautious.cli train "$@"
