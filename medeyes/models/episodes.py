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

from medeyes.models.chat import content_text, conversation_images, end_of_turn, render, turn_separator
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
    tokenizer = processor.tokenizer
    eot = end_of_turn(tokenizer)
    ids: list[torch.Tensor] = []
    mask: list[torch.Tensor] = []
    logps: list[torch.Tensor] = []
    image_parts: list[dict[str, torch.Tensor]] = []
    extras: dict[str, list[torch.Tensor]] = {}
    spans: list[tuple[int, int]] = []
    retokenized = 0
    has_logprobs = True
    position = 0
    consumed = ""  # the rendered text already covered by ids
    drop_eot = False  # the last turn ended with the end-of-turn token, which the template repeats

    def add_environment_segment(enc: dict[str, torch.Tensor]) -> int:
        """Append one processor-encoded environment segment (mask 0); return its length in tokens."""
        seg_ids = enc["input_ids"][0]
        image_parts.append(enc)
        for key, value in enc.items():
            if _is_token_aligned(key, value, enc["input_ids"]):
                extras.setdefault(key, []).append(value[0])
        ids.append(seg_ids)
        mask.append(torch.zeros_like(seg_ids, dtype=torch.bool))
        logps.append(torch.zeros(seg_ids.shape[0], dtype=torch.float32))
        return int(seg_ids.shape[0])

    for k, (at, turn) in enumerate(zip(assistant_at, turns, strict=True)):
        content = content_text(messages[at])
        if content != turn.text:
            raise RecordError(f"turn {k}: TurnTokens.text differs from the assistant message content")
        prompt = render(processor, messages[:at], generation_prompt=True)
        if not prompt.startswith(consumed):
            raise RecordError(
                f"chat template breaks the prefix property at turn {k}: the rendered prompt does not start with "
                "the conversation rendered so far; this template cannot be trained on turn by turn"
            )
        segment = prompt[len(consumed) :]
        if drop_eot:
            segment = eot.strip_from(segment)
        seg_images = conversation_images(messages[(assistant_at[k - 1] + 1 if k else 0) : at])
        key = (segment, tuple(id(image) for image in seg_images), k == 0)
        hit = cache.get(key) if cache is not None else None
        if hit is not None:
            enc = hit[0]
        else:
            enc = _encode_segment(processor, segment, seg_images, first=(k == 0))
            if cache is not None:
                # The entry holds the images, so their ids (part of the key) cannot be reused by other objects.
                cache[key] = (enc, seg_images)
        position += add_environment_segment(enc)

        full = render(processor, messages[: at + 1], generation_prompt=False)
        sep = turn_separator(prompt, full, content)
        if sep is None:
            raise RecordError(f"chat template breaks the prefix property at assistant turn {k}")
        if turn.token_ids is not None:
            turn_ids = torch.tensor(turn.token_ids, dtype=torch.long)
            if turn.logprobs is not None:
                if len(turn.logprobs) != len(turn.token_ids):
                    raise RecordError(f"turn {k}: {len(turn.logprobs)} logprobs for {len(turn.token_ids)} token ids")
                turn_lp = torch.tensor(turn.logprobs, dtype=torch.float32)
            else:
                turn_lp, has_logprobs = torch.zeros(len(turn.token_ids), dtype=torch.float32), False
            ended_with_eot = eot.closes(turn.token_ids)
        else:
            turn_ids = torch.tensor(tokenizer(sep + content, add_special_tokens=False)["input_ids"], dtype=torch.long)
            turn_lp, has_logprobs = torch.zeros(turn_ids.shape[0], dtype=torch.float32), False
            retokenized += 1
            ended_with_eot = False
        for key in extras:
            extras[key].append(torch.zeros(turn_ids.shape[0], dtype=extras[key][0].dtype))
        ids.append(turn_ids)
        mask.append(torch.ones(turn_ids.shape[0], dtype=torch.bool))
        logps.append(turn_lp)
        spans.append((position, position + turn_ids.shape[0]))
        position += turn_ids.shape[0]
        consumed = prompt + sep + content
        drop_eot = ended_with_eot

    if generation_prompt:
        prompt = render(processor, messages, generation_prompt=True)
        if not prompt.startswith(consumed):
            raise RecordError("chat template breaks the prefix property at the generation prompt")
        segment = prompt[len(consumed) :]
        if drop_eot:
            segment = eot.strip_from(segment)
        enc = _encode_segment(
            processor, segment, conversation_images(messages[(assistant_at[-1] + 1 if turns else 0) :]), first=not turns
        )
        add_environment_segment(enc)

    return EpisodeTensors(
        input_ids=torch.cat(ids),
        loss_mask=torch.cat(mask),
        old_logprobs=torch.cat(logps),
        image_inputs=_merge_image_inputs(image_parts),
        token_inputs={key: torch.cat(values) for key, values in extras.items()},
        is_expert=is_expert,
        has_logprobs=has_logprobs and retokenized == 0,
        turn_spans=spans,
        retokenized_turns=retokenized,
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
