#!/usr/bin/env bash
# Install what is missing (see setup_env.sh), then run the test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
# the optional extras' tests need them too (pyproject.toml's [diffusers] extra); installed once per pyproject.toml
extras_stamp="$(dirname "$PYTHON")/../.layerflow-extras-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$extras_stamp" ]; then
    echo "[setup] installing the optional extras for their tests: diffusers"
    "$PYTHON" -m pip install --quiet -e ".[diffusers]"
    touch "$extras_stamp"
fi
"$PYTHON" -m ruff check sat tests benchmarks
"$PYTHON" -m ruff format --check sat tests benchmarks
"$PYTHON" -m pytest "$@"
