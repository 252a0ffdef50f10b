"""Turn a whole multi-turn episode into training tensors with an exact loss mask.

One function, :func:`tokenize_episode`, serves both streams: on-policy rollouts (whose turns carry the
token ids the policy sampled and their log-probabilities) and expert trajectories (text only, tokenised
here). The stream flag travels with the result; nothing else differs.

How the sequence is built (never by re-parsing text for the mask):

1. The episode's OpenAI-format messages are rendered with the model's own chat template, once per
   assistant turn ``k``: ``P_k`` is the conversation up to the turn's generation prompt
   (``add_generation_prompt=True``), ``R_k`` the same conversation with the turn itself.
2. The text between two assistant turns is ``P_{k+1}`` minus the prefix ``P_k + sep + content_k`` (string
   arithmetic on the template's own output; the prefix property is checked and a violation is an error).
   These *environment segments* hold the system prompt, the images, the feedback and the template's role
   markers; they go through the processor (which expands each ``<image>`` to the model's image tokens and
   returns the pixel tensors) and get mask 0.
3. Each assistant turn contributes its token ids exactly as generated (FEASIBILITY 7) with mask 1, and
   its behaviour log-probabilities at the same positions. A turn without ids (expert, or a backend that
   returns text only) is tokenised as ``sep + content`` (FEASIBILITY 5: the first generated token
   carries the template's separator, e.g. Idefics3's space after ``Assistant:``).

If a generated turn ends with the end-of-turn token, the template's own copy of it at the start of the next
segment is dropped, so the sequence spells the conversation once.

:func:`collate` right-pads a list of :class:`EpisodeTensors` into one :class:`EpisodeBatch` for the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from medeyes.models.chat import EndOfTurn, content_text, conversation_images, end_of_turn, render, turn_separator
from medeyes_env.errors import RecordError

__all__ = [
    "EpisodeBatch",
    "EpisodeTensors",
    "TurnTokens",
    "collate",
    "prefix_mismatches",
    "tokenize_episode",
    "tokenize_record",
]


@dataclass
class TurnTokens:
    """One assistant turn: its content text and, when the policy generated it, the sampled ids and log-probs."""

    text: str
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None


@dataclass
class EpisodeTensors:
    """One tokenised episode (1-D tensors of length ``T``) plus what the trainer needs to score it."""

    input_ids: torch.Tensor
    """[T] int64: the whole episode, images expanded to the model's image tokens."""
    loss_mask: torch.Tensor
    """[T] bool: True exactly on tokens the policy (or the expert) produced."""
    old_logprobs: torch.Tensor
    """[T] float32: behaviour log-probabilities at the generated positions, 0 elsewhere (and for text-only turns)."""
    image_inputs: dict[str, torch.Tensor]
    """Processor image tensors of this episode (e.g. ``pixel_values`` [1, n_img, 3, H, W] for Idefics3)."""
    token_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per-token processor extras ([T] each, e.g. Qwen's ``mm_token_type_ids``), 0 on generated tokens."""
    is_expert: bool = False
    """Stream flag: True for an off-policy (expert) trajectory."""
    has_logprobs: bool = False
    """Every generated turn came with behaviour log-probabilities."""
    turn_spans: list[tuple[int, int]] = field(default_factory=list)
    """[start, end) of each assistant turn in ``input_ids``."""
    retokenized_turns: int = 0
    """Turns whose ids were obtained by tokenising text (expert turns, text-only backends)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Anything the caller attaches (reward, group id, case id, ...)."""

    @property
    def length(self) -> int:
        """Number of tokens ``T``."""
        return int(self.input_ids.shape[0])

    @property
    def generated_tokens(self) -> int:
        """Number of loss tokens."""
        return int(self.loss_mask.sum())


def _encode_segment(processor: Any, text: str, images: list[Any], first: bool) -> dict[str, torch.Tensor]:
    """Processor output for one environment segment (text with its images), without padding."""
    kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt", "add_special_tokens": first}
    if images:
        kwargs["images"] = [images]
    return dict(processor(**kwargs))


def _is_token_aligned(key: str, value: Any, input_ids: torch.Tensor) -> bool:
    """Per-token extras such as Qwen's ``mm_token_type_ids`` ([1, T] like the ids)."""
    return (
        key not in ("input_ids", "attention_mask")
        and isinstance(value, torch.Tensor)
        and (value.shape == input_ids.shape)
    )


def _merge_image_inputs(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Join per-segment image tensors of ONE episode: nested (Idefics3) along dim 1, flat (Qwen) along dim 0."""
    merged: dict[str, list[torch.Tensor]] = {}
    for part in parts:
        for key, value in part.items():
            if key in ("input_ids", "attention_mask") or not isinstance(value, torch.Tensor):
                continue
            if _is_token_aligned(key, value, part["input_ids"]):
                continue
            merged.setdefault(key, []).append(value)
    out: dict[str, torch.Tensor] = {}
    for key, values in merged.items():
        nested = key in ("pixel_values", "pixel_attention_mask") and values[0].dim() >= 4
        out[key] = torch.cat(values, dim=1 if nested else 0)
    return out


def tokenize_episode(
    messages: list[dict[str, Any]],
    turns: Sequence[TurnTokens],
    processor: Any,
    *,
    is_expert: bool = False,
    meta: dict[str, Any] | None = None,
    cache: dict | None = None,
    generation_prompt: bool = False,
) -> EpisodeTensors:
    """Tokenise one episode (both streams) into ids, an exact loss mask, behaviour log-probs and image tensors.

    Args:
        messages: the episode as OpenAI-format chat messages (system, user with the overview, then alternating
            assistant turns and environment answers), images as PIL. Messages after the last assistant turn
            are ignored.
        turns: one :class:`TurnTokens` per assistant message, in order; its ``text`` must equal the message's
            content. ``token_ids`` (if given) are used verbatim with mask 1.
        processor: the model's processor (chat template, tokenizer, image processor).
        is_expert: stream flag stored on the result.
        meta: attached to the result unchanged.
        cache: optional dict reused across calls: environment segments with the same text and the same image
            objects are encoded once (the G rollouts of a GRPO group share their first segment).
        generation_prompt: also append the environment segment after the last turn, up to the generation prompt
            of the next turn (mask 0): the exact prompt a policy continues from, with its earlier turns as
            sampled. ``turns`` may then be empty.

    Raises:
        RecordError: the messages and turns disagree, or the chat template breaks the prefix property.

    """
    assistant_at = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if len(assistant_at) != len(turns):
        raise RecordError(
            f"episode has {len(assistant_at)} assistant messages but {len(turns)} turns; pass one TurnTokens per turn"
        )
    if not turns and not generation_prompt:
        raise RecordError("episode has no assistant turn; there is nothing to train on")
    eot = end_of_turn(processor.tokenizer)
    built = _Builder()
    for k, (at, turn) in enumerate(zip(assistant_at, turns, strict=True)):
        previous = assistant_at[k - 1] + 1 if k else 0
        _add_assistant_turn(built, processor, messages, previous, at, k, turn, eot, cache)

    if generation_prompt:
        prompt = render(processor, messages, generation_prompt=True)
        segment = built.segment_before(prompt, eot, "chat template breaks the prefix property at the generation prompt")
        images = conversation_images(messages[(assistant_at[-1] + 1 if turns else 0) :])
        built.add_segment(_encode_segment(processor, segment, images, first=not turns))
    return built.result(is_expert, meta)


def _add_assistant_turn(
    built: _Builder,
    processor: Any,
    messages: list[dict[str, Any]],
    previous: int,
    at: int,
    k: int,
    turn: TurnTokens,
    eot: EndOfTurn,
    cache: dict | None,
) -> None:
    """Turn ``k`` (message ``at``): the environment segment since message ``previous`` (mask 0), then the turn."""
    content = content_text(messages[at])
    if content != turn.text:
        raise RecordError(f"turn {k}: TurnTokens.text differs from the assistant message content")
    prompt = render(processor, messages[:at], generation_prompt=True)
    segment = built.segment_before(
        prompt,
        eot,
        f"chat template breaks the prefix property at turn {k}: the rendered prompt does not start with "
        "the conversation rendered so far; this template cannot be trained on turn by turn",
    )
    images = conversation_images(messages[previous:at])
    built.add_segment(_encode_cached(processor, segment, images, k == 0, cache))
    full = render(processor, messages[: at + 1], generation_prompt=False)
    sep = turn_separator(prompt, full, content)
    if sep is None:
        raise RecordError(f"chat template breaks the prefix property at assistant turn {k}")
    built.add_turn(turn, sep + content, processor.tokenizer, eot, k)
    built.consumed = prompt + sep + content


def _encode_cached(
    processor: Any, segment: str, images: list[Any], first: bool, cache: dict | None
) -> dict[str, torch.Tensor]:
    """:func:`_encode_segment`, remembered in ``cache`` by the text and the identity of the image objects."""
    key = (segment, tuple(id(image) for image in images), first)
    hit = cache.get(key) if cache is not None else None
    if hit is not None:
        return hit[0]
    enc = _encode_segment(processor, segment, images, first=first)
    if cache is not None:
        # The entry holds the images, so their ids (part of the key) cannot be reused by other objects.
        cache[key] = (enc, images)
    return enc


@dataclass
class _Builder:
    """One episode's sequence as it grows: environment segments (mask 0) and assistant turns (mask 1)."""

    ids: list[torch.Tensor] = field(default_factory=list)
    mask: list[torch.Tensor] = field(default_factory=list)
    logps: list[torch.Tensor] = field(default_factory=list)
    image_parts: list[dict[str, torch.Tensor]] = field(default_factory=list)
    extras: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    spans: list[tuple[int, int]] = field(default_factory=list)
    position: int = 0
    retokenized: int = 0
    has_logprobs: bool = True
    consumed: str = ""
    """The rendered text already covered by ids."""
    drop_eot: bool = False
    """The last turn ended with the end-of-turn token, which the template repeats at the next segment's start."""

    def segment_before(self, prompt: str, eot: EndOfTurn, error: str) -> str:
        """The text of ``prompt`` not yet covered (``error`` when the template breaks the prefix property)."""
        if not prompt.startswith(self.consumed):
            raise RecordError(error)
        segment = prompt[len(self.consumed) :]
        return eot.strip_from(segment) if self.drop_eot else segment

    def add_segment(self, enc: dict[str, torch.Tensor]) -> None:
        """Append one processor-encoded environment segment (mask 0)."""
        seg_ids = enc["input_ids"][0]
        self.image_parts.append(enc)
        for key, value in enc.items():
            if _is_token_aligned(key, value, enc["input_ids"]):
                self.extras.setdefault(key, []).append(value[0])
        self._append(seg_ids, torch.zeros_like(seg_ids, dtype=torch.bool), torch.zeros(seg_ids.shape[0]))

    def add_turn(self, turn: TurnTokens, text: str, tokenizer: Any, eot: EndOfTurn, k: int) -> None:
        """Append assistant turn ``k`` (mask 1): its sampled ids, or ``text`` (separator + content) tokenised."""
        if turn.token_ids is not None:
            turn_ids = torch.tensor(turn.token_ids, dtype=torch.long)
            if turn.logprobs is not None:
                if len(turn.logprobs) != len(turn.token_ids):
                    raise RecordError(f"turn {k}: {len(turn.logprobs)} logprobs for {len(turn.token_ids)} token ids")
                turn_lp = torch.tensor(turn.logprobs, dtype=torch.float32)
            else:
                turn_lp, self.has_logprobs = torch.zeros(len(turn.token_ids), dtype=torch.float32), False
            self.drop_eot = eot.closes(turn.token_ids)
        else:
            turn_ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
            turn_lp, self.has_logprobs = torch.zeros(turn_ids.shape[0], dtype=torch.float32), False
            self.retokenized += 1
            self.drop_eot = False
        for key in self.extras:
            self.extras[key].append(torch.zeros(turn_ids.shape[0], dtype=self.extras[key][0].dtype))
        self.spans.append((self.position, self.position + turn_ids.shape[0]))
        self._append(turn_ids, torch.ones(turn_ids.shape[0], dtype=torch.bool), turn_lp)

    def _append(self, ids: torch.Tensor, mask: torch.Tensor, logps: torch.Tensor) -> None:
        self.ids.append(ids)
        self.mask.append(mask)
        self.logps.append(logps.to(torch.float32))
        self.position += int(ids.shape[0])

    def result(self, is_expert: bool, meta: dict[str, Any] | None) -> EpisodeTensors:
        """The finished episode."""
        return EpisodeTensors(
            input_ids=torch.cat(self.ids),
            loss_mask=torch.cat(self.mask),
            old_logprobs=torch.cat(self.logps),
            image_inputs=_merge_image_inputs(self.image_parts),
            token_inputs={key: torch.cat(values) for key, values in self.extras.items()},
            is_expert=is_expert,
            has_logprobs=self.has_logprobs and self.retokenized == 0,
            turn_spans=self.spans,
            retokenized_turns=self.retokenized,
            meta=dict(meta or {}),
        )


def tokenize_record(
    record: Any,
    store: Any,
    processor: Any,
    *,
    is_expert: bool | None = None,
    meta: dict[str, Any] | None = None,
    cache: dict | None = None,
) -> EpisodeTensors:
    """Tokenise a :class:`~medeyes.trajectories.TrajectoryRecord` (images from ``store``) with :func:`tokenize_episode`.

    ``is_expert`` defaults to ``record.producer.kind != "policy"``. Steps' ``token_ids``/``logprobs`` are used
    when present. ``meta`` defaults to the record's reward, case id and trajectory id.
    """
    messages = record.chat_messages(store)
    n_assistant = sum(1 for m in messages if m["role"] == "assistant")
    turns = [TurnTokens(s.text, s.token_ids, s.logprobs) for s in record.steps[:n_assistant]]
    expert = record.producer.kind != "policy" if is_expert is None else is_expert
    info = {"reward": record.reward, "case_id": record.case_id, "trajectory_id": record.trajectory_id}
    return tokenize_episode(
        messages, turns, processor, is_expert=expert, meta=meta if meta is not None else info, cache=cache
    )


def prefix_mismatches(messages: list[dict[str, Any]], processor: Any) -> list[int]:
    """Check FEASIBILITY 5 on a text episode: turns whose backend prompt ids are NOT a prefix of our sequence.

    For every assistant turn ``k``, the ids the generation backend feeds the model (the processor applied to the
    whole rendered prompt ``P_k``) must equal the first ids of :func:`tokenize_episode`'s sequence built from
    the turns' text. Returns the indices of turns where they differ (empty: the property holds).
    """
    assistant_at = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    turns = [TurnTokens(content_text(messages[i])) for i in assistant_at]
    episode = tokenize_episode(messages, turns, processor)
    bad = []
    for k, at in enumerate(assistant_at):
        prompt = render(processor, messages[:at], generation_prompt=True)
        enc = _encode_segment(processor, prompt, conversation_images(messages[:at]), first=True)
        prompt_ids = enc["input_ids"][0]
        start = episode.turn_spans[k][0]
        if start != prompt_ids.shape[0] or not torch.equal(episode.input_ids[:start], prompt_ids):
            bad.append(k)
    return bad


@dataclass
class EpisodeBatch:
    """A right-padded batch of episodes, ready for ``model(**batch.model_inputs())``."""

    input_ids: torch.Tensor
    """[B, T] int64, padded with the pad id."""
    attention_mask: torch.Tensor
    """[B, T] int64."""
    loss_mask: torch.Tensor
    """[B, T] bool."""
    old_logprobs: torch.Tensor
    """[B, T] float32."""
    is_expert: torch.Tensor
    """[B] bool."""
    image_inputs: dict[str, torch.Tensor]
    """Batched image tensors (Idefics3: pixel_values [B, max_img, 3, H, W], zero-padded)."""
    token_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per-token extras [B, T], zero-padded."""

    def to(self, device: torch.device | str) -> EpisodeBatch:
        """Move every tensor to ``device`` (pixel values keep their dtype; cast them with the model)."""
        return EpisodeBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.loss_mask.to(device),
            self.old_logprobs.to(device),
            self.is_expert.to(device),
            {k: v.to(device) for k, v in self.image_inputs.items()},
            {k: v.to(device) for k, v in self.token_inputs.items()},
        )

    def model_inputs(self, dtype: torch.dtype | None = None, causal_only: bool = False) -> dict[str, torch.Tensor]:
        """Keyword arguments for the model's forward pass; floating image tensors cast to ``dtype``.

        ``causal_only=True`` leaves out the attention mask: with RIGHT padding and causal attention no real token
        ever attends to a pad, so the mask changes only the (never scored) pad positions, and without it SDPA
        can take its fused causal kernel (about 2x faster on CPU for the tiny model at T ~ 900).
        """
        images = {
            k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in self.image_inputs.items()
        }
        attention = {} if causal_only else {"attention_mask": self.attention_mask}
        return {"input_ids": self.input_ids, **attention, **images, **self.token_inputs}


def collate(episodes: Sequence[EpisodeTensors], pad_token_id: int) -> EpisodeBatch:
    """Right-pad episodes into an :class:`EpisodeBatch`; images padded per the model family's layout."""
    if not episodes:
        raise RecordError("cannot collate an empty list of episodes")
    length = max(e.length for e in episodes)
    batch = len(episodes)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    attention = torch.zeros((batch, length), dtype=torch.long)
    loss_mask = torch.zeros((batch, length), dtype=torch.bool)
    old = torch.zeros((batch, length), dtype=torch.float32)
    for row, e in enumerate(episodes):
        n = e.length
        input_ids[row, :n] = e.input_ids
        attention[row, :n] = 1
        loss_mask[row, :n] = e.loss_mask
        old[row, :n] = e.old_logprobs
    is_expert = torch.tensor([e.is_expert for e in episodes], dtype=torch.bool)
    extras: dict[str, torch.Tensor] = {}
    for key in sorted({k for e in episodes for k in e.token_inputs}):
        first = next(e.token_inputs[key] for e in episodes if key in e.token_inputs)
        extras[key] = torch.zeros((batch, length), dtype=first.dtype)
        for row, e in enumerate(episodes):
            if key in e.token_inputs:
                extras[key][row, : e.length] = e.token_inputs[key]
    return EpisodeBatch(input_ids, attention, loss_mask, old, is_expert, _collate_images(episodes), extras)


def _collate_images(episodes: Sequence[EpisodeTensors]) -> dict[str, torch.Tensor]:
    keys = sorted({k for e in episodes for k in e.image_inputs})
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        values = [e.image_inputs[key] for e in episodes if key in e.image_inputs]
        if key in ("pixel_values", "pixel_attention_mask") and values[0].dim() >= 4:
            # Nested per sample: [1, n_img, ...] -> [B, max_img, ...], zero images are dropped by the model.
            most = max(v.shape[1] for v in values)
            padded = []
            for v in values:
                pad = torch.zeros((1, most - v.shape[1], *v.shape[2:]), dtype=v.dtype)
                padded.append(torch.cat([v, pad], dim=1))
            out[key] = torch.cat(padded, dim=0)
        else:
            out[key] = torch.cat(values, dim=0)
    return out
