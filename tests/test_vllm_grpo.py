"""``medeyes train`` with vLLM rollouts (grpo.rollout_backend vllm / vllm-server) on the tiny model, under .venv-vllm.

A short sft + grpo run: the engine receives the weights before every grpo step (the sft steps changed them, and
so does each grpo step), the rollouts' behaviour log-probs are within float noise of the trainer's
recomputation, truncated importance sampling sees those log-probs (weights near 1), and every parameter trains.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

HAS_VLLM = importlib.util.find_spec("vllm") is not None
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not HAS_VLLM, reason="vllm is not importable in this python; run under .venv-vllm"),
]


@pytest.mark.parametrize("backend", ["vllm", "vllm-server"])
def test_grpo_with_vllm_rollouts_syncs_every_step(backend: str, tmp_path: Path, monkeypatch) -> None:
    from medeyes.models.factory import ensure_tiny_model
    from medeyes.training.config import build_config, preset
    from medeyes.training.metrics import read_metrics
    from medeyes.training.trainer import train

    monkeypatch.setenv("MEDEYES_CACHE", str(tmp_path / "cache"))
    start = ensure_tiny_model("idefics3", "tiny")
    data = preset("tiny").model_dump(mode="json")
    data["run_dir"] = str(tmp_path / "run")
    overrides = {
        "grpo.rollout_backend": backend,
        "grpo.steps": 3,
        "grpo.old_logprobs": "recompute",
        "objective.tis_cap": 2.0,
        "grpo.vllm.max_model_len": 2048,
        "tensorboard": False,
        "progress": False,
    }
    cfg = build_config(data, overrides)
    train(cfg, resume=False)
    grpo = [r for r in read_metrics(cfg.run_dir) if r.get("train/stage") == 1.0]
    assert len(grpo) == 3
    assert all(r["train/sync_bytes"] > 0 for r in grpo)  # each step's weights reached the engine
    assert all(r["train/sync_seconds"] > 0 for r in grpo)
    # vLLM is not the trainer: a small, nonzero gap (measured 1e-3 to 2.5e-3 on this nearly random model, 6e-5 on
    # the trained one in benchmarks/grpo_rollout_backends.py); transformers rollouts give ~2e-7
    assert all(0 < r["stream/on/behaviour_logprob_gap"] < 1e-2 for r in grpo)
    assert all(r["stream/on/tokens"] > 0 for r in grpo)
    assert all(abs(r["stream/on/tis_weight_mean"] - 1.0) < 1e-2 for r in grpo)
    from safetensors.torch import load_file

    before = load_file(str(Path(start) / "model.safetensors"))
    after = load_file(str(cfg.run_dir / "final" / "model.safetensors"))
    assert before.keys() == after.keys() and all(not before[k].equal(after[k]) for k in before)
