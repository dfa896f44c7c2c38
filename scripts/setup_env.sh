#!/usr/bin/env bash
# Sourced by the other scripts: make sure a Python environment with requirements.txt exists.
# Uses the active virtual environment if there is one, else .venv/ at the repository root
# (created on first use). Installs only when requirements.txt changed since the last install.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${VIRTUAL_ENV:-}" ]; then
    env_dir="$VIRTUAL_ENV"
else
    env_dir="$repo_root/.venv"
    if [ ! -x "$env_dir/bin/python" ]; then
        echo "[setup] creating $env_dir"
        python3 -m venv "$env_dir"
    fi
fi
PYTHON="$env_dir/bin/python"
stamp="$env_dir/.layerflow-requirements-$(sha256sum "$repo_root/requirements.txt" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "[setup] installing requirements into $env_dir (first run takes a few minutes)"
    "$PYTHON" -m pip install --quiet --upgrade pip
    # torch first: deepspeed's build needs it; the pinned version is the CPU build on this disk
    "$PYTHON" -m pip install --quiet "$(grep -E '^torch==' "$repo_root/requirements.txt")"
    "$PYTHON" -m pip install --quiet -r "$repo_root/requirements.txt"
    touch "$stamp"
fi
# the `layerflow` command: an editable install of sat/layerflow only (`sat` stays SwissArmyTransformer),
# made again when the installed script calls an older entry point than pyproject.toml's
entry_point="$(sed -n 's/^layerflow = "\(.*\):main"$/\1/p' "$repo_root/pyproject.toml")"
grep -qs "from $entry_point import main" "$env_dir/bin/layerflow" ||
    "$PYTHON" -m pip install --quiet --no-deps -e "$repo_root"
export PYTHON
export PYTHONPATH="$repo_root/sat${PYTHONPATH:+:$PYTHONPATH}"
