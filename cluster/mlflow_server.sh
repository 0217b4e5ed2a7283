#!/usr/bin/env bash
# Start the MLflow tracking server that every node logs to, behind MLflow's basic-auth app. Ranks talk to it over
# HTTP only: runs, params and metrics go to its database, and artifacts (sample grids, exports) are uploaded through
# it to its artifact store, so the training nodes need no shared filesystem for tracking.
#
#   cluster/mlflow_server.sh /data/mlflow            # database, artifacts and users under /data/mlflow, port 5000
#   MLFLOW_BACKEND=postgresql://mlflow@dbhost/mlflow MLFLOW_ARTIFACTS=s3://bucket/mlflow cluster/mlflow_server.sh /data/mlflow
#   cluster/mlflow_server.sh --no-auth /data/mlflow  # no login at all: only on a network nobody else reaches
# then on every node (or once, in .deepspeed_env):  MLFLOW_TRACKING_URI=http://<this host>:5000, and the
# credentials the way MLflow's client reads them (it prints how: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD,
# or a copy of the admin credentials file as ~/.mlflow/credentials). docs/cluster.md has the whole set-up.
#
# Authentication (the default): every request needs a user and password. The admin's come from
# $MLFLOW_AUTH_ADMIN_USERNAME / $MLFLOW_AUTH_ADMIN_PASSWORD when the password is set, else from the credentials file
# (ROOT/auth/credentials), which is created with a random password, readable by its owner only, when missing. That
# file (or the environment) holds the admin password: edit it and restart to change it. Users, the auth config and
# the CSRF key live in ROOT/auth (owner-only); cluster/mlflow_auth.py prepares them.
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
#   MLFLOW_CREDENTIALS    the admin credentials file (default ROOT/auth/credentials)
#   MLFLOW_AUTH_DATABASE  where users and permissions are kept (default sqlite:///ROOT/auth/basic_auth.db)
#   MLFLOW_DEFAULT_PERMISSION  what a user may do with experiments others made: READ (default), EDIT, MANAGE,
#                         NO_PERMISSIONS (a user always manages the experiments they create)
# Training goes on while this server is down or restarting: rank 0 keeps what it logs and sends it when the
# server answers again (what it finally cannot send is kept in the run dir's mlflow_unsent.jsonl).
set -euo pipefail
AUTH_ON=1
if [ "${1:-}" = "--no-auth" ]; then
  AUTH_ON=0
  shift
fi
ROOT="${1:?usage: cluster/mlflow_server.sh [--no-auth] ROOT_FOLDER  (database, artifacts and users go there)}"
mkdir -p "$ROOT"
ROOT="$(cd "$ROOT" && pwd)"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BACKEND="${MLFLOW_BACKEND:-sqlite:///$ROOT/mlflow.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS:-$ROOT/artifacts}"
HOST="${MLFLOW_HOST:-0.0.0.0}"
PORT="${MLFLOW_PORT:-5000}"
case "$ARTIFACTS" in *://*) ;; *) mkdir -p "$ARTIFACTS" ;; esac
names=""
for h in "$(hostname)" "$(hostname -f 2>/dev/null || true)"; do
  [ -n "$h" ] && names="$names,$h,$h:*"
done
case "$HOST" in  # the address the nodes are told: this host's name, unless the server listens on one address only
  0.0.0.0 | :: | "") ADDRESS="$(hostname)" ;;
  *:*) ADDRESS="[$HOST]" ;;
  *) ADDRESS="$HOST" ;;
esac
ALLOWED="${MLFLOW_ALLOWED_HOSTS:-localhost,localhost:*,127.0.0.1,127.0.0.1:*,10.*,172.*,192.168.*$names}"
# the server's background job runner serves GenAI evaluation features a training cluster does not use
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
shown_backend="$(printf '%s' "$BACKEND" | sed -E 's#(://[^:/@]+):[^@/]+@#\1:***@#')"  # no database password in logs
echo "MLflow server on $HOST:$PORT: database $shown_backend, artifacts $ARTIFACTS"

app=()
if [ "$AUTH_ON" = 1 ]; then
  AUTH="$ROOT/auth"
  python "$HERE/mlflow_auth.py" "$AUTH" --credentials "${MLFLOW_CREDENTIALS:-$AUTH/credentials}" \
    --database "${MLFLOW_AUTH_DATABASE:-sqlite:///$AUTH/basic_auth.db}" \
    --default-permission "${MLFLOW_DEFAULT_PERMISSION:-READ}" --uri "http://$ADDRESS:$PORT"
  export MLFLOW_AUTH_CONFIG_PATH="$AUTH/basic_auth.ini"
  MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$AUTH/flask_secret_key")"
  export MLFLOW_FLASK_SERVER_SECRET_KEY
  app=(--app-name basic-auth)
else
  bar="!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
  {
    echo "$bar"
    echo "WARNING: --no-auth: the MLflow server on $HOST:$PORT asks nobody for a password. Anyone who reaches"
    echo "this port can read every run's params, metrics and artifacts (model exports included), write into"
    echo "runs and delete experiments. Use it only on a network no one else can reach."
    echo "$bar"
  } >&2
  echo "On every node: export MLFLOW_TRACKING_URI=http://$ADDRESS:$PORT"
fi
exec mlflow server --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS" --serve-artifacts \
  --host "$HOST" --port "$PORT" --workers "${MLFLOW_WORKERS:-4}" --allowed-hosts "$ALLOWED" "${app[@]}"
