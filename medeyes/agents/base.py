"""The one interface every agent implements, so one rollout driver serves them all.

The driver keeps a batch of live episodes; each round it hands the agent one
:class:`EpisodeContext` per live episode and gets back one :class:`TurnOutput`
per context, in the same order. Policies read ``messages`` (OpenAI chat format,
built by ``MedEyesEnv.chat_messages``); the expert, which has privileged access
to the case like a clinician's reference annotations, reads ``case`` and ``image``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from PIL import Image
from pydantic import BaseModel, Field

from medeyes_env.cases import Box, Case
from medeyes_env.protocol import BoxFormat


@dataclass
class EpisodeContext:
    """What an agent may look at before producing its next turn."""

    episode_id: int
    case: Case
    image: Image.Image
    """The full-resolution original image."""
    messages: list[dict[str, Any]]
    """The episode so far as OpenAI-format chat messages (images as PIL)."""
    step: int
    """Number of turns already taken in this episode."""
    max_steps: int
    explored: list[Box] = field(default_factory=list)
    """Boxes looked at so far (scan and drill), in original-image pixels."""
    state: dict[str, Any] = field(default_factory=dict)
    """Scratch space the agent may keep per episode (the expert stores its GRN state here)."""
    box_format: BoxFormat = field(default_factory=BoxFormat)
    """How the environment expects boxes to be written (agents that render text must use it)."""


class TurnOutput(BaseModel):
    """One turn of model text, with the generation's tokens when the backend provides them."""

    text: str
    token_ids: list[int] | None = Field(default=None, description="Generated token ids, exactly as sampled.")
    logprobs: list[float] | None = Field(default=None, description="Per-token log-probabilities of token_ids.")
    finish_reason: str | None = Field(default=None, description="'stop', 'length', or a backend's own reason.")


@runtime_checkable
class Agent(Protocol):
    """Anything that maps a batch of episode contexts to a batch of turns."""

    name: str

    def act(self, batch: list[EpisodeContext]) -> list[TurnOutput]:
        """Return the next turn for every context, in order."""
        ...

    def describe(self) -> dict[str, Any]:
        """What produced the turns (name, model, checkpoint, config), stored on every trajectory."""
        ...
