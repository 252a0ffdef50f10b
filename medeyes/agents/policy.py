"""The VLM policy agent: one :class:`PolicyAgent` over any :class:`GenerationBackend`.

A backend turns a batch of OpenAI-format conversations (``{"role", "content"}`` with content lists of
``{"type": "text", "text"}`` and ``{"type": "image", "image": PIL.Image}``) into one :class:`TurnOutput` per
conversation: the text, the generated token ids exactly as sampled, their log-probabilities and a finish
reason. Backends: :class:`medeyes.agents.backends.transformers.TransformersBackend` (local ``transformers``),
and the OpenAI-server and in-process vLLM backends (``openai_backend``, ``vllm_backend``).

Contract every backend keeps (so rollouts, the trainer and the trajectory store can rely on it):

- ``len(outputs) == len(batch_messages)``, in order.
- Generation stops at the first protocol closing tag in :attr:`SamplingConfig.stop` (``</action>``,
  ``</answer>``), at the model's end-of-turn token, or after ``max_new_tokens``; ``text`` is cut right after
  the closing tag (:func:`truncate_at_stop`) and never contains special tokens.
- ``token_ids`` are the sampled ids up to and including the token that completed the stop (or the
  end-of-turn token), and ``len(logprobs) == len(token_ids)``. They are the training data: never re-tokenise
  ``text`` to recover them (FEASIBILITY point 7).
- ``logprobs`` follow :attr:`SamplingConfig.logprobs_mode`; the default ``"raw"`` is the log-probability
  under the model's own distribution (``log_softmax(logits)``, temperature 1, no top-p/top-k truncation),
  which is what the trainer's forward pass recomputes and what vLLM returns with its default
  ``logprobs_mode="raw_logprobs"``.
- ``finish_reason`` is ``"stop"`` (closing tag or end-of-turn token) or ``"length"`` (token cap).
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from medeyes.agents.base import EpisodeContext, TurnOutput
from medeyes_env.errors import ConfigError

PROTOCOL_STOPS: tuple[str, ...] = ("</action>", "</answer>")
"""Closing tags that end a policy turn: the environment acts on the action or the answer."""


class SamplingConfig(BaseModel):
    """How a policy samples one turn. Paper: temperature 0.7-1.0 during training rollouts."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(default=1.0, ge=0.0, description="Sampling temperature; 0 means greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass; 1 keeps every token.")
    top_k: int = Field(default=0, ge=0, description="Keep only the k most likely tokens; 0 disables.")
    max_new_tokens: int = Field(default=256, ge=1, description="Token cap per turn; a turn that hits it is 'length'.")
    seed: int | None = Field(
        default=None,
        description="Base seed for reproducible sampling; call n of a backend uses seed + n. None: global RNG.",
    )
    stop: list[str] = Field(
        default_factory=lambda: list(PROTOCOL_STOPS),
        description="Strings that end a turn; the text is cut right after the first one.",
    )
    logprobs_mode: Literal["raw", "processed"] = Field(
        default="raw",
        description="'raw': log p of the sampled token under the model (temperature 1, no truncation), what the "
        "trainer recomputes; 'processed': under the distribution actually sampled from (temperature, top-p, top-k).",
    )

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, stop: list[str]) -> list[str]:
        if any(not s for s in stop):
            raise ValueError(f"stop strings must be non-empty, got {stop!r}")
        return stop

    @property
    def greedy(self) -> bool:
        """Whether decoding is greedy (temperature 0)."""
        return self.temperature == 0.0


@runtime_checkable
class GenerationBackend(Protocol):
    """Anything that generates one turn per OpenAI-format conversation.

    Backends may also offer ``describe() -> dict`` (model, checkpoint, device); :class:`PolicyAgent` stores it.
    """

    def generate(self, batch_messages: list[list[dict[str, Any]]], sampling: SamplingConfig) -> list[TurnOutput]:
        """Return one :class:`TurnOutput` per conversation, in order (see the module contract)."""
        ...


def truncate_at_stop(text: str, stops: list[str] | tuple[str, ...]) -> tuple[str, bool]:
    """Cut ``text`` right after the earliest stop string; return the text and whether one was found.

    >>> truncate_at_stop('<answer>yes</answer> and more', ["</action>", "</answer>"])
    ('<answer>yes</answer>', True)
    >>> truncate_at_stop("<reasoning>unfinished", ["</answer>"])
    ('<reasoning>unfinished', False)
    """
    best = -1
    for stop in stops:
        index = text.find(stop)
        if index >= 0 and (best < 0 or index + len(stop) < best):
            best = index + len(stop)
    return (text[:best], True) if best >= 0 else (text, False)


_TURN_IDS = "policy_turn_token_ids"


class PolicyAgent:
    """An :class:`~medeyes.agents.base.Agent` that asks a generation backend for each episode's next turn."""

    def __init__(self, backend: GenerationBackend, sampling: SamplingConfig | None = None, name: str = "policy"):
        """Wrap ``backend``; ``sampling`` defaults to :class:`SamplingConfig` ()."""
        if not isinstance(backend, GenerationBackend):
            raise ConfigError(f"backend {type(backend).__name__} has no generate(batch_messages, sampling) method")
        self.backend = backend
        self.sampling = sampling or SamplingConfig()
        self.name = name

    def act(self, batch: list[EpisodeContext]) -> list[TurnOutput]:
        """Generate the next turn of every episode in ``batch``, in order."""
        if not batch:
            return []
        messages = [context.messages for context in batch]
        if getattr(self.backend, "accepts_turn_token_ids", False):
            earlier = [context.state.get(_TURN_IDS, []) for context in batch]
            outputs = self.backend.generate(messages, self.sampling, turn_token_ids=earlier)  # type: ignore[call-arg]
        else:
            outputs = self.backend.generate(messages, self.sampling)
        if len(outputs) != len(batch):
            raise ConfigError(
                f"backend {type(self.backend).__name__} returned {len(outputs)} turns for {len(batch)} episodes; "
                "a backend must return exactly one turn per conversation"
            )
        for context, output in zip(batch, outputs, strict=True):
            # Remember the sampled ids so the next turn's prompt spells this one exactly (None: text from then on).
            earlier = context.state.get(_TURN_IDS, [])
            known = earlier is not None and output.token_ids is not None
            context.state[_TURN_IDS] = [*earlier, list(output.token_ids)] if known else None  # type: ignore[misc]
        return outputs

    def describe(self) -> dict[str, Any]:
        """Name, backend description and sampling config, stored on every trajectory."""
        describe = getattr(self.backend, "describe", None)
        backend = describe() if callable(describe) else {"type": type(self.backend).__name__}
        return {"name": self.name, "kind": "policy", "backend": backend, "sampling": self.sampling.model_dump()}
