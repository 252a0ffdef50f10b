"""Generation over HTTP against any OpenAI-compatible chat server, such as ``vllm serve``.

:class:`OpenAIBackend` keeps the :class:`~medeyes.agents.policy.GenerationBackend` contract of
:mod:`medeyes.agents.policy` with nothing but the standard library (``urllib.request`` and a thread pool,
one request per conversation of a batch, so the server batches them itself); a loopback server is reached
without any proxy (:mod:`medeyes.agents.backends.http_client`).

Request, per conversation: ``POST {base_url}/chat/completions`` with the messages (PIL images become PNG
``data:`` URLs, converted to RGB like the local backend does), ``max_tokens``, ``temperature``, ``top_p``,
``stop``, ``seed`` and ``logprobs: true``. With ``vllm_extensions`` (default) it also asks vLLM for
``return_token_ids`` (the sampled ids, exactly), ``return_tokens_as_token_ids`` (logprob entries named
``token_id:123``, a fallback source of the ids), ``include_stop_str_in_output`` (the text keeps its closing
tag, as the contract wants), ``skip_special_tokens`` and ``top_k``. A plain OpenAI server rejects unknown
fields, so pass ``vllm_extensions=False`` there: the turn then has no token ids and its text lacks the stop
string.

Text: the contract wants the assistant CONTENT, without the separator the chat template puts between the
generation prompt and the content (Idefics3 renders ``Assistant:`` but a past turn as ``Assistant: text``, so
the first generated token carries a space). ``content_separator=None`` detects it once from vLLM's
``/tokenize`` and ``/detokenize`` endpoints (empty when they are missing); pass a string to set it.

Seeds: call ``n`` (counted from 0) with base seed ``s`` sends conversation ``i`` the seed
``(s + n) * 1_000_003 + i`` (mod 2^31), so the rollouts of one prompt differ and each is reproducible
whatever the server batched it with (:mod:`medeyes.agents.backends.seeds`).

Log-probabilities: vLLM returns what its ``--logprobs-mode`` says (default ``raw_logprobs``, which is
``SamplingConfig.logprobs_mode="raw"``); the mode is a server setting, so a request whose mode differs from
``server_logprobs_mode`` is refused rather than silently mislabelled.

Errors are :class:`BackendError` subclasses with the URL and the server's own message. Connection errors and
HTTP 5xx are retried ``max_retries`` times with exponential backoff; 4xx, timeouts and malformed answers are not.

:func:`yes_probability` turns a yes/no question into a probability with one generated token and its
``top_logprobs``: the confidence of the expert's VLM region oracle.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from PIL import Image

from medeyes.agents.backends.http_client import open_url
from medeyes.agents.backends.seeds import SeededCalls, request_seed
from medeyes.agents.base import TurnOutput
from medeyes.agents.policy import SamplingConfig, truncate_at_stop
from medeyes_env.errors import ConfigError, MedEyesError

_SEPARATOR_PROBE = "MEDEYESPROBE"


class BackendError(MedEyesError, RuntimeError):
    """A generation backend could not produce a turn (server down, server error, malformed answer)."""


class ServerUnreachableError(BackendError):
    """Nothing answers at the server's address, or the connection broke, after all retries."""


class ServerHTTPError(BackendError):
    """The server answered with an HTTP error status; ``status`` and the server's ``server_message`` are kept."""

    def __init__(self, message: str, status: int, server_message: str) -> None:
        super().__init__(message)
        self.status = status
        self.server_message = server_message


class ServerResponseError(BackendError):
    """The server answered 200 with something that is not a chat completion (junk JSON, missing fields)."""


def image_data_url(image: Image.Image) -> str:
    """Encode a PIL image as an RGB PNG ``data:`` URL.

    >>> image_data_url(Image.new("L", (2, 2))).startswith("data:image/png;base64,")
    True
    """
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _wire_part(part: dict[str, Any]) -> dict[str, Any]:
    """One content part in the OpenAI wire format: images become ``image_url`` parts with data URLs."""
    kind = part.get("type")
    if kind not in ("image", "image_url"):
        return part
    value = part.get("image", part.get("image_url"))
    if isinstance(value, dict):
        value = value.get("url")
    if isinstance(value, Image.Image):
        return {"type": "image_url", "image_url": {"url": image_data_url(value)}}
    if isinstance(value, str) and value.startswith("data:image/"):
        return {"type": "image_url", "image_url": {"url": value}}
    raise ConfigError(
        f"image content part must hold a PIL image or a data: URL, got {type(value).__name__}; "
        "the OpenAI backend never sends file paths or remote URLs to the server"
    )


def wire_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Convert one conversation (images as PIL) to JSON-ready OpenAI chat messages.

    >>> wire_messages([{"role": "user", "content": "hi"}])
    [{'role': 'user', 'content': 'hi'}]
    """
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            message = {**message, "content": [_wire_part(part) for part in content]}
        out.append(message)
    return out


def _token_id(entry: dict[str, Any]) -> int | None:
    """The id in a vLLM ``token_id:123`` logprob entry, or None for a plain token string."""
    token = entry.get("token")
    if isinstance(token, str) and token.startswith("token_id:"):
        try:
            return int(token.removeprefix("token_id:"))
        except ValueError:
            return None
    return None


class OpenAIBackend(SeededCalls):
    """Generate policy turns through an OpenAI-compatible ``/v1/chat/completions`` endpoint (module docstring)."""

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        *,
        backoff_s: float = 0.5,
        max_concurrency: int = 32,
        vllm_extensions: bool = True,
        content_separator: str | None = None,
        server_logprobs_mode: Literal["raw", "processed"] = "raw",
        suppress_token_ids: tuple[int, ...] = (),
    ) -> None:
        """Point the backend at ``base_url`` (ending in ``/v1``); ``model=None`` takes the server's first model.

        Args:
            base_url: the server's OpenAI root, e.g. ``http://127.0.0.1:8000/v1``.
            model: the served model name; None asks ``GET /models`` once, on first use.
            api_key: sent as ``Authorization: Bearer``; vLLM checks it only when started with ``--api-key``.
            timeout_s: seconds to wait for one answer; a request that times out is not retried.
            max_retries: extra attempts after a connection error or an HTTP 5xx.
            backoff_s: first retry delay; it doubles on each further retry.
            max_concurrency: most requests in flight at once for one batch.
            vllm_extensions: send vLLM's extra request fields (token ids, stop string kept in the text, top_k).
            content_separator: text to strip from the start of every turn; None detects it from the server.
            server_logprobs_mode: what the server's ``--logprobs-mode`` returns (vLLM default: raw).
            suppress_token_ids: ids never to sample (``logit_bias`` -100), e.g. the image placeholder: a sampled
                placeholder has no pixels and breaks every later forward pass over the episode.

        """
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url must start with http:// or https://, got {base_url!r}")
        if timeout_s <= 0 or max_retries < 0 or backoff_s < 0 or max_concurrency < 1:
            raise ConfigError(
                f"need timeout_s > 0, max_retries >= 0, backoff_s >= 0 and max_concurrency >= 1; got "
                f"{timeout_s}, {max_retries}, {backoff_s}, {max_concurrency}"
            )
        self.base_url = base_url.rstrip("/")
        self._model = model
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_concurrency = max_concurrency
        self.vllm_extensions = vllm_extensions
        self._separator = content_separator
        self.server_logprobs_mode = server_logprobs_mode
        self.suppress_token_ids = tuple(suppress_token_ids)
        super().__init__()  # the call counter the seeds come from

    # ------------------------------------------------------------------------------------------- HTTP

    @property
    def server_root(self) -> str:
        """The server's address without the ``/v1`` suffix (where vLLM serves ``/health`` and ``/tokenize``)."""
        return self.base_url.removesuffix("/v1")

    def _request(self, url: str, payload: dict[str, Any] | None) -> Any:
        """Send one request (POST with ``payload``, GET without) and return the decoded JSON, with retries."""
        headers = {"Accept": "application/json"}
        data = None
        if payload is not None:
            data = json.dumps(payload).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        attempt = 0
        while True:
            request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
            try:
                with open_url(request, timeout=self.timeout_s) as response:
                    body = response.read()
                break
            except urllib.error.HTTPError as error:
                server_message = _server_message(error.read())
                if error.code >= 500 and attempt < self.max_retries:
                    attempt = self._sleep(attempt)
                    continue
                raise ServerHTTPError(
                    f"{url} answered HTTP {error.code}"
                    + (f" after {attempt + 1} attempts" if attempt else "")
                    + f": {server_message}",
                    status=error.code,
                    server_message=server_message,
                ) from None
            except TimeoutError as error:
                raise BackendError(
                    f"{url} gave no answer within timeout_s={self.timeout_s:g} s; raise timeout_s or lower "
                    "max_new_tokens"
                ) from error
            except (urllib.error.URLError, ConnectionError, http.client.HTTPException) as error:
                reason = getattr(error, "reason", error)
                if isinstance(reason, TimeoutError):
                    raise BackendError(
                        f"{url} gave no answer within timeout_s={self.timeout_s:g} s; raise timeout_s"
                    ) from error
                if attempt < self.max_retries:
                    attempt = self._sleep(attempt)
                    continue
                raise ServerUnreachableError(
                    f"cannot reach {self.base_url} — is `vllm serve` running? ({reason}; {attempt + 1} attempts)"
                ) from None
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ServerResponseError(
                f"{url} answered with something that is not JSON: {body[:200]!r}; is {self.base_url} an "
                "OpenAI-compatible server?"
            ) from None

    def _sleep(self, attempt: int) -> int:
        time.sleep(self.backoff_s * 2**attempt)
        return attempt + 1

    # ------------------------------------------------------------------------------------------- server facts

    @property
    def model(self) -> str:
        """The served model name (asked from ``GET /models`` when not given)."""
        if self._model is None:
            answer = self._request(f"{self.base_url}/models", None)
            try:
                self._model = str(answer["data"][0]["id"])
            except (KeyError, IndexError, TypeError):
                raise ServerResponseError(
                    f"{self.base_url}/models lists no model ({str(answer)[:200]}); pass model= explicitly"
                ) from None
        return self._model

    @property
    def content_separator(self) -> str:
        """Text between the generation prompt and a turn's content in the chat template ('' when unknown)."""
        if self._separator is None:
            self._separator = self._detect_separator() if self.vllm_extensions else ""
        return self._separator

    def _detect_separator(self) -> str:
        probe = [{"role": "user", "content": [{"type": "text", "text": "q"}]}]
        turn = [*probe, {"role": "assistant", "content": [{"type": "text", "text": _SEPARATOR_PROBE}]}]
        try:
            prompt = self._request(
                f"{self.server_root}/tokenize", {"model": self.model, "messages": probe, "add_generation_prompt": True}
            )["tokens"]
            full = self._request(
                f"{self.server_root}/tokenize", {"model": self.model, "messages": turn, "add_generation_prompt": False}
            )["tokens"]
            if full[: len(prompt)] != prompt:
                return ""
            rest = self._request(f"{self.server_root}/detokenize", {"model": self.model, "tokens": full[len(prompt) :]})
            text = str(rest["prompt"])
        except (ServerHTTPError, ServerResponseError, KeyError, TypeError):
            return ""  # not vLLM, or an older vLLM: no separator stripping
        index = text.find(_SEPARATOR_PROBE)
        return text[:index] if index > 0 else ""

    def describe(self) -> dict[str, Any]:
        """Backend type, server address and model name."""
        return {"type": "openai", "base_url": self.base_url, "model": self._model}

    # ------------------------------------------------------------------------------------------- generation

    def _payload(self, messages: list[dict[str, Any]], sampling: SamplingConfig, seed: int | None) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": wire_messages(messages),
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "logprobs": True,
            "n": 1,
        }
        if sampling.stop:
            payload["stop"] = list(sampling.stop)
        if seed is not None:
            payload["seed"] = seed
        if self.suppress_token_ids:
            payload["logit_bias"] = {str(i): -100 for i in self.suppress_token_ids}
        if self.vllm_extensions:
            payload.update(
                return_token_ids=True,
                return_tokens_as_token_ids=True,
                include_stop_str_in_output=True,
                skip_special_tokens=True,
            )
            if sampling.top_k > 0:
                payload["top_k"] = sampling.top_k
        elif sampling.top_k > 0:
            raise ConfigError("top_k is not part of the OpenAI API; use vllm_extensions=True or top_k=0")
        return payload

    def generate(self, batch_messages: list[list[dict[str, Any]]], sampling: SamplingConfig) -> list[TurnOutput]:
        """One :class:`TurnOutput` per conversation, requests sent concurrently (contract in ``policy``)."""
        if sampling.logprobs_mode != self.server_logprobs_mode:
            raise ConfigError(
                f"sampling.logprobs_mode={sampling.logprobs_mode!r} but the server returns "
                f"{self.server_logprobs_mode!r} log-probabilities (a server-wide setting: vLLM "
                f"`--logprobs-mode {sampling.logprobs_mode}_logprobs`); make the two agree"
            )
        if not batch_messages:
            return []
        call = self.next_call()
        separator = self.content_separator  # detect once, before the threads start
        seeds = [request_seed(sampling.seed, call, i) for i in range(len(batch_messages))]
        payloads = [self._payload(m, sampling, s) for m, s in zip(batch_messages, seeds, strict=True)]
        url = f"{self.base_url}/chat/completions"
        if len(payloads) == 1:
            answers = [self._request(url, payloads[0])]
        else:
            with ThreadPoolExecutor(max_workers=min(len(payloads), self.max_concurrency)) as pool:
                answers = list(pool.map(lambda p: self._request(url, p), payloads))
        return [parse_chat_completion(answer, sampling.stop, separator, url) for answer in answers]


def parse_chat_completion(answer: Any, stops: list[str], separator: str = "", url: str = "server") -> TurnOutput:
    """Turn one ``chat.completion`` JSON answer into a :class:`TurnOutput`.

    >>> answer = {"choices": [{"message": {"content": " <answer>yes</answer>"}, "finish_reason": "stop",
    ...     "token_ids": [5, 9], "logprobs": {"content": [{"token": "token_id:5", "logprob": -0.5},
    ...     {"token": "token_id:9", "logprob": -0.25}]}}]}
    >>> parse_chat_completion(answer, ["</answer>"], separator=" ")
    TurnOutput(text='<answer>yes</answer>', token_ids=[5, 9], logprobs=[-0.5, -0.25], finish_reason='stop')
    """
    try:
        choice = answer["choices"][0]
        content = choice["message"].get("content") or ""
        finish_reason = choice.get("finish_reason")
        entries = (choice.get("logprobs") or {}).get("content") or []
        logprobs = [float(entry["logprob"]) for entry in entries]
        token_ids = choice.get("token_ids")
    except (KeyError, IndexError, TypeError, AttributeError, ValueError):
        raise ServerResponseError(
            f"{url} answered JSON that is not a chat completion: {json.dumps(answer)[:300]}"
        ) from None
    if not isinstance(content, str):
        raise ServerResponseError(f"{url} answered a non-text message content: {str(content)[:200]}")
    if token_ids is None and entries:
        ids = [_token_id(entry) for entry in entries]
        token_ids = None if any(i is None for i in ids) else ids
    if token_ids is not None:
        token_ids = [int(t) for t in token_ids]
        if logprobs and len(logprobs) != len(token_ids):
            raise ServerResponseError(
                f"{url} answered {len(token_ids)} token ids but {len(logprobs)} log-probabilities"
            )
    text, _ = truncate_at_stop(content, stops)
    if separator and text.startswith(separator):
        text = text[len(separator) :]
    return TurnOutput(text=text, token_ids=token_ids, logprobs=logprobs or None, finish_reason=finish_reason)


def _server_message(body: bytes) -> str:
    """The error text of an HTTP error body: OpenAI's ``{"error": {"message"}}``, FastAPI's ``detail``, or raw."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return text[:500] or "(empty body)"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:500]
        for key in ("message", "detail", "error"):
            if data.get(key):
                return str(data[key])[:500]
    return text[:500]


# ------------------------------------------------------------------------------------------------ yes/no oracle

YES_WORDS: tuple[str, ...] = ("yes", "y", "true")
NO_WORDS: tuple[str, ...] = ("no", "n", "false")


def yes_no_from_top_logprobs(
    top: list[dict[str, Any]], yes_words: tuple[str, ...] = YES_WORDS, no_words: tuple[str, ...] = NO_WORDS
) -> tuple[float, float]:
    """Sum the probabilities of yes-like and no-like tokens among one position's ``top_logprobs``.

    Tokens are compared after stripping whitespace and punctuation and lower-casing (" Yes", "YES." count).

    >>> top = [{"token": " Yes", "logprob": math.log(0.6)}, {"token": "no", "logprob": math.log(0.2)}]
    >>> yes_no_from_top_logprobs([*top, {"token": "maybe", "logprob": math.log(0.1)}])
    (0.6, 0.2)
    """
    p_yes = p_no = 0.0
    for entry in top:
        word = str(entry.get("token", "")).strip().strip(".,!:;\"'").lower()
        p = math.exp(float(entry["logprob"]))
        if word in yes_words:
            p_yes += p
        elif word in no_words:
            p_no += p
    return round(p_yes, 12), round(p_no, 12)


def yes_probability(
    backend: OpenAIBackend,
    messages: list[dict[str, Any]],
    *,
    top_logprobs: int = 20,
    default: float | None = 0.5,
) -> float:
    """P("yes") for a yes/no question: one greedy token, yes-like over yes-like plus no-like probability mass.

    The expert's VLM oracle calls this (confidence = probability of "yes"). The question should ask for a
    one-word answer. Only ``top_logprobs`` (at most 20 in the OpenAI API) candidates are seen; when none of
    them is a yes or no word the answer is ``default`` (None: raise :class:`ServerResponseError`).
    """
    if not 1 <= top_logprobs <= 20:
        raise ConfigError(f"top_logprobs must be in 1..20, got {top_logprobs}")
    payload: dict[str, Any] = {
        "model": backend.model,
        "messages": wire_messages(messages),
        "max_tokens": 1,
        "temperature": 0.0,
        "logprobs": True,
        "top_logprobs": top_logprobs,
    }
    url = f"{backend.base_url}/chat/completions"
    answer = backend._request(url, payload)
    try:
        top = answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    except (KeyError, IndexError, TypeError):
        raise ServerResponseError(
            f"{url} answered without top_logprobs ({json.dumps(answer)[:300]}); the server must support logprobs"
        ) from None
    p_yes, p_no = yes_no_from_top_logprobs(top)
    if p_yes + p_no <= 0.0:
        if default is None:
            seen = [entry.get("token") for entry in top]
            raise ServerResponseError(f"no yes/no token among the top {len(top)} candidates {seen}")
        return default
    return p_yes / (p_yes + p_no)
