"""What every model backend and the trainer read off a chat conversation and its template, torch-free.

Generation (:mod:`medeyes.agents.backends.transformers`, :mod:`medeyes.agents.backends.vllm`), episode
tokenisation (:mod:`medeyes.models.episodes`) and the OpenRLHF formatter all need the same three facts, and
when each computed its own they could disagree:

- the images of a conversation, in the order the chat template renders their placeholders
  (:func:`conversation_images`);
- the separator the template puts between the generation prompt and an assistant turn's content
  (:func:`turn_separator`, :func:`content_separator`): Idefics3 renders the prompt ``Assistant:`` but a past
  turn ``Assistant: text``, so the model's first token carries a space that is not part of the content;
- the end-of-turn token a generated turn may close with (:func:`end_of_turn`), whose text the template
  repeats at the start of the next segment.

Only PIL is imported here: an agent can use this module without pulling torch in through the trainer.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from medeyes_env.errors import ConfigError

__all__ = [
    "EndOfTurn",
    "content_separator",
    "content_text",
    "conversation_images",
    "end_of_turn",
    "image_from_part",
    "render",
    "turn_separator",
]

_PROBE = "MEDEYES_PROBE"


def image_from_part(part: dict[str, Any]) -> Image.Image:
    """The PIL image of an OpenAI-style content part (``image`` with a PIL image, or a data-URL ``image_url``)."""
    value = part.get("image", part.get("image_url"))
    if isinstance(value, dict):
        value = value.get("url")
    if isinstance(value, Image.Image):
        return value if value.mode == "RGB" else value.convert("RGB")  # same object: caches can key on it
    if isinstance(value, str) and value.startswith("data:image/"):
        payload = value.split(",", 1)[1]
        return Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB")
    raise ConfigError(
        f"image content part must hold a PIL image or a data: URL, got {type(value).__name__}; "
        "the local backend never fetches images from paths or the network"
    )


def conversation_images(messages: Sequence[dict[str, Any]]) -> list[Image.Image]:
    """All images of a conversation, in the order the chat template renders their placeholders."""
    images = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            images.extend(image_from_part(part) for part in content if part.get("type") in ("image", "image_url"))
    return images


def content_text(message: dict[str, Any]) -> str:
    """The text of a chat message (a string, or the text parts of an OpenAI-style content list, joined).

    >>> content_text({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q?"}]})
    'q?'
    """
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or [] if part.get("type") == "text")


def render(processor: Any, messages: Sequence[dict[str, Any]], generation_prompt: bool) -> str:
    """The conversation as the processor's chat template writes it (text, not tokens)."""
    return processor.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def turn_separator(prompt: str, full: str, content: str) -> str | None:
    r"""What the template put between the generation prompt and ``content``; None if ``full`` does not extend it.

    ``prompt`` is the conversation rendered up to the generation prompt, ``full`` the same conversation with
    the assistant turn ``content`` (string arithmetic on the template's own output, never hard-coded).

    >>> turn_separator("User: q\nAssistant:", "User: q\nAssistant: yes<end>\n", "yes")
    ' '
    >>> turn_separator("User: q\n", "User: Q\nAssistant: yes", "yes") is None
    True
    """
    tail = full[len(prompt) :] if full.startswith(prompt) else None
    if tail is None or content not in tail:
        return None
    return tail[: tail.index(content)] if content else ""


def content_separator(processor: Any) -> str:
    """The template's separator before an assistant turn's content, probed once ('' if none or unrenderable)."""
    probe = [{"role": "user", "content": [{"type": "text", "text": "q"}]}]
    turn = [*probe, {"role": "assistant", "content": [{"type": "text", "text": _PROBE}]}]
    try:
        prompt = render(processor, probe, generation_prompt=True)
        full = render(processor, turn, generation_prompt=False)
    except Exception:  # a template that cannot render the probe has no separator to strip
        return ""
    return turn_separator(prompt, full, _PROBE) or ""


@dataclass(frozen=True)
class EndOfTurn:
    """The token a generated turn may end with that the template also writes after the turn."""

    ids: frozenset[int]
    """Token ids that close a turn (the tokenizer's end-of-sequence id)."""
    text: str | None
    """Their text, which the next rendered segment starts with; None when the tokenizer has none."""

    def closes(self, token_ids: Sequence[int]) -> bool:
        """Whether a generated turn ended with the end-of-turn token.

        >>> EndOfTurn(frozenset({7}), "<eot>").closes([3, 7])
        True
        >>> EndOfTurn(frozenset({7}), "<eot>").closes([])
        False
        """
        return bool(token_ids) and token_ids[-1] in self.ids

    def strip_from(self, segment: str) -> str:
        r"""``segment`` without the template's own copy of the end-of-turn text (the turn already spelled it).

        >>> EndOfTurn(frozenset({7}), "<eot>").strip_from("<eot>\nUser: ok")
        '\nUser: ok'
        """
        if self.text and segment.startswith(self.text):
            return segment[len(self.text) :]
        return segment


def end_of_turn(tokenizer: Any) -> EndOfTurn:
    """The tokenizer's end-of-turn token (its ``eos_token``), as ids and text."""
    eos_id = getattr(tokenizer, "eos_token_id", None)
    ids: set[int] = set()
    if isinstance(eos_id, int):
        ids.add(eos_id)
    elif isinstance(eos_id, Iterable):
        ids.update(int(i) for i in eos_id)
    text = getattr(tokenizer, "eos_token", None)
    return EndOfTurn(frozenset(ids), str(text) if text else None)
