#!/usr/bin/env bash
# Train one stage: bash scripts/train.sh STAGE [--set training.steps=500 ...]
# STAGE is a file of configs/train/ (base, motion_lora, content_lora). Environment:
#   MANIFEST (required) training manifest (JSONL, see README 'Training')
#   SAVE     checkpoint folder (default checkpoints/<task>_<variant>_<stage>)
#   TASK, VARIANT, NPROC   default gen, rgba, 1 (GPUs of this node; pick them with CUDA_VISIBLE_DEVICES)
# The dataset is VAE/T5-encoded once into the cache, then trained. Rerun the same command to resume.
# Launched by layerflow.cli.launch: torchrun after a check in one process; a failure ends in one line.
set -euo pipefail
cd "$(dirname "$0")/.."
stage="${1:?usage: bash scripts/train.sh STAGE [ARGS...] (STAGE: base, motion_lora, content_lora)}"
shift
[ -f "configs/train/$stage.yaml" ] || { echo "error: configs/train/$stage.yaml not found (stages: base, motion_lora, content_lora)" >&2; exit 2; }
source scripts/setup_env.sh
: "${MANIFEST:?set MANIFEST to a training manifest (JSONL, see README 'Training')}"
TASK="${TASK:-gen}"
VARIANT="${VARIANT:-rgba}"
"$PYTHON" -m layerflow.cli.launch --standalone --nproc_per_node="${NPROC:-1}" sat/train_video.py \
    --base "configs/model.yaml" "configs/tasks/${TASK}_${VARIANT}.yaml" "configs/train/$stage.yaml" \
    --set training.manifest="$MANIFEST" --set training.save="${SAVE:-checkpoints/${TASK}_${VARIANT}_${stage}}" "$@"
