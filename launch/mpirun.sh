#!/usr/bin/env bash
# mpirun: MPI starts the ranks; `dist-cautious train` reads rank / size / local rank through
# mpi4py, rank 0 broadcasts its address and a free port, and torch.distributed (gloo on CPU,
# NCCL on GPUs) rendezvouses over TCP. MPI itself carries no training traffic.
# Usage: NP=4 [HOSTFILE=hosts] launch/mpirun.sh [dist-cautious train arguments...]
#   e.g. NP=2 launch/mpirun.sh --optimizer c-came --steps 100
# As root (containers) Open MPI also needs --allow-run-as-root: set MPI_ARGS="--allow-run-as-root".
set -euo pipefail
args=(-n "${NP:-2}")
[[ -n "${HOSTFILE:-}" ]] && args+=(--hostfile "$HOSTFILE")
# shellcheck disable=SC2086
exec mpirun "${args[@]}" ${MPI_ARGS:-} "${PYTHON:-python3}" -m dist_cautious.cli train "$@"
