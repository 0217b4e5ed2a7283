#!/usr/bin/env bash
# The offline default, end to end, on whatever this machine has (CPU ranks here, GPUs where present):
#   1. download the 3,953 named Twemoji PNGs through img2dataset from a 127.0.0.1 server (Ray, local)
#   2. train the image tokenizer (VQ-VAE, 32 px -> 8 x 8 tokens) on the downloaded shards (DeepSpeed)
#   3. encode every image to VQ ids and every caption to CLIP ids: data/emoji/{train,test}-*.tar + manifest.json
# Every stage resumes: run the same command again after an interruption.
# Environment: RANKS (tokenizer ranks, default 2), TOKENIZER_STEPS (default: the config's).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
RANKS=${RANKS:-2}
steps=()
[ -n "${TOKENIZER_STEPS:-}" ] && steps=(--train.steps="$TOKENIZER_STEPS")

python data_pipeline/build.py emoji --stages metadata,filter,download
if [ ! -f runs/vqvae_emoji/export/model.safetensors ]; then
  deepspeed --num_gpus "$RANKS" training/train_vqvae.py --config configs/vqvae_emoji.yaml \
    --data.source=data/emoji/download --train.resume=auto "${steps[@]}"
fi
python data_pipeline/build.py emoji
python benchmarks/tokenizer.py --tokenizer runs/vqvae_emoji/export   # held-out PSNR, usage, FID, grid PNG
