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

node_pids() {  # "PID CMDLINE" of this user's processes of the nodes started with --temp-dir=$dir: those naming the
  # folder, those naming one of its nodes (the head's Ray Client server), and the `ray start --block` above them
  local pid cmd parent ids
  ids="$(ls "$dir"/session_*/ 2> /dev/null | sed -n 's/^dashboard_agent_listen_port_//p' | sort -u)"
  for pid in $(pgrep -u "$(id -u)" -f -- "$dir|--node-id=" || true); do
    cmd="$({ tr '\0' ' ' < "/proc/$pid/cmdline"; } 2> /dev/null)" || continue
    case "$cmd" in *ray_stop.sh*) continue ;; esac
    case "$cmd" in
      *"$dir/session_"* | *"--temp-dir=$dir "*) ;;
      *--node-id=*) grep -qxF -- "$(sed -n 's/.*--node-id=\([0-9a-f]*\).*/\1/p' <<< "$cmd")" <<< "$ids" || continue ;;
      *) continue ;;
    esac
    echo "$pid $cmd"
    parent="$(awk '{print $4}' "/proc/$pid/stat" 2> /dev/null)" || continue
    cmd="$({ tr '\0' ' ' < "/proc/$parent/cmdline"; } 2> /dev/null)" || continue
    case "$cmd" in *"/ray start "*) echo "$parent $cmd" ;; esac
  done | sort -u -k1,1n
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
