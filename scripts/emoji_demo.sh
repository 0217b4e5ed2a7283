#!/usr/bin/env bash
# The offline default, end to end: text -> image on this machine (2 CPU ranks here, GPUs where present).
#   1. images: emoji (Twemoji, 3,953 captioned PNGs) and openmoji (the same concepts drawn by another artist,
#      rasterised), each downloaded through img2dataset from a 127.0.0.1 server (Ray)
#   2. train the image tokenizer (VQ-VAE, 32 px -> 4 x 4 tokens of 512 codes) on both styles (DeepSpeed)
#   3. encode every image to VQ ids and every caption to CLIP ids: data/emoji/{train,test}-*.tar + manifest
#   4. openmoji's token shards, alike: data/openmoji/
#   5. align the base model's small text tower with the emoji images (CLIP's objective, offline)
#                                                                      -> runs/text_emoji/export/text.safetensors
#   6. train the base VQ-Diffusion on emoji (DeepSpeed, 2 ranks)      -> runs/emoji_base/export
#   7. fine-tune it on openmoji (VQ-Diffusion-F)                       -> runs/emoji_openmoji/export
#   8. evaluate the base on its held-out concepts (FID, prompt fidelity, images/s) with three sampling settings,
#      and write the best into its export (sampling.yaml)                -> runs/emoji_base/export/eval/
#      (EVAL_FINETUNE=1: the fine-tune on openmoji's too, ~2 more minutes: its probe and references are new)
#   9. draw pictures for typed prompts from both, each with its export's settings: out/demo_base.png,
#      out/demo_openmoji.png; beside each prompt's training image as the tokenizer shows it: out/diagnose_base/
#  10. compare the runs as MLflow has them (and print the `mlflow ui` command), then the command of the prompt page
# Sampling settings: each export carries its own (sampling.yaml: the training config's `sample` section, then
# the best the evaluation measured); sample.py, evaluate.py, diagnose.py and serve.py read them.
# A stage whose result exists is skipped, and the data stages resume, so a second run reuses the first's
# work (delete out/ to draw the pictures again).
# Time: each training stage has a wall-clock budget (train.max_minutes): on a CPU slower than the one the
# configs' step counts were measured on, a stage plans fewer steps and still completes its learning-rate
# decay, so the whole command stays within ~20 minutes on the slowest of these machines; on a fast one the
# budgets are never reached and the configs' steps run.
# Environment: RANKS (training ranks, default 2), EVAL_N (held-out prompts scored, default 64), EVAL_FINETUNE
# (1: evaluate the fine-tune too), TOKENIZER_STEPS / TEXT_STEPS / BASE_STEPS / FINETUNE_STEPS (default: the
# configs'), TOKENIZER_MINUTES / TEXT_MINUTES / BASE_MINUTES / FINETUNE_MINUTES (the budgets, defaults below; 0:
# none), LIMIT (build only the first LIMIT images of each style: a quick look at every stage; default all).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
RANKS=${RANKS:-2}
EVAL_N=${EVAL_N:-64}
# The training loops' budgets, in minutes. With AVX2 kernels forced on an AVX-512 AMD EPYC (fp32 throughout),
# the configs' steps take ~3.1 (tokenizer), ~1.1 (text tower), ~3.0 (base) and ~0.5 (fine-tune) minutes and
# the other stages ~4.6 together, so these bind only on a slower CPU. There the tokenizer gets the most, being
# the pictures' ceiling. Run on one core of that AMD EPYC (`taskset -c 0`: half its compute, the two AVX2 cores of the
# slowest CPU of this kind), a 3.5-minute budget stopped the tokenizer at 689 of its 1,000 steps and the
# base model's held-out prompts fell with its reconstructions (subcategory top-1 8-9% against 14-16%,
# N = 64); 5 minutes fits its steps there.
TOKENIZER_MINUTES=${TOKENIZER_MINUTES:-5}
TEXT_MINUTES=${TEXT_MINUTES:-1.5}
BASE_MINUTES=${BASE_MINUTES:-4}
FINETUNE_MINUTES=${FINETUNE_MINUTES:-1}
PROMPTS=("red heart" "house" "thumbs up" "grinning face" "pizza" "rocket" "cat face" "flag: Japan")
# The settings the evaluation measures, over the export's own steps, truncation and purity (configs/emoji_base.yaml's
# `sample` section says what earlier measurements found); the lowest FID becomes the export's sampling settings.
# Each setting costs about 30 CPU-seconds at EVAL_N=64 (Inception on 128 pictures is most of it).
MEASURE=(--guidance 1 2 3)
mkdir -p out
start=$SECONDS
stage() { printf '\n=== %s  (%ds so far)\n' "$1" $((SECONDS - start)); }
# the run's newest checkpoint is the last step it planned for these train.steps (training/core/checkpoint.py)
trained() { python -c 'import glob, json, os, sys
found = sorted(glob.glob(sys.argv[1] + "/checkpoints/step_" + "[0-9]" * 8 + "/complete"))
step, steps = (int(open(found[-1]).read()) if found else -1), int(sys.argv[2])
progress = os.path.join(os.path.dirname(found[-1]), "progress.json") if found else ""
p = json.load(open(progress)) if os.path.isfile(progress) else {"config_steps": steps, "planned_steps": steps}
sys.exit(not (p["config_steps"] == steps and step == p["planned_steps"]))' "$1" "$2"; }
steps_of() { python -c "import sys, yaml; d = yaml.safe_load(open(sys.argv[1])); print(d['train']['steps'])" "$1"; }
limit() { [ -n "${LIMIT:-}" ] && echo "--limit=$LIMIT" || true; }
launch() { deepspeed --num_gpus "$RANKS" --master_port "$(python -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')" "$@"; }

stage "1/10 emoji and openmoji images (Ray + img2dataset)"
python data_pipeline/build.py emoji --stages metadata,filter,download $(limit)
python data_pipeline/build.py openmoji --stages metadata,filter,download $(limit)

stage "2/10 image tokenizer"
tokenizer_steps=${TOKENIZER_STEPS:-$(steps_of configs/vqvae_emoji.yaml)}
trained runs/vqvae_emoji "$tokenizer_steps" && [ -f runs/vqvae_emoji/export/model.safetensors ] ||
  launch training/train_vqvae.py --config configs/vqvae_emoji.yaml \
    --data.source=data/emoji/download,data/openmoji/download --train.resume=auto \
    --train.steps="$tokenizer_steps" --train.max_minutes="$TOKENIZER_MINUTES"

stage "3/10 emoji token shards"
python data_pipeline/build.py emoji $(limit)

stage "4/10 openmoji token shards"
python data_pipeline/build.py openmoji $(limit)

stage "5/10 the text tower, aligned with the emoji images"
text_steps=${TEXT_STEPS:-$(steps_of configs/text_emoji.yaml)}
if [ -f runs/text_emoji/export/text.safetensors ]; then
  echo "already aligned: runs/text_emoji/export/text.safetensors"
else
  python training/align_text.py --config configs/text_emoji.yaml --train.steps="$text_steps" \
    --train.max_minutes="$TEXT_MINUTES"
fi

stage "6/10 base model on emoji"
base_steps=${BASE_STEPS:-$(steps_of configs/emoji_base.yaml)}
trained runs/emoji_base "$base_steps" ||
  launch training/train.py --config configs/emoji_base.yaml --train.resume=auto --train.steps="$base_steps" \
    --train.max_minutes="$BASE_MINUTES"

stage "7/10 fine-tune on openmoji (VQ-Diffusion-F)"
ft_steps=${FINETUNE_STEPS:-$(steps_of configs/emoji_openmoji.yaml)}
trained runs/emoji_openmoji "$ft_steps" ||
  launch training/train.py --config configs/emoji_openmoji.yaml --train.resume=auto --train.steps="$ft_steps" \
    --train.max_minutes="$FINETUNE_MINUTES"

stage "8/10 evaluation on held-out concepts, and the sampling settings that score best"
pairs=(emoji_base:emoji); [ "${EVAL_FINETUNE:-0}" = 1 ] && pairs+=(emoji_openmoji:openmoji)
for pair in "${pairs[@]}"; do
  model=runs/${pair%%:*}/export data=data/${pair##*:}
  if ls "$model"/eval/*.json >/dev/null 2>&1; then  # a new export replaces eval/ with it
    echo "already evaluated: $(ls "$model"/eval/*.json)"
  else
    python training/evaluate.py --model "$model" --data "$data" --n "$EVAL_N" --prompts-from both "${MEASURE[@]}" \
      --write-sampling
  fi
done

stage "9/10 pictures for typed prompts"
args=(); for p in "${PROMPTS[@]}"; do args+=(--prompt "$p"); done
for run in emoji_base emoji_openmoji; do
  png=out/demo_${run#emoji_}.png
  # drawn from this export with its present settings already
  if [ "$png" -nt "runs/$run/export/model.safetensors" ] && [ "$png" -nt "runs/$run/export/sampling.yaml" ]; then
    echo "already drawn: $png"
  else
    python training/sample.py --model "runs/$run/export" "${args[@]}" --per-prompt 2 --out "$png"
  fi
done
# each prompt's training image as its tokens decode (what the tokenizer can show) beside the base model's
# pictures, and what the caption is worth by how often the data shows its concept
if [ out/diagnose_base/diagnose.png -nt runs/emoji_base/export/model.safetensors ] &&
   [ out/diagnose_base/diagnose.png -nt runs/emoji_base/export/sampling.yaml ]; then
  echo "already diagnosed: out/diagnose_base/"
else
  python training/diagnose.py --model runs/emoji_base/export --data data/emoji "${args[@]}" --per-prompt 2 \
    --out out/diagnose_base
fi

stage "10/10 the runs in MLflow"
python training/compare.py --experiment vqd-emoji --out out/compare

printf '\nDone in %ds. Pictures: out/demo_base.png, out/demo_openmoji.png; evaluations: runs/*/export/eval/\n' \
  $((SECONDS - start))
printf 'Type prompts into the base model in a browser:\n  python training/serve.py --model runs/emoji_base/export   # then open http://127.0.0.1:7860/\n'

