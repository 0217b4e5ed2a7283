#!/usr/bin/env bash
# Start this node's ranks of a multi-node DeepSpeed job, with no ssh between the nodes (no pdsh, no passwordless
# ssh): run it on every node, from the repository root, each node with its own rank. Node 0 is the master.
#
#   cluster/train_node.sh NODE_RANK MASTER_ADDR PROGRAM [ARGS...]
#     on node001:  cluster/train_node.sh 0 node001 training/train.py --config configs/base_cc.yaml
#     on node002:  cluster/train_node.sh 1 node001 training/train.py --config configs/base_cc.yaml
#
# Environment:
#   HOSTFILE          the nodes in node-rank order, "<name> slots=<ranks>" (default cluster/hostfile, see
#                     cluster/hostfile.example)
#   MASTER_PORT       rendezvous port on the master, open between the nodes (default 29500)
#   NUM_GPUS          ranks on this node, when fewer than the hostfile's slots
#   DS_ENV_FILE       KEY=VALUE lines given to every rank: ~/.deepspeed_env then ./.deepspeed_env by default, the
#                     files deepspeed's ssh launcher reads (it skips them with --no_ssh, so this script reads them).
#                     See cluster/deepspeed_env.example: MLFLOW_TRACKING_URI (cluster/mlflow_server.sh),
#                     VQD_DIST_TIMEOUT, NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME (the interface between nodes),
#                     NCCL_IB_DISABLE, NCCL_DEBUG, OMP_NUM_THREADS (CPU ranks). No comments or blank lines in it:
#                     deepspeed's launcher reads every line as KEY=VALUE. The tracking server's credentials go in
#                     ~/.mlflow/credentials, not here (docs/cluster.md).
#
# train.run_dir must be on a filesystem every node sees: every rank writes its checkpoint shard there.
# A node that dies takes the job down: the other ranks fail at their next collective (at once when the node's
# connections close, after VQD_DIST_TIMEOUT seconds when it hangs). Start every node again with --train.resume=auto.
set -euo pipefail
usage="usage: cluster/train_node.sh NODE_RANK MASTER_ADDR PROGRAM [ARGS...]"
NODE_RANK="${1:?$usage}"
MASTER_ADDR="${2:?$usage}"
shift 2
[ $# -ge 1 ] || { echo "$usage" >&2; exit 2; }
HOSTFILE="${HOSTFILE:-cluster/hostfile}"
if [ ! -f "$HOSTFILE" ]; then
  echo "train_node.sh: no hostfile at $HOSTFILE: copy cluster/hostfile.example there, one line per node" >&2
  exit 2
fi
NUM_NODES=$(grep -cE '^[[:space:]]*[^#[:space:]]+[[:space:]]+slots=[0-9]+' "$HOSTFILE" || true)
if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || (( NODE_RANK >= NUM_NODES )); then
  echo "train_node.sh: NODE_RANK must be 0..$((NUM_NODES - 1)) for the $NUM_NODES nodes of $HOSTFILE, got $NODE_RANK" >&2
  exit 2
fi
env_file="${DS_ENV_FILE:-.deepspeed_env}"
case "$env_file" in
  /*) candidates=("$env_file") ;;
  *) candidates=("$HOME/$env_file" "./$env_file") ;;
esac
for f in "${candidates[@]}"; do
  if [ -f "$f" ]; then set -a; . "$f"; set +a; fi
done
exec deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" --num_nodes "$NUM_NODES" \
  ${NUM_GPUS:+--num_gpus "$NUM_GPUS"} --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" "$@"
