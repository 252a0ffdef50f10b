"""Weight sync into vLLM: after a sync with perturbed weights, vLLM's greedy turns equal transformers' on them.

vllm-marked tests run under ``.venv-vllm`` (CI stage 3); the version check and the tensor packing run everywhere.
The perturbation is checked to change the reference's own output first, so a sync that did nothing fails.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from vllm_helpers import build_vllm_model, conversations

from medeyes.agents.backends.vllm_weights import (
    VLLMVersionError,
    check_vllm_version,
    pack_weights,
    parse_version,
    unpack_weights,
)
from medeyes.agents.policy import SamplingConfig
from medeyes_env.errors import ConfigError

HAS_VLLM = importlib.util.find_spec("vllm") is not None
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=24, seed=0)
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not importable in this python; run under .venv-vllm")


def test_version_check_refuses_old_vllm_and_names_the_fix() -> None:
    check_vllm_version("0.32.0", "here")
    check_vllm_version("0.33.1.dev4+g1234", "here")
    with pytest.raises(VLLMVersionError, match=r"vLLM 0\.31\.9 \(server\) is older than 0\.32\.0") as info:
        check_vllm_version("0.31.9", "server")
    assert "grpo.rollout_backend=transformers" in str(info.value)
    assert parse_version("1.0") == (1, 0, 0)
    with pytest.raises(VLLMVersionError, match="cannot read a version number"):
        parse_version("unknown")


def test_pack_round_trips_every_dtype() -> None:
    weights = [
        ("a", torch.randn(3, 4)),
        ("b", torch.randn(5).to(torch.bfloat16)),
        ("c", torch.arange(6, dtype=torch.int64).reshape(2, 3)),
    ]
    back = unpack_weights(pack_weights(weights))
    assert [name for name, _ in back] == ["a", "b", "c"]
    for (_, want), (_, got) in zip(weights, back, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert unpack_weights(pack_weights([("a", weights[0][1])], torch.bfloat16))[0][1].dtype == torch.bfloat16


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in model.named_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def assert_same_turns(got: list[Any], want: list[Any]) -> None:
    for turn, expected in zip(got, want, strict=True):
        assert turn.token_ids == expected.token_ids
        assert turn.text.rstrip("\ufffd") == expected.text.rstrip("\ufffd")  # see test_vllm_serving.py
        assert np.abs(np.array(turn.logprobs) - np.array(expected.logprobs)).max() < 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vllm_model(tmp_path_factory.mktemp("vllm-sync") / "model")


@pytest.fixture()
def reference(model_dir: Path) -> Any:
    from medeyes.agents.backends.transformers import TransformersBackend

    return TransformersBackend.from_pretrained(str(model_dir))


def perturbed_reference(reference: Any) -> list[Any]:
    """Perturb the reference in place; its greedy turns must change (else the test could not fail)."""
    before = reference.generate(conversations(), GREEDY)
    perturb(reference.model, seed=1)
    after = reference.generate(conversations(), GREEDY)
    assert all(a.token_ids != b.token_ids for a, b in zip(before, after, strict=True))
    return after


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[Any]:
    from medeyes.agents.backends.vllm import VLLMBackend

    backend = VLLMBackend(model_dir, max_model_len=2048, weight_sync=True)
    yield backend
    backend.close()


@pytest.mark.vllm
@needs_vllm
def test_in_process_sync_matches_transformers_on_perturbed_weights(engine: Any, reference: Any) -> None:
    original = engine.generate(conversations(), GREEDY)
    assert_same_turns(original, reference.generate(conversations(), GREEDY))
    want = perturbed_reference(reference)
    sent = engine.sync_weights(reference.model)
    assert sent == sum(p.numel() * 4 for _, p in reference.model.named_parameters(remove_duplicate=False))
    assert_same_turns(engine.generate(conversations(), GREEDY), want)
    perturb(reference.model, seed=2)  # a second sync: the engine follows every optimizer step
    engine.sync_weights(reference.model)
    assert_same_turns(engine.generate(conversations(), GREEDY), reference.generate(conversations(), GREEDY))


@pytest.mark.vllm
@needs_vllm
def test_server_sync_matches_transformers_and_plain_server_fails_closed(
    model_dir: Path, reference: Any, tmp_path: Path
) -> None:
    from medeyes.agents.backends.openai import OpenAIBackend
    from medeyes.agents.backends.vllm_server import VLLMServer
    from medeyes.agents.backends.vllm_weights import check_server_reload, sync_server

    with VLLMServer(model_dir, max_model_len=2048, dev_mode=True) as server:
        assert check_server_reload(server.base_url) == "0.32.0"
        client = OpenAIBackend(server.base_url, api_key=server.api_key)
        want = perturbed_reference(reference)
        sync_server(server.base_url, reference.model, tmp_path / "weights")
        assert_same_turns(client.generate(conversations(), GREEDY), want)
    with VLLMServer(model_dir, max_model_len=2048) as plain, pytest.raises(ConfigError) as info:
        check_server_reload(plain.base_url)
    assert "has no POST /collective_rpc, which vLLM serves only in development mode" in str(info.value)
    assert "VLLM_SERVER_DEV_MODE=1" in str(info.value)
