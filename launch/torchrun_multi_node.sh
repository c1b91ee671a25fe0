#!/usr/bin/env bash
# Several machines, c10d rendezvous. Run the same command on every node; the node that hosts
# the rendezvous store is the one named in RDZV_ENDPOINT (any node, reachable by the others).
# Usage (2 nodes x 8 GPUs):
#   node A: NNODES=2 NPROC=8 RDZV_ENDPOINT=nodeA:29400 launch/torchrun_multi_node.sh --optimizer c-came
#   node B: NNODES=2 NPROC=8 RDZV_ENDPOINT=nodeA:29400 launch/torchrun_multi_node.sh --optimizer c-came
# Optional: NODE_RANK=0|1... fixes the node order (default: assigned by the rendezvous);
#           RDZV_ID names the job (default: dist-cautious); RDZV_CONF e.g. is_host=true.
set -euo pipefail
: "${NNODES:?set NNODES, the number of nodes}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of the rendezvous node}"
extra=()
[[ -n "${NODE_RANK:-}" ]] && extra+=(--node-rank "$NODE_RANK")
[[ -n "${RDZV_CONF:-}" ]] && extra+=(--rdzv-conf "$RDZV_CONF")
[[ -n "${LOCAL_ADDR:-}" ]] && extra+=(--local-addr "$LOCAL_ADDR")
exec torchrun --nnodes "$NNODES" --nproc-per-node "${NPROC:-1}" \
    --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-dist-cautious}" \
    "${extra[@]}" -m dist_cautious.cli train "$@"
