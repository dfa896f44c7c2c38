#!/usr/bin/env bash
# Run all four LayerFlow tasks in both variants with the tiny built-in model on CPU (no weights
# needed): one sample folder per configuration under OUTPUT_DIR (default outputs/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
"$PYTHON" -m layerflow.cli demo "${1:-outputs/demo}"
