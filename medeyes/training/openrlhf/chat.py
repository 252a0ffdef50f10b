"""The model's chat template as a turn-by-turn token stream: markers, feedback segments, tokenisation.

OpenRLHF appends environment feedback to the token stream verbatim, so MedEyes cuts the template's own turn
markers out of its rendering (:class:`ChatFormatter`) and tokenises segments the way OpenRLHF 0.11.2 does
(:func:`encode_segment`, :func:`render_prompt_row`). :class:`FormatterCache` keeps one formatter per distinct
processor, however many copies of it arrive.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from medeyes.models.chat import turn_separator
from medeyes_env.errors import ConfigError

_IMAGE_TAG = "<image>"
_MARK = "MEDEYESTURNMARK"
_MM_SKIP_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"})


class ChatFormatter:
    """The model's chat template reduced to what a turn-by-turn token stream needs.

    OpenRLHF appends environment feedback to the token stream verbatim, so the feedback text must carry the
    template's own markers: the end of the assistant turn, a user turn (with image placeholders when images
    are sent), and the next generation prompt. They are cut out of the template's own rendering
    (:func:`medeyes.models.chat.turn_separator`), never hard-coded:

    - ``sep``: what the template puts between the generation prompt and the assistant text (Idefics3: a
      space, which the model generates as part of its first token);
    - ``close``: what follows the assistant text (Qwen: ``<|im_end|>`` and a newline);
    - ``eot_text``: the special token at the start of ``close`` that the model itself emits to end a turn.

    Args:
        processor: A processor (VLM) or tokenizer with ``apply_chat_template``; OpenRLHF's ``hf_tokenizer``.
        feedback_images: Put the view image into feedback turns (only when ``processor`` has an image processor).

    """

    def __init__(self, processor: Any, feedback_images: bool = True) -> None:
        if not hasattr(processor, "apply_chat_template"):
            raise ConfigError(f"{type(processor).__name__} has no chat template; MedEyes needs a chat model")
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.images = bool(feedback_images) and hasattr(processor, "image_processor")
        self._base = [self._message("system", "S"), self._message("user", "Q")]
        prompt = self._render(self._base, generation_prompt=True)
        full = self._render([*self._base, self._message("assistant", _MARK)], generation_prompt=False)
        sep = turn_separator(prompt, full, _MARK)
        if sep is None:
            raise ConfigError(
                f"the chat template of {type(processor).__name__} breaks the prefix property (a rendered assistant "
                "turn does not extend the generation prompt); it cannot be used turn by turn"
            )
        self.sep = sep
        self.close = full[len(prompt) + len(sep) + len(_MARK) :]
        self._head = prompt + self.sep + _MARK
        self.eot_text = self._end_of_turn_text()
        self.eot_ids = self._end_of_turn_ids()

    def _message(self, role: str, text: str, n_images: int = 0) -> dict[str, Any]:
        if not self.images:
            return {"role": role, "content": text}
        return {"role": role, "content": [*([{"type": "image"}] * n_images), {"type": "text", "text": text}]}

    def _render(self, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _end_of_turn_text(self) -> str:
        specials = {str(t) for t in getattr(self.tokenizer, "all_special_tokens", []) or []}
        eos = getattr(self.tokenizer, "eos_token", None)
        if eos:
            specials.add(str(eos))
        candidates = sorted((t for t in specials if t and self.close.startswith(t)), key=len, reverse=True)
        return candidates[0] if candidates else ""

    def _end_of_turn_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        eos_id = getattr(self.tokenizer, "eos_token_id", None)
        if isinstance(eos_id, int):
            ids.add(eos_id)
        elif isinstance(eos_id, Iterable):
            ids.update(int(i) for i in eos_id)
        if self.eot_text:
            token_id = self.tokenizer.convert_tokens_to_ids(self.eot_text)
            if isinstance(token_id, int) and token_id >= 0:
                ids.add(token_id)
        return frozenset(ids)

    def feedback_segment(self, text: str, n_images: int = 0, ended_with_eot: bool = False) -> str:
        """Text that follows an assistant turn: the turn's close, a user turn with ``text``, the next prompt.

        Args:
            text: The environment's message (``<feedback>...</feedback>``).
            n_images: Images of the user turn (0 when images are not sent).
            ended_with_eot: The assistant turn already ended with the end-of-turn token, so it is not repeated.

        """
        if n_images and not self.images:
            raise ValueError("this formatter does not send images; pass n_images=0")
        rendered = self._render(
            [*self._base, self._message("assistant", _MARK), self._message("user", text, n_images)],
            generation_prompt=True,
        )
        if not rendered.startswith(self._head):
            raise ConfigError("the chat template renders earlier turns differently once a user turn follows")
        segment = rendered[len(self._head) :]
        if ended_with_eot and self.eot_text and segment.startswith(self.eot_text):
            segment = segment[len(self.eot_text) :]
        return segment

    def clean_action(self, text: str) -> tuple[str, bool]:
        """The turn text the environment should parse, and whether it ended with the end-of-turn text.

        Drops the template's separator before the turn and the end-of-turn marker (plus trailing whitespace)
        after it, which vLLM may include in the text when it does not skip special tokens.
        """
        ended = False
        if self.sep and text.startswith(self.sep):
            text = text[len(self.sep) :]
        stripped = text.rstrip()
        for tail in (self.close.rstrip(), self.eot_text):
            if tail and stripped.endswith(tail):
                stripped, ended = stripped[: -len(tail)].rstrip(), True
                break
        return (stripped if ended else text), ended


def encode_segment(processor: Any, text: str, images: Sequence[Image.Image] = ()) -> tuple[list[int], dict | None]:
    """Token ids (and multimodal tensors) of one text segment, exactly as OpenRLHF 0.11.2 tokenises it.

    Mirrors ``openrlhf.utils.vlm_utils.process_prompt_with_images`` for PIL images and the text-only
    ``hf_tokenizer(text=..., add_special_tokens=False)`` call of ``MultiTurnAgentExecutor``.
    """
    if images and hasattr(processor, "image_processor"):
        out = processor(text=[text], images=list(images), add_special_tokens=False, return_tensors="pt")
        mm = {key: value for key, value in out.items() if key not in _MM_SKIP_KEYS}
        return out["input_ids"][0].tolist(), (mm or None)
    return processor(text=text, add_special_tokens=False, return_tensors="pt")["input_ids"][0].tolist(), None


def render_prompt_row(processor: Any, row: dict[str, Any]) -> str:
    """The prompt text OpenRLHF 0.11.2's ``PromptDataset`` makes of an exported row (``--data.apply_chat_template``).

    Like ``openrlhf.datasets.prompts_dataset.preprocess_data``: each ``<image>`` tag of a string content becomes
    an image part, the text around it a stripped text part, then the chat template with a generation prompt.
    """
    messages = []
    for message in row["prompt"]:
        content = message["content"]
        if isinstance(content, str) and _IMAGE_TAG in content:
            parts: list[dict[str, str]] = []
            for i, piece in enumerate(content.split(_IMAGE_TAG)):
                if i:
                    parts.append({"type": "image"})
                if piece.strip():
                    parts.append({"type": "text", "text": piece.strip()})
            content = parts
        messages.append({"role": message["role"], "content": content})
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def accumulate_mm(existing: dict | None, new: dict | None) -> dict | None:
    """Concatenate multimodal tensors along dim 0 (``openrlhf.utils.vlm_utils.accumulate_mm_inputs``)."""
    if new is None:
        return existing
    if existing is None:
        return {k: v.clone() if isinstance(v, Tensor) else v for k, v in new.items()}
    merged = {}
    for key in set(existing) | set(new):
        if key in existing and key in new:
            merged[key] = torch.cat([existing[key], new[key]], dim=0)
        else:
            merged[key] = existing.get(key, new.get(key))
    return merged


def processor_identity(processor: Any) -> tuple[str, str, int, str]:
    """What makes two processors format turns alike: class, name or path, vocabulary size, chat-template hash.

    OpenRLHF sends the processor with every ``generate_responses`` call, so each call in a vLLM engine actor
    holds a freshly deserialised copy; ``id()`` would differ every time while this key does not.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    name = getattr(processor, "name_or_path", None) or getattr(tokenizer, "name_or_path", None) or ""
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(template, str):  # a dict of named templates
        template = json.dumps(template, sort_keys=True)
    try:
        vocab = len(tokenizer)
    except TypeError:
        vocab = -1
    digest = hashlib.sha256(template.encode()).hexdigest()[:16]
    return type(processor).__qualname__, str(name), vocab, digest


class FormatterCache:
    """One :class:`ChatFormatter` per distinct processor (by :func:`processor_identity`), at most ``size``.

    Args:
        feedback_images: Passed to every formatter built.
        size: Most formatters kept (least recently used dropped first); one model per run needs one.

    """

    def __init__(self, feedback_images: bool = True, size: int = 4) -> None:
        if size < 1:
            raise ValueError(f"FormatterCache size must be >= 1, got {size}")
        self.feedback_images = feedback_images
        self.size = size
        self._entries: OrderedDict[tuple[str, str, int, str], ChatFormatter] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Formatters held now."""
        return len(self._entries)

    def get(self, processor: Any) -> ChatFormatter:
        """The formatter of ``processor``, built on first sight of its identity."""
        key = processor_identity(processor)
        with self._lock:
            formatter = self._entries.get(key)
            if formatter is None:
                formatter = ChatFormatter(processor, self.feedback_images)
                self._entries[key] = formatter
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
            self._entries.move_to_end(key)
            return formatter
