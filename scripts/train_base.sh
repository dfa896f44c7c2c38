#!/usr/bin/env bash
# Stage 1: the layer-aware base model, fine-tuned from CogVideoX-2B (configs/train/base.yaml).
# Usage: MANIFEST=data/train.jsonl SAVE=checkpoints/gen_rgba_base [TASK=gen] [VARIANT=rgba] [NPROC=8] \
#        bash scripts/train_base.sh [--set training.steps=500 ...]
# The dataset is VAE/T5-encoded once into SAVE/cache (or training.cache), then trained on NPROC GPUs
# of this node (choose them with CUDA_VISIBLE_DEVICES). Rerun the same command to resume.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
: "${MANIFEST:?set MANIFEST to a training manifest (JSONL, see README 'Training')}"
TASK="${TASK:-gen}"
VARIANT="${VARIANT:-rgba}"
"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="${NPROC:-1}" sat/train_video.py \
    --base configs/model_${VARIANT}.yaml configs/tasks/${TASK}_${VARIANT}.yaml configs/train/base.yaml \
    --set training.manifest="$MANIFEST" --set training.save="${SAVE:-checkpoints/${TASK}_${VARIANT}_base}" "$@"
