#!/usr/bin/env bash
# Join a Ray cluster started by cluster/ray_head.sh:  cluster/ray_worker.sh HEAD_IP:6379
# Environment: NUM_CPUS (all), NUM_GPUS. Further arguments go to `ray start` (e.g. --block).
set -euo pipefail
# Ray >= 2.5x: nodes and drivers of a cluster authenticate with one token (~/.ray/auth_token, or RAY_AUTH_TOKEN /
# RAY_AUTH_TOKEN_PATH): copy the same token to every node; `ray get-auth-token --generate` makes one.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
HEAD="${1:?usage: cluster/ray_worker.sh HEAD_IP:PORT [ray start options]}"
shift
NUM_CPUS="${NUM_CPUS:-$(nproc)}"
ray start --address="$HEAD" --num-cpus="$NUM_CPUS" ${NUM_GPUS:+--num-gpus="$NUM_GPUS"} --disable-usage-stats "$@"
