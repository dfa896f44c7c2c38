#!/usr/bin/env bash
# Install what is missing (see setup_env.sh), then run the test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
"$PYTHON" -m ruff check sat tests benchmarks
"$PYTHON" -m ruff format --check sat tests benchmarks
"$PYTHON" -m pytest "$@"
