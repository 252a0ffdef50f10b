#!/usr/bin/env bash
# Build .venv-verl: the real verl 0.9.1 code on a CPU machine, for the `verl`-marked tests
# (tests/test_verl_agent_loop.py). NOT for training: verl trains on CUDA GPUs (see docs/integrations.md §4).
#
# Usage: bash scripts/install_verl.sh [VENV_DIR]       (default: <repo>/.venv-verl)
#
# What is installed:
#   verl 0.9.1 with its base requirements (ray, tensordict, hydra, transformers <5.11 as verl pins, peft, ...).
#   Its `vllm`/`sglang` extras are NOT installed: they are CUDA builds, and the generation server is what the
#   tests replace with a real model behind verl's own server-manager interface.
#   torch is torch==2.13.0+cpu, installed FIRST from the local wheel and held by a constraints file, so pip never
#   resolves a bare `torch` (on PyPI a multi-GB CUDA build). torchvision/torchaudio/torchcodec are removed if
#   anything pulls them in: their PyPI builds do not load against the CPU torch.
# Idempotent: a venv that already has verl 0.9.1 only re-installs medeyes (cheap).
# Environment: PYTHON (default python3.11, else python3), TORCH_SPEC (default torch==2.13.0+cpu).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.venv-verl}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0+cpu}"
VERL_SPEC="verl==0.9.1"

# shellcheck source=scripts/venv_common.sh
source "$REPO/scripts/venv_common.sh"
TAG=install_verl
start=$(date +%s)
venv_create
CONSTRAINTS="$VENV/medeyes-constraints.txt"
printf '%s\n' "$TORCH_SPEC" >"$CONSTRAINTS"
PIP=("$PY" -m pip install -q -c "$CONSTRAINTS")
install_torch "${PIP[@]}"

if [ "$(installed_version verl)" != "${VERL_SPEC#*==}" ]; then
    echo "[install_verl] installing $VERL_SPEC and its base requirements"
    "${PIP[@]}" "$VERL_SPEC"
    # What verl.experimental.agent_loop imports from its `verl-core` extra (the rest of that extra is CUDA or
    # TransferQueue plumbing the agent loop does not import).
    "${PIP[@]}" cachetools fastapi uvicorn
fi
remove_cuda_extras
# verl's wheel ships its own test suite as a top-level `tests` package, which shadows this repository's tests/
# (tests/conftest.py imports tests.openai_stand_in). Remove the files verl's RECORD lists under tests/.
"$PY" - <<'EOF'
import importlib.metadata as m
import shutil
from pathlib import Path

dist = m.distribution("verl")
if any(f.parts[0] == "tests" for f in dist.files or []) and Path(dist.locate_file("tests")).is_dir():
    shutil.rmtree(Path(dist.locate_file("tests")))
    print("[install_verl] removed verl's top-level tests package (it shadows the repository's tests/)")
EOF

echo "[install_verl] installing medeyes (editable, no dependency resolution) and test tools"
"${PIP[@]}" --no-deps -e "$REPO"
"${PIP[@]}" "gymnasium>=1.0" "shapely>=2.0" "rich>=13.0" "typer>=0.12" "pydantic>=2.6" pillow numpy pyyaml filelock \
    "pytest>=8.0" "hypothesis>=6.100"

"$PY" - <<'EOF'
import importlib.metadata as m

import torch
from verl.experimental.agent_loop import AgentLoopBase  # noqa: F401  (the class MedEyes' loop subclasses)

assert "+cpu" in torch.__version__, f"expected a CPU torch, got {torch.__version__}"
versions = {d: m.version(d) for d in ("verl", "torch", "transformers", "ray", "tensordict")}
print(f"[install_verl] ok: {versions}")
EOF
report_done "$start"
