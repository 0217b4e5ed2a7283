#!/usr/bin/env bash
# Start the head of a Ray cluster for the data pipeline, then build on it:
#   cluster/ray_head.sh                       # on the head node
#   cluster/ray_worker.sh HEAD_IP:6379        # on every other node
#   python data_pipeline/build.py laion-cartoon --address HEAD_IP:6379 --out /shared/data/laion-cartoon
# The output folder must be on a filesystem every node sees (NFS, Lustre...): img2dataset's Ray workers
# write download shards there, encode actors and shard writers read them.
# Environment: RAY_PORT (6379), NUM_CPUS (all), NUM_GPUS. Further arguments go to `ray start`
# (e.g. --block to stay in the foreground, as under SLURM or a process supervisor).
set -euo pipefail
# Ray >= 2.5x: nodes and drivers of a cluster authenticate with one token (~/.ray/auth_token, or RAY_AUTH_TOKEN /
# RAY_AUTH_TOKEN_PATH): copy the same token to every node; `ray get-auth-token --generate` makes one.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
PORT="${RAY_PORT:-6379}"
NUM_CPUS="${NUM_CPUS:-$(nproc)}"
ray start --head --port="$PORT" --num-cpus="$NUM_CPUS" ${NUM_GPUS:+--num-gpus="$NUM_GPUS"} \
  --include-dashboard=false --disable-usage-stats "$@"
echo "Ray head up. Join workers with:  cluster/ray_worker.sh $(hostname -I | awk '{print $1}'):$PORT"
echo "Build with:                      python data_pipeline/build.py <recipe> --address auto   (on the head)"
