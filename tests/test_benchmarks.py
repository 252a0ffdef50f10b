"""The prepared GPU check runs end to end on CPU (tiny preset), so the script the H200 gets is not untested."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_train_mfu_smoke_run_on_cpu(tmp_path):
    out = tmp_path / "mfu.json"
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "gpu_train_mfu.py"),
        *("--device", "cpu", "--preset", "tiny", "--seconds", "1", "--warmup", "1", "--cases", "2"),
        *("--batch", "2", "--max-steps", "2", "--gen-batch-sizes", "2", "--gen-batches", "1", "--gen-tokens", "4"),
        *("--out", str(out)),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MFU (of 790 TFLOP/s)" in result.stdout
    measured = json.loads(out.read_text())
    assert measured["train"]["steps"] >= 1 and measured["train"]["tokens_per_second"] > 0
    assert 0 < measured["train"]["mfu"] < 1
    assert measured["generate"][0]["new_tokens"] == 2 * 4  # no stop strings: exactly batch x tokens


def test_gpu_train_mfu_refuses_cuda_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_train_mfu.py"), "--out", str(tmp_path / "x.json")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "no CUDA device" in result.stderr
