#!/usr/bin/env bash
# The paper's path as a cluster user walks it, at miniature scale, on this machine: every command below is the one
# the README and docs/cluster.md show, run from a folder laid out like the checkout (its programs and configs
# linked in, data/ and runs/ its own), with overrides for size and steps only.
#
#   bash scripts/rehearse_cluster.sh [WORK]      # WORK: a new folder (default: a fresh one under /tmp)
#
#  1. the world, offline: CC3M / CC12M TSVs and a LAION parquet whose images a web server on 127.0.0.1 serves,
#     CUB-200 / Oxford-102 / MSCOCO folders in their own layouts (scripts/rehearsal_data.py), and a small CLIP
#     text model with random weights saved by transformers as a Hugging Face folder
#  2. the tracking server (cluster/mlflow_server.sh, with its login) and a Ray head (cluster/ray_head.sh, with its
#     token), in a fresh home directory, as a new user has them; RAY_ADDRESS names the head to build.py
#  3. python data_pipeline/build.py cc3m --metadata ... --stages metadata,filter,download      the CC images
#  4. python training/train_vqvae.py --config vqvae_f8_8192.yaml              the paper tokenizer on them (one rank)
#  5. python data_pipeline/build.py cc3m | cc12m | laion-cartoon | cub200 | oxford102 | mscoco   every recipe encoded
#  6. cluster/train_node.sh 0|1 127.0.0.1 training/train.py --config base_cc.yaml   the base: two nodes of one rank
#     (cluster/hostfile, .deepspeed_env), the text tower passed as --text.pretrained=<a Hugging Face CLIP folder>
#  7. deepspeed --num_gpus 2 training/train.py --config finetune_cub200.yaml --train.init_from=runs:/<base run id>,
#     python training/train.py --config finetune_{laion_cartoon,oxford102,mscoco}.yaml (from runs/base_cc/export)
#  8. python training/compare.py --experiment vqd-base | vqd-finetune --uri $MLFLOW_TRACKING_URI
#  9. python training/sample.py / training/evaluate.py --model runs/finetune_cub200/export
# Overrides, all of size and length: 32 px images and a 16-channel tokenizer (its f8 stays: a 4 x 4 grid), a
# denoiser and CLIP text tower of width 64 and depth 2, 10-30 steps of batch 8 with 5 warm-up steps; and for this
# machine: no loader workers, no torch.compile (a GPU's), and recipes that may fetch from 127.0.0.1 (the web here).
# Independent steps run two at a time. Each step's output is in WORK/logs/ (its start and seconds in
# logs/times.tsv); a step that fails stops the rehearsal with the end of its log. The servers and the Ray head it
# started are stopped on the way out.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${1:-$(mktemp -d /tmp/vqd-rehearsal.XXXXXX)}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
if [ -e "$WORK/runs" ] || [ -e "$WORK/data" ]; then
  echo "error: $WORK already holds a rehearsal (data/ or runs/): give a new folder" >&2
  exit 2
fi

# ---- the folder the commands run in: the checkout's programs and configs, data/ runs/ home/ of its own ----
for d in training data_pipeline vqd configs scripts; do ln -sfn "$REPO/$d" "$WORK/$d"; done
mkdir -p "$WORK/cluster" "$WORK/logs" "$WORK/out"
for f in "$REPO"/cluster/*; do ln -sfn "$f" "$WORK/cluster/"; done
cd "$WORK"
PYTHON_BIN="$(python -c 'import os, sys; print(os.path.dirname(sys.executable))')"
export PATH="$PYTHON_BIN:$PATH"  # this Python's programs (deepspeed, mlflow, ray) whatever HOME says
export HOME="$WORK/home"  # a new user: no ~/.mlflow, ~/.ray or ~/.deepspeed_env of the person running this
mkdir -p "$HOME"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
export NO_ALBUMENTATIONS_UPDATE=1 RAY_USAGE_STATS_ENABLED=0
unset MLFLOW_TRACKING_URI MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD RAY_ADDRESS RAY_AUTH_TOKEN RAY_AUTH_TOKEN_PATH
free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

STARTED=$SECONDS
WEB_PID="" MLFLOW_PID="" RAY_TEMP=""
cleanup() {
  local code=$?
  [ -n "$RAY_TEMP" ] && { cluster/ray_stop.sh --temp-dir="$RAY_TEMP" > logs/ray_stop.log 2>&1 || true; rm -rf "$RAY_TEMP"; }
  [ -n "$MLFLOW_PID" ] && { kill -- "-$MLFLOW_PID" 2> /dev/null || true; }
  [ -n "$WEB_PID" ] && { kill "$WEB_PID" 2> /dev/null || true; }
  wait 2> /dev/null || true
  exit "$code"
}
trap cleanup EXIT

step() {  # step NAME COMMAND...: run one command as written, its output in logs/NAME.log, its seconds in logs/times
  local name="$1" start=$SECONDS
  shift
  printf '[%4ds] %-22s $ %s\n' "$((SECONDS - STARTED))" "$name" "$*"
  if ! "$@" > "logs/$name.log" 2>&1; then
    echo "rehearsal stopped: '$name' failed; the end of logs/$name.log:" >&2
    tail -n 40 "logs/$name.log" >&2
    exit 1
  fi
  printf '%s\t%s\t%s\n' "$name" "$((start - STARTED))" "$((SECONDS - start))" >> logs/times.tsv
}

STREAMS=()
stream() { "$@" & STREAMS+=($!); }  # stream FUNCTION: run a list of steps beside the others (2 cores, much waiting)
join() {  # wait for every stream; one that failed stops the rehearsal
  local pid failed=0
  for pid in "${STREAMS[@]}"; do wait "$pid" || failed=1; done
  STREAMS=()
  ((failed == 0)) || exit 1
}

wait_for() {  # wait_for WHAT SECONDS TEST...: until the test passes, else fail naming WHAT
  local what="$1" limit="$2" start=$SECONDS
  shift 2
  until "$@" > /dev/null 2>&1; do
    if ((SECONDS - start > limit)); then echo "rehearsal stopped: $what did not come up in ${limit} s" >&2; exit 1; fi
    sleep 0.5
  done
}

# ---- 1. the world: its web on 127.0.0.1 (made while the servers below start) ----
WEB_URL="http://127.0.0.1:$(free_port)"
mkdir -p web
python -m http.server "${WEB_URL##*:}" --bind 127.0.0.1 --directory web > logs/web_server.log 2>&1 &
WEB_PID=$!
python scripts/rehearsal_data.py "$WORK" --web "$WEB_URL" > logs/data.log 2>&1 &
DATA_PID=$!

# ---- 2. the tracking server and the Ray head, as docs/cluster.md starts them ----
MLFLOW_PORT="$(free_port)"
MLFLOW_HOST=127.0.0.1 MLFLOW_PORT="$MLFLOW_PORT" MLFLOW_WORKERS=1 setsid cluster/mlflow_server.sh "$WORK/mlflow" \
  > logs/mlflow_server.log 2>&1 &
MLFLOW_PID=$!
RAY_TEMP="$(mktemp -d /tmp/vqd-ray.XXXXXX)"  # short: Ray's socket paths live under it
RAY_PORT="$(free_port)"
export RAY_PORT HEAD_OPTIONS="--dashboard-port=$(free_port) --ray-client-server-port=$(free_port)"
step ray_head cluster/ray_head.sh --temp-dir="$RAY_TEMP"
RAY_ADDRESS="$(sed -n 's/^Ray head at \([^,]*\),.*/\1/p' logs/ray_head.log)"
export RAY_ADDRESS  # build.py joins the cluster it names, as Ray's own tools do
wait_for "the tracking server" 120 grep -q "install -D -m 600" logs/mlflow_server.log
creds="$(sed -n 's/.*or a copy of the file:  install -D -m 600 \([^ ]*\) .*/\1/p' logs/mlflow_server.log)"
install -D -m 600 "$creds" ~/.mlflow/credentials  # the server's own instruction, as printed
export MLFLOW_TRACKING_URI="$(sed -n 's/.*export MLFLOW_TRACKING_URI=\([^ ]*\).*/\1/p' logs/mlflow_server.log)"
wait_for "the tracking server" 120 curl -sf "$MLFLOW_TRACKING_URI/health"
wait "$DATA_PID" || { echo "rehearsal stopped: scripts/rehearsal_data.py failed:" >&2; tail -n 40 logs/data.log >&2; exit 1; }
wait_for "the web server" 60 curl -sf "$WEB_URL/"
CLIP="$WORK/clip-vit-tiny"  # the way users pass OpenAI's: text.pretrained=<a Hugging Face CLIP folder>
WEB=(--set download.allow_private_hosts=true)  # this rehearsal's web is 127.0.0.1, which recipes refuse by default

# the miniature: the paper configs as they are, smaller and shorter
TOKENIZER_SIZE=(--model.image_size=32 --model.ch=16 --model.z_channels=16 --model.embed_dim=16 --model.norm_groups=4
                --model.attn_resolutions=[4] --train.steps=30 --train.micro_batch_size=8 --optim.warmup_steps=5
                --train.num_workers=0)
DIFFUSION_SIZE=(--model.depth=2 --model.width=64 --model.heads=2 --text.width=64 --text.layers=2 --text.heads=2
                --train.micro_batch_size=8 --optim.warmup_steps=5 --train.num_workers=0 --train.compile=false)

# ---- 3. the CC images; 4. the paper tokenizer trained on them ----
step cc3m_images python data_pipeline/build.py cc3m --metadata metadata/Train_GCC-training.tsv "${WEB[@]}" \
  --stages metadata,filter,download
step tokenizer python training/train_vqvae.py --config vqvae_f8_8192.yaml "${TOKENIZER_SIZE[@]}"

# ---- 5. every paper recipe encoded with it; 6. the base on two nodes of one rank each (cluster/train_node.sh) ----
printf 'node001 slots=1\nnode002 slots=1\n' > cluster/hostfile
printf 'MLFLOW_TRACKING_URI=%s\nVQD_DIST_TIMEOUT=120\nOMP_NUM_THREADS=1\nPYTHONUNBUFFERED=1\n' "$MLFLOW_TRACKING_URI" \
  > .deepspeed_env
export MASTER_PORT="$(free_port)"
BASE=(training/train.py --config base_cc.yaml "${DIFFUSION_SIZE[@]}" --text.pretrained="$CLIP" --train.steps=20)
node() { cluster/train_node.sh "$1" 127.0.0.1 "${BASE[@]}"; }
two_nodes() {  # node 1 in the background (its output in logs/base_node1.log), node 0 in front
  node 1 > logs/base_node1.log 2>&1 &
  local other=$!
  node 0 && wait "$other"
}
base_data_then_base() {
  step cc3m python data_pipeline/build.py cc3m --metadata metadata/Train_GCC-training.tsv "${WEB[@]}"
  step cc12m python data_pipeline/build.py cc12m --metadata metadata/cc12m.tsv "${WEB[@]}"
  step base_node0 two_nodes
}
finetune_data() {
  step laion-cartoon python data_pipeline/build.py laion-cartoon --metadata metadata/relaion-parquet/ "${WEB[@]}"
  local recipe
  for recipe in cub200 oxford102 mscoco; do step "$recipe" python data_pipeline/build.py "$recipe"; done
}
stream base_data_then_base
stream finetune_data
join

# ---- 7. every fine-tune from the base's export (the first through the base's MLflow run, the others its folder) ----
FINETUNE=("${DIFFUSION_SIZE[@]}" --train.steps=10)
finetune() { step "finetune_$1" python training/train.py --config "finetune_$1.yaml" "${FINETUNE[@]}"; }
first_finetunes() {
  step finetune_cub200 deepspeed --num_gpus 2 --master_port "$(free_port)" training/train.py \
    --config finetune_cub200.yaml --train.init_from="runs:/$(cat runs/base_cc/mlflow_run_id.txt)" "${FINETUNE[@]}"
  finetune laion_cartoon
}
other_finetunes() { finetune oxford102 && finetune mscoco; }
stream first_finetunes
stream other_finetunes
join

# ---- 8. the runs side by side, from the server; 9. pictures and scores of a fine-tune ----
compare() {
  step compare_base python training/compare.py --experiment vqd-base --uri "$MLFLOW_TRACKING_URI"
  step compare_finetunes python training/compare.py --experiment vqd-finetune --uri "$MLFLOW_TRACKING_URI"
}
draw_and_score() {
  step sample python training/sample.py --model runs/finetune_cub200/export --prompt "a small bird with a red head" \
    --prompt "this bird is yellow with a short black beak" --out out/finetune_cub200.png
  step evaluate python training/evaluate.py --model runs/finetune_cub200/export --data data/cub200
}
stream compare
stream draw_and_score
join

echo
echo "rehearsal passed in $((SECONDS - STARTED)) s on $(lscpu | sed -n 's/^Model name: *//p' | head -1)" \
  "($(getconf _NPROCESSORS_ONLN) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg) at the end); each step:"
printf '  %-22s %7s %7s\n' step "start s" seconds
while IFS=$'\t' read -r name at took; do printf '  %-22s %7s %7s\n' "$name" "$at" "$took"; done < logs/times.tsv
echo "every step's output: $WORK/logs/; the runs' lineage: $WORK/runs/compare/vqd-finetune/lineage.txt"
