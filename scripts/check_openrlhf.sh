#!/usr/bin/env bash
# Check the MedEyes OpenRLHF backend against the real OpenRLHF 0.11.2 on CPU (see scripts/check_openrlhf.py):
# OpenRLHF's agent loader, MultiTurnAgentExecutor loop, SamplesGenerator, the patched advantage step and
# ActorPPOTrainer.training_step, PolicyLoss parity. Builds .venv-openrlhf first if it is missing.
# Usage: bash scripts/check_openrlhf.sh [VENV]     (about 1-2 minutes on 2 cores)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.venv-openrlhf}"
[ -x "$VENV/bin/python" ] || bash "$REPO/scripts/setup_openrlhf_cpu.sh" "$VENV"
cd "$REPO"
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}" "$VENV/bin/python" scripts/check_openrlhf.py
