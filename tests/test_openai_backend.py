"""OpenAIBackend against the scripted stand-in server on 127.0.0.1 (``openai_server``; no vLLM needed).

The stand-in plays a real server only where the point is OUR client's handling of what a server does: the
request it builds, how it parses answers, and how it survives 5xx, dropped connections, junk and silence. The
same backend against a real `vllm serve` is tested in tests/test_vllm_serving.py.
"""

from __future__ import annotations

import base64
import io
import json
import math
import socket
from typing import Any

import pytest
from openai_stand_in import Reply, Request, StandInServer, StartServer, completion
from PIL import Image

from medeyes.agents.backends.openai import (
    BackendError,
    OpenAIBackend,
    ServerHTTPError,
    ServerResponseError,
    ServerUnreachableError,
    parse_chat_completion,
    yes_probability,
)
from medeyes.agents.base import EpisodeContext
from medeyes.agents.policy import GenerationBackend, PolicyAgent, SamplingConfig
from medeyes_env.errors import ConfigError


def backend_for(server: StandInServer, **kwargs: Any) -> OpenAIBackend:
    kwargs.setdefault("model", "tiny")
    kwargs.setdefault("backoff_s", 0.0)
    kwargs.setdefault("content_separator", "")
    kwargs.setdefault("timeout_s", 5.0)
    return OpenAIBackend(server.base_url, **kwargs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def image(value: int = 200) -> Image.Image:
    img = Image.new("L", (40, 30), 10)
    img.putpixel((3, 4), value)
    return img


def conversation(question: str = "Is there a lesion?", img: Image.Image | None = None) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": [{"type": "text", "text": "You are careful."}]},
        {"role": "user", "content": [{"type": "image", "image": img or image()}, {"type": "text", "text": question}]},
    ]


GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12, seed=7)


# ---------------------------------------------------------------------------------------------- no server


def test_server_down_is_a_clear_error() -> None:
    port = free_port()
    backend = OpenAIBackend(f"http://127.0.0.1:{port}/v1", model="tiny", max_retries=1, backoff_s=0.0)
    with pytest.raises(ServerUnreachableError) as info:
        backend.generate([conversation()], GREEDY)
    message = str(info.value)
    assert message.startswith(f"cannot reach http://127.0.0.1:{port}/v1 — is `vllm serve` running? (")
    assert message.endswith("; 2 attempts)")


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ConfigError, match="base_url must start with http"):
        OpenAIBackend("127.0.0.1:8000/v1")
    with pytest.raises(ConfigError, match="max_retries >= 0"):
        OpenAIBackend("http://127.0.0.1:8000/v1", max_retries=-1)


# ---------------------------------------------------------------------------------------------- requests


def test_request_carries_sampling_images_and_vllm_fields(openai_server: StartServer) -> None:
    server = openai_server(lambda request: (200, completion(" <answer>yes</answer>", [11, 12, 13])))
    backend = backend_for(server)
    sampling = SamplingConfig(temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=33, seed=3, stop=["</answer>"])
    (turn,) = backend.generate([conversation(img=image(77))], sampling)

    (payload,) = server.chat_payloads()
    assert payload["model"] == "tiny"
    assert payload["max_tokens"] == 33
    assert payload["temperature"] == 0.7
    assert payload["top_p"] == 0.9
    assert payload["top_k"] == 5
    assert payload["stop"] == ["</answer>"]
    assert payload["seed"] == (3 * 1_000_003) % 2**31
    assert payload["logprobs"] is True
    assert payload["return_token_ids"] is True
    assert payload["return_tokens_as_token_ids"] is True
    assert payload["include_stop_str_in_output"] is True
    system, user = payload["messages"]
    assert system == {"role": "system", "content": [{"type": "text", "text": "You are careful."}]}
    image_part, text_part = user["content"]
    assert text_part == {"type": "text", "text": "Is there a lesion?"}
    url = image_part["image_url"]["url"]
    assert image_part["type"] == "image_url" and url.startswith("data:image/png;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.mode == "RGB" and sent.size == (40, 30)
    assert sent.getpixel((3, 4)) == (77, 77, 77) and sent.getpixel((0, 0)) == (10, 10, 10)

    assert turn.text == " <answer>yes</answer>"  # content_separator="" keeps the leading space
    assert turn.token_ids == [11, 12, 13]
    assert turn.logprobs == pytest.approx([-0.1, -0.2, -0.3])
    assert turn.finish_reason == "stop"


def test_plain_openai_mode_sends_only_standard_fields(openai_server: StartServer) -> None:
    server = openai_server(lambda request: (200, completion("<answer>no</answer>")))
    backend = backend_for(server, vllm_extensions=False)
    backend.generate([conversation()], SamplingConfig(max_new_tokens=4))
    (payload,) = server.chat_payloads()
    standard = {"model", "messages", "max_tokens", "temperature", "top_p", "logprobs", "n", "stop"}
    assert set(payload) == standard  # seed None: not sent
    with pytest.raises(ConfigError, match="top_k is not part of the OpenAI API"):
        backend.generate([conversation()], SamplingConfig(top_k=3))


def test_batch_is_concurrent_ordered_and_seeded_per_conversation(openai_server: StartServer) -> None:
    def respond(request: Request) -> Reply:
        question = request.payload["messages"][-1]["content"][-1]["text"]
        return 200, completion(f"<answer>{question}</answer>", [len(question)])

    server = openai_server(respond, delay_s=0.2)
    backend = backend_for(server)
    batch = [conversation(f"q{i}") for i in range(8)]
    turns = backend.generate(batch, SamplingConfig(seed=5, max_new_tokens=8))
    assert [t.text for t in turns] == [f"<answer>q{i}</answer>" for i in range(8)]
    assert server.max_in_flight > 1  # requests overlapped: the server held several at once
    first = sorted(p["seed"] for p in server.chat_payloads())
    assert first == [(5 * 1_000_003 + i) % 2**31 for i in range(8)]
    backend.generate(batch[:2], SamplingConfig(seed=5, max_new_tokens=8))
    second = sorted(p["seed"] for p in server.chat_payloads()[8:])
    assert second == [(6 * 1_000_003 + i) % 2**31 for i in range(2)]  # call 1 uses base seed + 1


def test_model_name_is_asked_once_when_not_given(openai_server: StartServer) -> None:
    def respond(request: Request) -> Reply:
        if request.path == "/v1/models":
            return 200, json.dumps({"object": "list", "data": [{"id": "served-tiny"}]}).encode()
        return 200, completion("<answer>yes</answer>")

    server = openai_server(respond)
    backend = backend_for(server, model=None)
    backend.generate([conversation(), conversation()], GREEDY)
    assert [p["model"] for p in server.chat_payloads()] == ["served-tiny", "served-tiny"]
    assert [r.path for r in server.requests].count("/v1/models") == 1
    assert backend.describe() == {"type": "openai", "base_url": server.base_url, "model": "served-tiny"}


def test_content_separator_is_detected_from_vllm_tokenize(openai_server: StartServer) -> None:
    def respond(request: Request) -> Reply:
        if request.path == "/tokenize":
            n = 3 if request.payload["add_generation_prompt"] else 6
            return 200, json.dumps({"tokens": list(range(n)), "count": n, "max_model_len": 99}).encode()
        if request.path == "/detokenize":
            assert request.payload["tokens"] == [3, 4, 5]
            return 200, json.dumps({"prompt": " MEDEYESPROBE<end_of_utterance>\n"}).encode()
        return 200, completion(" <answer>yes</answer>")

    server = openai_server(respond)
    backend = backend_for(server, content_separator=None)
    (turn,) = backend.generate([conversation()], GREEDY)
    assert backend.content_separator == " "
    assert turn.text == "<answer>yes</answer>"


def test_content_separator_is_empty_without_tokenize_endpoint(openai_server: StartServer) -> None:
    def respond(request: Request) -> Reply:
        if request.path.startswith("/v1/"):
            return 200, completion(" <answer>yes</answer>")
        return 404, b'{"detail": "Not Found"}'

    backend = backend_for(openai_server(respond), content_separator=None)
    (turn,) = backend.generate([conversation()], GREEDY)
    assert backend.content_separator == ""
    assert turn.text == " <answer>yes</answer>"


def test_text_is_cut_after_the_first_stop_and_ids_fall_back_to_logprob_names() -> None:
    answer = json.loads(completion("<action>{}</action> trailing", [4, 5], finish="stop"))
    del answer["choices"][0]["token_ids"]
    turn = parse_chat_completion(answer, ["</action>", "</answer>"])
    assert turn.text == "<action>{}</action>"
    assert turn.token_ids == [4, 5]


def test_policy_agent_runs_over_the_openai_backend(openai_server: StartServer) -> None:
    server = openai_server(lambda request: (200, completion("<answer>yes</answer>", [1, 2])))
    backend = backend_for(server)
    assert isinstance(backend, GenerationBackend)
    agent = PolicyAgent(backend, GREEDY)
    contexts = [
        EpisodeContext(episode_id=i, case=None, image=image(), messages=conversation(), step=0, max_steps=4)  # type: ignore[arg-type]
        for i in range(3)
    ]
    turns = agent.act(contexts)
    assert [t.text for t in turns] == ["<answer>yes</answer>"] * 3
    assert agent.describe()["backend"]["type"] == "openai"


def test_logprobs_mode_must_match_the_server(openai_server: StartServer) -> None:
    backend = backend_for(openai_server(lambda request: (200, completion("x"))))
    with pytest.raises(ConfigError, match="--logprobs-mode processed_logprobs"):
        backend.generate([conversation()], SamplingConfig(logprobs_mode="processed"))


def test_file_path_images_are_refused(openai_server: StartServer) -> None:
    backend = backend_for(openai_server(lambda request: (200, completion("x"))))
    messages = [{"role": "user", "content": [{"type": "image", "image": "/etc/passwd"}]}]
    with pytest.raises(ConfigError, match="never sends file paths"):
        backend.generate([messages], GREEDY)


# ---------------------------------------------------------------------------------------------- failures


def test_5xx_is_retried_then_succeeds(openai_server: StartServer) -> None:
    replies = iter([(503, b'{"error": {"message": "engine busy"}}'), (200, completion("<answer>no</answer>"))])
    server = openai_server(lambda request: next(replies))
    (turn,) = backend_for(server, max_retries=2).generate([conversation()], GREEDY)
    assert turn.text == "<answer>no</answer>"
    assert len(server.chat_payloads()) == 2


def test_persistent_5xx_reports_the_server_message(openai_server: StartServer) -> None:
    server = openai_server(lambda request: (500, b'{"error": {"message": "EngineCore died", "code": 500}}'))
    with pytest.raises(ServerHTTPError) as info:
        backend_for(server, max_retries=2).generate([conversation()], GREEDY)
    assert str(info.value) == f"{server.base_url}/chat/completions answered HTTP 500 after 3 attempts: EngineCore died"
    assert info.value.status == 500 and info.value.server_message == "EngineCore died"
    assert len(server.chat_payloads()) == 3


def test_4xx_is_not_retried(openai_server: StartServer) -> None:
    body = b'{"object": "error", "message": "max_tokens is too large", "type": "BadRequestError", "code": 400}'
    server = openai_server(lambda request: (400, body))
    with pytest.raises(ServerHTTPError) as info:
        backend_for(server, max_retries=3).generate([conversation()], GREEDY)
    assert str(info.value) == f"{server.base_url}/chat/completions answered HTTP 400: max_tokens is too large"
    assert len(server.chat_payloads()) == 1


def test_dropped_connection_is_retried(openai_server: StartServer) -> None:
    replies = iter([None, (200, completion("<answer>yes</answer>"))])
    server = openai_server(lambda request: next(replies))
    (turn,) = backend_for(server, max_retries=1).generate([conversation()], GREEDY)
    assert turn.text == "<answer>yes</answer>"
    assert len(server.chat_payloads()) == 2


def test_junk_body_is_a_clear_error(openai_server: StartServer) -> None:
    server = openai_server(lambda request: (200, b"<html>502 Bad Gateway</html>"))
    with pytest.raises(ServerResponseError, match=r"answered with something that is not JSON: b'<html>502"):
        backend_for(server).generate([conversation()], GREEDY)


def test_json_that_is_not_a_completion_is_a_clear_error(openai_server: StartServer) -> None:
    server = openai_server(lambda request: (200, b'{"choices": []}'))
    with pytest.raises(ServerResponseError, match=r'answered JSON that is not a chat completion: \{"choices": \[\]\}'):
        backend_for(server).generate([conversation()], GREEDY)


def test_mismatched_ids_and_logprobs_are_refused() -> None:
    answer = json.loads(completion("ab", [1, 2]))
    answer["choices"][0]["logprobs"]["content"].pop()
    with pytest.raises(ServerResponseError, match="2 token ids but 1 log-probabilities"):
        parse_chat_completion(answer, [])


def test_silence_times_out_without_retry(openai_server: StartServer) -> None:
    server = openai_server(lambda request: (200, completion("late")), delay_s=1.0)
    with pytest.raises(BackendError, match=r"gave no answer within timeout_s=0.2 s"):
        backend_for(server, timeout_s=0.2, max_retries=3).generate([conversation()], GREEDY)
    assert len(server.chat_payloads()) == 1


# ---------------------------------------------------------------------------------------------- yes/no


def top_answer(top: dict[str, float]) -> bytes:
    entries = [{"token": t, "logprob": math.log(p)} for t, p in top.items()]
    first = entries[0] if entries else {"token": "x", "logprob": 0.0}
    content = [{**first, "top_logprobs": entries}]
    return json.dumps({"choices": [{"message": {"content": "x"}, "logprobs": {"content": content}}]}).encode()


def test_yes_probability_normalises_over_yes_and_no_variants(openai_server: StartServer) -> None:
    server = openai_server(lambda request: (200, top_answer({" yes": 0.3, " Yes": 0.1, " no": 0.2, " maybe": 0.4})))
    backend = backend_for(server)
    assert yes_probability(backend, conversation("Is any abnormality in this region? Answer yes or no.")) == (
        pytest.approx(0.4 / 0.6)
    )
    (payload,) = server.chat_payloads()
    assert payload["max_tokens"] == 1 and payload["temperature"] == 0.0
    assert payload["logprobs"] is True and payload["top_logprobs"] == 20


def test_yes_probability_without_yes_or_no_tokens(openai_server: StartServer) -> None:
    backend = backend_for(openai_server(lambda request: (200, top_answer({" the": 0.5, " a": 0.2}))))
    assert yes_probability(backend, conversation()) == 0.5
    assert yes_probability(backend, conversation(), default=0.1) == 0.1
    with pytest.raises(ServerResponseError, match=r"no yes/no token among the top 2 candidates \[' the', ' a'\]"):
        yes_probability(backend, conversation(), default=None)
