#!/usr/bin/env bash
# Join a Ray cluster started by cluster/ray_head.sh:  cluster/ray_worker.sh HEAD_IP:6379
# Environment: NUM_CPUS (all), NUM_GPUS. Further arguments go to `ray start` (e.g. --block).
set -euo pipefail
HEAD="${1:?usage: cluster/ray_worker.sh HEAD_IP:PORT [ray start options]}"
shift
NUM_CPUS="${NUM_CPUS:-$(nproc)}"
ray start --address="$HEAD" --num-cpus="$NUM_CPUS" ${NUM_GPUS:+--num-gpus="$NUM_GPUS"} --disable-usage-stats "$@"
