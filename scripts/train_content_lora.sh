#!/usr/bin/env bash
# Stage 3: the content LoRA (+ layer embedding) on still images and copy-pasted videos (configs/train/content_lora.yaml).
# Usage: MANIFEST=data/train.jsonl SAVE=checkpoints/gen_rgba_content_lora [TASK=gen] [VARIANT=rgba] [NPROC=8] \
#        bash scripts/train_content_lora.sh [--set training.steps=500 ...]
# The dataset is VAE/T5-encoded once into SAVE/cache (or training.cache), then trained on NPROC GPUs
# of this node (choose them with CUDA_VISIBLE_DEVICES). Rerun the same command to resume.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
: "${MANIFEST:?set MANIFEST to a training manifest (JSONL, see README 'Training')}"
TASK="${TASK:-gen}"
VARIANT="${VARIANT:-rgba}"
"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="${NPROC:-1}" sat/train_video.py \
    --base configs/model_${VARIANT}.yaml configs/tasks/${TASK}_${VARIANT}.yaml configs/train/content_lora.yaml \
    --set training.manifest="$MANIFEST" --set training.save="${SAVE:-checkpoints/${TASK}_${VARIANT}_content_lora}" "$@"
