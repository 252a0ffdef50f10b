#!/usr/bin/env bash
# Create the project's virtual environment: CPU torch first (pinned, so pip never pulls a multi-GB CUDA
# build), then medeyes with its training, developer, serve, trl and parquet extras (the default tests use all five).
# Idempotent. Usage: bash scripts/setup.sh [VENV]
set -euo pipefail
venv="${1:-.venv}"
cd "$(dirname "$0")/.."
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet torch==2.13.0
"$venv/bin/python" -m pip install --quiet -e ".[train,dev,serve,trl,parquet]"
echo "ready: $venv (activate with: . $venv/bin/activate)"
