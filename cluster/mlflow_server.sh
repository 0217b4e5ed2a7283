#!/usr/bin/env bash
# Start the MLflow tracking server that every node logs to. Ranks talk to it over HTTP only: runs, params and
# metrics go to its database, and artifacts (sample grids, exports) are uploaded through it to its artifact
# store, so the training nodes need no shared filesystem for tracking.
#
#   cluster/mlflow_server.sh /data/mlflow      # sqlite database and artifacts under /data/mlflow, port 5000
#   MLFLOW_BACKEND=postgresql://mlflow@dbhost/mlflow MLFLOW_ARTIFACTS=s3://bucket/mlflow cluster/mlflow_server.sh /data/mlflow
# then on every node (or once, in .deepspeed_env):  MLFLOW_TRACKING_URI=http://<this host>:5000
# and to compare runs:  python training/compare.py --experiment NAME --uri http://<this host>:5000
#
# Environment:
#   MLFLOW_BACKEND        database URI (default sqlite:///ROOT/mlflow.db). sqlite suits one server host; keep its
#                         file on a local disk (sqlite's locking is unreliable over NFS). Many concurrent runs or
#                         a server that moves between hosts: PostgreSQL or MySQL.
#   MLFLOW_ARTIFACTS      where uploaded artifacts are stored (default ROOT/artifacts; s3://, gs://, a shared path)
#   MLFLOW_HOST           interface to listen on (default 0.0.0.0: every node must reach it)
#   MLFLOW_PORT           default 5000
#   MLFLOW_WORKERS        server processes (default 4)
#   MLFLOW_ALLOWED_HOSTS  Host headers the server answers (MLflow refuses others, to stop DNS rebinding). Default:
#                         this host's names, localhost and private addresses (10.*, 172.*, 192.168.*)
# Training goes on while this server is down or restarting: rank 0 keeps what it logs and sends it when the
# server answers again (what it finally cannot send is kept in the run dir's mlflow_unsent.jsonl).
set -euo pipefail
ROOT="${1:?usage: cluster/mlflow_server.sh ROOT_FOLDER  (database and artifacts go there)}"
mkdir -p "$ROOT"
ROOT="$(cd "$ROOT" && pwd)"
BACKEND="${MLFLOW_BACKEND:-sqlite:///$ROOT/mlflow.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS:-$ROOT/artifacts}"
case "$ARTIFACTS" in *://*) ;; *) mkdir -p "$ARTIFACTS" ;; esac
names=""
for h in "$(hostname)" "$(hostname -f 2>/dev/null || true)"; do
  [ -n "$h" ] && names="$names,$h,$h:*"
done
ALLOWED="${MLFLOW_ALLOWED_HOSTS:-localhost,localhost:*,127.0.0.1,127.0.0.1:*,10.*,172.*,192.168.*$names}"
# the server's background job runner serves GenAI evaluation features a training cluster does not use
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
echo "MLflow server on ${MLFLOW_HOST:-0.0.0.0}:${MLFLOW_PORT:-5000}: database $BACKEND, artifacts $ARTIFACTS"
echo "On every node: export MLFLOW_TRACKING_URI=http://$(hostname):${MLFLOW_PORT:-5000}"
exec mlflow server --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS" --serve-artifacts \
  --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-4}" \
  --allowed-hosts "$ALLOWED"
