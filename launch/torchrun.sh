#!/usr/bin/env bash
# Run a plan under torchrun, one process per GPU of the plan (per node for multi-node plans).
#
#   launch/torchrun.sh PLAN.json [--loads FILE] [--tokens N] [--steps S] [--policy P] ...
#
# Env: NPROC overrides the process count; for a plan over several nodes set NODE_RANK,
# MASTER_ADDR and MASTER_PORT on every node (as torchrun expects). OMP_NUM_THREADS defaults to 1.
# The flags, plan and load files are checked first (`--check`): bad input exits 2 with one line
# before torchrun starts, so no rank runs and torchrun adds no ChildFailedError report.
set -euo pipefail

plan=${1:?usage: launch/torchrun.sh PLAN.json [rnq-ep run options...]}
shift
python -m rnq_ep.runtime.torchrun --check --plan "$plan" "$@" || exit $?
read -r nodes per_node < <(python -c '
import sys
from rnq_ep.specs import load_plan
cluster = load_plan(sys.argv[1]).cluster
print(cluster.nodes, cluster.gpus_per_node)
' "$plan")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ "$nodes" -eq 1 ]; then
    rendezvous=(--standalone)
else
    rendezvous=(--nnodes="$nodes" --node-rank="${NODE_RANK:?set NODE_RANK for a $nodes-node plan}"
        --master-addr="${MASTER_ADDR:?set MASTER_ADDR}" --master-port="${MASTER_PORT:-29500}")
fi
exec torchrun "${rendezvous[@]}" --nproc-per-node="${NPROC:-$per_node}" \
    -m rnq_ep.runtime.torchrun --plan "$plan" "$@"
