#!/usr/bin/env bash
# Stage 1: the layer-aware base model, fine-tuned from CogVideoX-2B (configs/train/base.yaml).
# Usage: MANIFEST=data/train.jsonl [SAVE=...] [TASK=gen] [VARIANT=rgba] [NPROC=8] bash scripts/train_base.sh [ARGS...]
exec bash "$(dirname "$0")/train.sh" base "$@"
