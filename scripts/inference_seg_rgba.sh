#!/usr/bin/env bash
# LayerFlow seg_rgba with the released weights (see README, "Real weights").
# Extra arguments go to sample_video.py, e.g. --set sampling.num_steps=25 --output outputs/mine
# GPUs: NPROC (default 1) processes on this node; choose devices with CUDA_VISIBLE_DEVICES.
# Launched by layerflow.cli.launch: torchrun after a check in one process; a failure ends in one line.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
"$PYTHON" -m layerflow.cli.launch --standalone --nproc_per_node="${NPROC:-1}" sat/sample_video.py \
    --base configs/model.yaml configs/tasks/seg_rgba.yaml \
    --prompt-dir examples/prompts/seg --input blend="${BLEND:-examples/inputs/blend.mp4}" "$@"
