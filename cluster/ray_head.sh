#!/usr/bin/env bash
# Start the head of a Ray cluster for the data pipeline, then build on it:
#   cluster/ray_head.sh                       # on the head node
#   cluster/ray_worker.sh HEAD_IP:6379        # on every other node
#   python data_pipeline/build.py laion-cartoon --address HEAD_IP:6379 --out /shared/data/laion-cartoon
# The output folder must be on a filesystem every node sees (NFS, Lustre...): img2dataset's Ray workers
# write download shards there, encode actors and shard writers read them.
# Authentication: a token shared by every node and driver (cluster/ray_token.sh makes ~/.ray/auth_token when
# missing); RAY_AUTH_MODE=disabled starts a head without one (anyone who reaches its port can run code on it).
# Workers and build.py ask the head which it is and follow it.
# Environment: RAY_PORT (6379), NUM_CPUS (all), NUM_GPUS, RAY_AUTH_MODE (token), HEAD_OPTIONS (more `ray start`
# options, e.g. "--dashboard-port=8266 --ray-client-server-port=10002" where another head runs on the machine).
# Further arguments go to `ray start` too (e.g. --block to stay in the foreground, as under SLURM or a process
# supervisor; --temp-dir=DIR, then stopped by cluster/ray_stop.sh --temp-dir=DIR).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
case "$RAY_AUTH_MODE" in
  token) token="$("$HERE/ray_token.sh")" ;;
  disabled) token="" ;;
  *) echo "error: RAY_AUTH_MODE=$RAY_AUTH_MODE: expected token (the default) or disabled" >&2; exit 2 ;;
esac
PORT="${RAY_PORT:-6379}"
NUM_CPUS="${NUM_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"  # nproc alone follows OMP_NUM_THREADS
stop="cluster/ray_stop.sh"
read -ra options <<< "${HEAD_OPTIONS:-}"
for arg in "${options[@]}" "$@"; do
  case "$arg" in --temp-dir=*) stop="cluster/ray_stop.sh $arg" ;; esac
done
address="$(hostname -I | awk '{print $1}'):$PORT"
echo "Ray head at $address, authentication: ${token:+token in }${token:-disabled}"
echo "  join workers:  cluster/ray_worker.sh $address"
echo "  build:         python data_pipeline/build.py <recipe> --address $address --out /shared/data/<recipe>"
echo "  stop:          $stop"
ray start --head --port="$PORT" --num-cpus="$NUM_CPUS" ${NUM_GPUS:+--num-gpus="$NUM_GPUS"} \
  --include-dashboard=false --disable-usage-stats "${options[@]}" "$@"
