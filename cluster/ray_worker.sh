#!/usr/bin/env bash
# Join a Ray cluster started by cluster/ray_head.sh:  cluster/ray_worker.sh HEAD_IP:6379
set -euo pipefail
HEAD="${1:?usage: cluster/ray_worker.sh HEAD_IP:PORT}"
NUM_CPUS="${NUM_CPUS:-$(nproc)}"
ray start --address="$HEAD" --num-cpus="$NUM_CPUS" ${NUM_GPUS:+--num-gpus="$NUM_GPUS"} --disable-usage-stats
