#!/usr/bin/env bash
# Stage 3: the content LoRA (+ layer embedding) on still images and copy-pasted videos (configs/train/content_lora.yaml).
# Usage: MANIFEST=data/train.jsonl [SAVE=...] [TASK=gen] [VARIANT=rgba] [NPROC=8] bash scripts/train_content_lora.sh [ARGS...]
exec bash "$(dirname "$0")/train.sh" content_lora "$@"
