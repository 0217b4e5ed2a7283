#!/usr/bin/env bash
# Stop the Ray node that ray_head.sh or ray_worker.sh started on this machine:
#   cluster/ray_stop.sh                  # every Ray process of this user here (`ray stop`)
#   cluster/ray_stop.sh --temp-dir=DIR   # only the node started with --temp-dir=DIR (several Ray nodes or
#                                        # clusters on one machine, e.g. two jobs sharing a node)
# As `ray stop` does: the raylet first, then its helpers, the GCS last; each SIGTERM, then SIGKILL after GRACE
# seconds (10).
set -euo pipefail
case "${1:-}" in
  "") exec ray stop ;;
  --temp-dir=?*) dir="${1#--temp-dir=}"; dir="${dir%/}" ;;
  *) echo "usage: cluster/ray_stop.sh [--temp-dir=DIR]" >&2; exit 2 ;;
esac
GRACE="${GRACE:-10}"

node_pids() {  # this user's processes of the node started with --temp-dir=$dir, launch scripts included
  local pid cmd
  for pid in $(pgrep -u "$(id -u)" -f -- "$dir" || true); do
    cmd="$({ tr '\0' ' ' < "/proc/$pid/cmdline"; } 2> /dev/null)" || continue
    case "$cmd" in *ray_stop.sh*) continue ;; esac
    case "$cmd" in *"$dir/session_"* | *"--temp-dir=$dir "*) echo "$pid $cmd" ;; esac
  done
}

alive() {  # whether any of the pids is running (a zombie has exited: it only waits to be reaped)
  local pid state
  for pid in "$@"; do
    state="$(ps -o stat= -p "$pid" 2> /dev/null)" && [[ "$state" != Z* ]] && return 0
  done
  return 1
}

stop() {  # SIGTERM the pids, SIGKILL those alive after GRACE seconds
  [ $# -gt 0 ] || return 0
  kill -TERM "$@" 2> /dev/null || true
  for _ in $(seq $((GRACE * 5))); do
    alive "$@" || return 0
    sleep 0.2
  done
  kill -KILL "$@" 2> /dev/null || true
  for _ in $(seq 25); do
    alive "$@" || return 0
    sleep 0.2
  done
}

procs="$(node_pids)"
if [ -z "$procs" ]; then
  echo "no Ray processes started with --temp-dir=$dir"
  exit 0
fi
stop $(awk '/\/raylet\/raylet / {print $1}' <<< "$procs")
stop $(awk '!/\/raylet\/raylet / && !/\/gcs\/gcs_server / {print $1}' <<< "$procs")
stop $(awk '/\/gcs\/gcs_server / {print $1}' <<< "$procs")
left="$(node_pids)"
if [ -n "$left" ]; then
  echo "error: Ray processes of $dir still running: $(awk '{print $1}' <<< "$left" | xargs)" >&2
  exit 1
fi
echo "stopped the Ray node of $dir ($(wc -l <<< "$procs") processes)"
