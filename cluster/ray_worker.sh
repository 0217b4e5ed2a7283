#!/usr/bin/env bash
# Join a Ray cluster started by cluster/ray_head.sh:  cluster/ray_worker.sh HEAD_IP:6379
# The head is asked first whether it answers and wants a token; the worker joins the same way (with the token
# Ray finds here: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, copied from the head), or stops
# with one line saying what is missing.
# Environment: NUM_CPUS (all), NUM_GPUS, WAIT_FOR_HEAD (seconds to wait for a head still starting, 0).
# Further arguments go to `ray start` (e.g. --block).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
HEAD="${1:?usage: cluster/ray_worker.sh HEAD_IP:PORT [ray start options]}"
shift
mode="$(PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" python -m data_pipeline.ray_cluster "$HEAD" \
        --wait "${WAIT_FOR_HEAD:-0}")" || exit 2
export RAY_AUTH_MODE="$mode"
NUM_CPUS="${NUM_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"  # nproc alone follows OMP_NUM_THREADS
ray start --address="$HEAD" --num-cpus="$NUM_CPUS" ${NUM_GPUS:+--num-gpus="$NUM_GPUS"} --disable-usage-stats "$@"
