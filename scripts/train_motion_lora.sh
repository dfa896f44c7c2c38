#!/usr/bin/env bash
# Stage 2: the motion LoRA on still clips, continuing a stage-1 checkpoint (configs/train/motion_lora.yaml).
# Usage: MANIFEST=data/train.jsonl [SAVE=...] [TASK=gen] [VARIANT=rgba] [NPROC=8] bash scripts/train_motion_lora.sh [ARGS...]
exec bash "$(dirname "$0")/train.sh" motion_lora "$@"
