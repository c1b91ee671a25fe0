#!/usr/bin/env bash
# Several machines, c10d rendezvous. Run the same command on every node; the node that hosts
# the rendezvous store is the one named in RDZV_ENDPOINT (any node, reachable by the others).
# Usage (2 nodes x 8 GPUs):
#   node A: NNODES=2 NPROC=8 RDZV_ENDPOINT=nodeA:29400 launch/torchrun_multi_node.sh --optimizer c-came
#   node B: NNODES=2 NPROC=8 RDZV_ENDPOINT=nodeA:29400 launch/torchrun_multi_node.sh --optimizer c-came
# Optional: NODE_RANK=0|1... fixes the node order (default: assigned by the rendezvous);
#           RDZV_ID names the job (default: dist-cautious); RDZV_CONF e.g. is_host=true;
#           MAX_RESTARTS=N restarts the job when a rank dies (with --checkpoint-dir it resumes).
set -euo pipefail
: "${NNODES:?set NNODES, the number of nodes}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of the rendezvous node}"
# Unless set: is this host the rendezvous endpoint (by its interfaces' addresses, not by its
# hostname, which often resolves to loopback), and which address do the other hosts reach it at.
# The ranks then pick the interface routing to the master themselves (GLOO_SOCKET_IFNAME).
if [[ -z "${RDZV_CONF:-}" || -z "${LOCAL_ADDR:-}" ]]; then
    eval "$("${PYTHON:-python3}" -m dist_cautious.netif "${RDZV_ENDPOINT%:*}")"
    RDZV_CONF="${RDZV_CONF:-${NETIF_IS_HOST:+is_host=${NETIF_IS_HOST}}}"
    LOCAL_ADDR="${LOCAL_ADDR:-${NETIF_LOCAL_ADDR:-}}"
fi
extra=()
[[ -n "${NODE_RANK:-}" ]] && extra+=(--node-rank "$NODE_RANK")
[[ -n "${RDZV_CONF:-}" ]] && extra+=(--rdzv-conf "$RDZV_CONF")
[[ -n "${LOCAL_ADDR:-}" ]] && extra+=(--local-addr "$LOCAL_ADDR")
if [[ -n "${MAX_RESTARTS:-}" ]]; then
    extra+=(--max-restarts "$MAX_RESTARTS")
    # a restarted job must not read the previous attempt's addresses from a store the agents
    # keep across restarts (the job warns about it across nodes, where attempts may disagree)
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
fi
exec "${PYTHON:-python3}" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "${NPROC:-1}" \
    --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-dist-cautious}" \
    "${extra[@]}" -m dist_cautious.cli train "$@"
