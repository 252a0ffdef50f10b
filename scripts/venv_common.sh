# Sourced by scripts/install_openrlhf.sh and scripts/install_vllm_cpu.sh: the venv steps they share.
#
# The caller sets TAG (log prefix), VENV, PYTHON and TORCH_SPEC, then calls, in order:
#   venv_create             create $VENV with $PYTHON unless it exists; sets PY (the venv's python)
#   installed_version DIST  print DIST's installed version in $VENV, or nothing
#   install_torch PIP...    install $TORCH_SPEC with the pip command PIP... unless that version is there
#   remove_cuda_extras      uninstall torchvision/torchaudio/torchcodec: their PyPI builds do not load against CPU torch
#   report_done START       the closing line: seconds since START and the venv's size

venv_create() {
    if [ ! -x "$VENV/bin/python" ]; then
        echo "[$TAG] creating venv $VENV with $PYTHON"
        "$PYTHON" -m venv "$VENV"
        "$VENV/bin/python" -m pip install -q --upgrade pip
    fi
    PY="$VENV/bin/python"
}

installed_version() {  # prints the installed version of a distribution, or nothing
    "$PY" - "$1" <<'PYEOF'
import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass
PYEOF
}

install_torch() {  # torch FIRST, from the local CPU wheel: a bare `torch` from PyPI is a multi-GB CUDA build
    if [ "$(installed_version torch)" != "${TORCH_SPEC#*==}" ]; then
        echo "[$TAG] installing $TORCH_SPEC (local CPU wheel)"
        if ! "$@" "$TORCH_SPEC"; then
            echo "[$TAG] ERROR: could not install $TORCH_SPEC. It must come from a local wheel" >&2
            echo "  (pip find-links) or the PyTorch CPU index (--extra-index-url https://download.pytorch.org/whl/cpu)." >&2
            exit 1
        fi
    fi
}

remove_cuda_extras() {
    for dist in torchvision torchaudio torchcodec; do
        if [ -n "$(installed_version "$dist")" ]; then
            echo "[$TAG] removing $dist (its PyPI build does not load against $TORCH_SPEC)"
            "$PY" -m pip uninstall -q -y "$dist"
        fi
    done
}

report_done() {
    echo "[$TAG] done in $(($(date +%s) - $1)) s; venv size $(du -sh "$VENV" | cut -f1)"
}
