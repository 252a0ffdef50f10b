"""Pick a generation backend by name, for the CLI (``medeyes rollout --agent policy --backend ...``).

``transformers`` (default) and ``vllm`` load a model in this process; ``openai`` talks to a server such as
``vllm serve`` (docs/vllm.md). Heavy imports happen only for the backend asked for.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal, get_args

from medeyes.agents.policy import GenerationBackend
from medeyes_env.errors import ConfigError

BackendName = Literal["transformers", "openai", "vllm"]
BACKENDS: tuple[str, ...] = get_args(BackendName)
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


def make_backend(
    backend: str = "transformers",
    model: str | None = None,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    timeout_s: float = 60.0,
    **options: Any,
) -> GenerationBackend:
    """Build the named backend.

    Args:
        backend: ``transformers``, ``openai`` or ``vllm``.
        model: local backends: a model directory or alias (default ``tiny``); ``openai``: the served model name
            (default: the first model the server lists).
        base_url: ``openai`` only: the server's OpenAI root (default ``http://127.0.0.1:8000/v1``).
        api_key: ``openai`` only: sent as a bearer token.
        device: ``transformers`` only: torch device.
        dtype: local backends: weights dtype (default float32 on CPU).
        timeout_s: ``openai`` only: seconds to wait for one answer.
        **options: passed to the backend's constructor as they are.

    >>> make_backend("openai", base_url="http://127.0.0.1:9/v1").describe()
    {'type': 'openai', 'base_url': 'http://127.0.0.1:9/v1', 'model': None}
    >>> make_backend("vlm")
    Traceback (most recent call last):
    ...
    medeyes_env.errors.ConfigError: unknown backend 'vlm'; did you mean 'vllm'? Choose from transformers, openai, vllm

    """
    if backend not in BACKENDS:
        close = difflib.get_close_matches(backend, BACKENDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown backend {backend!r}{hint} Choose from {', '.join(BACKENDS)}")
    if backend != "openai" and (base_url is not None or api_key is not None):
        raise ConfigError(f"--base-url and --api-key apply to the openai backend, not {backend!r}")
    if backend == "openai":
        from medeyes.agents.backends.openai import OpenAIBackend

        return OpenAIBackend(base_url or DEFAULT_BASE_URL, model, api_key=api_key, timeout_s=timeout_s, **options)
    if backend == "vllm":
        from medeyes.agents.backends.vllm import VLLMBackend

        return VLLMBackend(model or "tiny", **({"dtype": dtype} if dtype else {}), **options)
    from medeyes.agents.backends.transformers import TransformersBackend

    return TransformersBackend.from_pretrained(model or "tiny", device=device, dtype=dtype, **options)
