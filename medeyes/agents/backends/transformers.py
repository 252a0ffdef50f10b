r"""Local ``transformers`` generation backend for :class:`~medeyes.agents.policy.PolicyAgent`.

:class:`TransformersBackend` renders each OpenAI-format conversation with the processor's chat template
(``add_generation_prompt=True``), collects the conversation's images in order and hands them to the
processor NESTED per sample (``images=[[overview, crop], [overview], ...]``, which both Idefics3 and
Qwen2.5-VL accept; the count of image placeholders must equal the count of images per sample), pads on the
LEFT, and calls ``model.generate`` once for the whole batch.

How the per-token log-probabilities are obtained, and why:

- ``output_logits=True`` keeps every step's full ``(batch, vocab)`` logits until the end: 10 GB for 64 x 256
  tokens of a 151k vocabulary. Instead a first logits processor stores only the current step's
  ``log_softmax`` and a stopping criterion, which ``generate`` calls right after appending the sampled token,
  gathers the sampled token's value. Memory stays at one ``(batch, vocab)`` tensor.
- ``generate`` would build its own temperature / top-k / top-p warpers, merged with ours in an order we do not
  control, and it also merges in the model's ``generation_config.json`` (real checkpoints ship
  ``top_k``, ``repetition_penalty``...). So we call it with a complete :class:`~transformers.GenerationConfig`
  of neutral values (temperature 1, top_p 1, top_k 0, repetition_penalty 1) and apply the warpers ourselves:
  ``[record raw, temperature, top-k, top-p, record processed]``. The sampling distribution is then exactly
  :class:`~medeyes.agents.policy.SamplingConfig`, and ``logprobs_mode`` picks the record.
- ``"raw"`` (default): ``log_softmax(logits)`` at temperature 1, untruncated, the quantity the trainer
  recomputes with a forward pass (equal up to KV-cache numerics). ``"processed"``: under the distribution
  sampled from. Greedy decoding (temperature 0) uses no warpers, so both modes agree.

Stopping: a stopping criterion decodes the last few generated tokens of each row and stops the row once any
stop string appears (the protocol tags are single tokens in the tiny tokenizers, but real tokenizers spell
them in pieces that may overhang, e.g. ``>\n``). Rows that stopped receive pad tokens from ``generate``;
we cut each row after the token that completed the stop or after the first end-of-turn token.

Text versus tokens: ``text`` is the assistant CONTENT: the leading separator the chat template puts between
the generation prompt and a turn's content (Idefics3: the space of ``Assistant: ``) is removed, so putting
``text`` back into the conversation re-renders the same string the tokens spell.
``prompt_ids + token_ids`` is the rendered conversation with that assistant turn, minus the end-of-turn suffix.

Other gotchas: ``generate`` uses the global torch RNG, so a seeded call runs under ``torch.random.fork_rng``;
sequences of a left-padded batch all start generating at ``input_ids.shape[1]``; the processor returns
``pixel_attention_mask``/``image_grid_thw``/``mm_token_type_ids`` which must all be forwarded to ``generate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    StoppingCriteria,
    StoppingCriteriaList,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from medeyes.agents.backends.seeds import SeededCalls
from medeyes.agents.base import TurnOutput
from medeyes.agents.policy import PolicyAgent, SamplingConfig, truncate_at_stop
from medeyes.models.chat import content_separator, content_text, conversation_images
from medeyes.models.episodes import TurnTokens, collate, tokenize_episode
from medeyes.models.vision_dedupe import shared_image_encoding
from medeyes_env.errors import ConfigError


class _RecordLogSoftmax(LogitsProcessor):
    """Keeps ``log_softmax`` of the scores it sees (one step), passes the scores on unchanged."""

    def __init__(self) -> None:
        self.logprobs: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.logprobs = torch.log_softmax(scores.float(), dim=-1)  # (batch, vocab)
        return scores


class _GatherAndStop(StoppingCriteria):
    """After each step: record the sampled token's log-prob, and stop rows whose text reached a stop string."""

    def __init__(
        self,
        record: _RecordLogSoftmax,
        tokenizer: Any,
        stops: list[str],
        prompt_len: int,
        batch: int,
        may_finish: torch.Tensor | None = None,
    ):
        self.record = record
        self.tokenizer = tokenizer
        self.stops = stops
        self.prompt_len = prompt_len
        # may_finish[token] is False for tokens that cannot complete any stop string (their text lacks every
        # stop's last character); rows that just sampled one are not decoded. None: decode every row.
        self.may_finish = may_finish
        # A stop string of n characters spans at most n tokens (every token decodes to >= 1 character).
        self.window = max((len(s) for s in stops), default=0) + 1
        self.logprobs: list[torch.Tensor] = []  # one (batch,) tensor per step
        self.stopped_at: list[int | None] = [None] * batch  # generated-token count when the stop string appeared

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        new_tokens = input_ids[:, -1]
        if self.record.logprobs is None:  # generate runs the logits processors before the stopping criteria
            raise RuntimeError("log-prob recorder did not run before the stopping criterion")
        self.logprobs.append(self.record.logprobs.gather(1, new_tokens[:, None]).squeeze(1).cpu())
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.stops:
            return done
        n_generated = input_ids.shape[1] - self.prompt_len
        start = max(self.prompt_len, input_ids.shape[1] - self.window)
        if self.may_finish is None:
            rows = list(range(input_ids.shape[0]))
        else:
            candidates = self.may_finish[new_tokens.clamp(0, self.may_finish.numel() - 1).cpu()]
            rows = [row for row in torch.nonzero(candidates).flatten().tolist() if self.stopped_at[row] is None]
        if not rows:
            return done
        tails = self.tokenizer.batch_decode(input_ids[rows, start:], skip_special_tokens=True)
        for row, tail in zip(rows, tails, strict=True):
            if self.stopped_at[row] is None and any(stop in tail for stop in self.stops):
                self.stopped_at[row] = n_generated
                done[row] = True
        return done


class TransformersBackend(SeededCalls):
    """Generate policy turns with a local ``transformers`` vision-language model (see the module docstring)."""

    def __init__(
        self,
        model: PreTrainedModel,
        processor: Any,
        device: str | torch.device | None = None,
        dedupe_images: bool = True,
    ):
        """Wrap a loaded model and processor; ``device`` defaults to the model's device.

        ``dedupe_images``: encode each distinct image of a batch once (:mod:`medeyes.models.vision_dedupe`): a
        GRPO group's rollouts share their overview. Same outputs either way (tests/test_vision_dedupe.py).
        """
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = torch.device(device) if device is not None else model.device
        if self.tokenizer.pad_token_id is None:
            raise ConfigError(f"tokenizer of {model.name_or_path} has no pad token; set one before batching")
        eos = model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        if self.tokenizer.eos_token_id is not None:
            eos_ids.append(self.tokenizer.eos_token_id)
        self.eos_token_ids = sorted({int(e) for e in eos_ids if e is not None})
        # Never sample an image/video placeholder token: a placeholder without pixels makes every later forward
        # pass over the episode fail ("image features and image tokens do not match").
        placeholders = (getattr(processor, "image_token_id", None), getattr(processor, "video_token_id", None))
        self.suppressed_token_ids = sorted({int(i) for i in placeholders if isinstance(i, int)})
        self.dedupe_images = dedupe_images
        super().__init__()  # the call counter the seeds come from
        self.accepts_turn_token_ids = True  # PolicyAgent passes each episode's sampled ids (generate's docstring)
        self.content_separator = content_separator(processor)
        self._may_finish: dict[tuple[str, ...], torch.Tensor] = {}

    def _stop_filter(self, stops: list[str]) -> torch.Tensor | None:
        """Per vocabulary id: whether the token can complete one of ``stops`` (cached per stop set).

        A stop string appears in the decoded tail only at the step whose token brings its last character.
        Decoding every row at every step cost a tenth of rollout time; this mask skips most rows.
        """
        if not stops or any(not stop for stop in stops):
            return None
        key = tuple(stops)
        if key not in self._may_finish:
            last_chars = {stop[-1] for stop in stops}
            size = max(len(self.tokenizer), int(self.model.config.get_text_config().vocab_size))
            texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
            mask = torch.ones(size, dtype=torch.bool)  # ids the tokenizer does not know: always check
            mask[: len(texts)] = torch.tensor([any(c in text for c in last_chars) for text in texts])
            self._may_finish[key] = mask
        return self._may_finish[key]

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path = "tiny", device: str = "cpu", dtype: str | torch.dtype | None = None
    ) -> TransformersBackend:
        """Load a model with :func:`medeyes.models.factory.load_policy_model` and wrap it."""
        from medeyes.models.factory import load_policy_model

        model, processor = load_policy_model(name_or_path, device=device, dtype=dtype)
        return cls(model, processor, device=device)

    def describe(self) -> dict[str, Any]:
        """Backend type, model path and class, device and dtype."""
        return {
            "type": "transformers",
            "model": str(self.model.name_or_path),
            "architecture": type(self.model).__name__,
            "device": str(self.device),
            "dtype": str(self.model.dtype).removeprefix("torch."),
        }

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text of one conversation, ending with the generation prompt."""
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, batch_messages: list[list[dict[str, Any]]]) -> dict[str, torch.Tensor]:
        """Processor inputs for a batch: left-padded ids and images nested per sample, on the device."""
        texts = [self.render(messages) for messages in batch_messages]
        images = [conversation_images(messages) for messages in batch_messages]
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True, "padding_side": "left"}
        if any(images):
            kwargs["images"] = images
        inputs = self.processor(**kwargs)
        return {key: value.to(self.device) for key, value in inputs.items() if isinstance(value, torch.Tensor)}

    def encode_with_turns(
        self, batch_messages: list[list[dict[str, Any]]], turn_token_ids: list[list[list[int]] | None]
    ) -> dict[str, torch.Tensor]:
        """Like :meth:`encode`, but each earlier assistant turn is spelled by the ids the policy sampled for it.

        Re-rendering a conversation as text re-tokenises earlier turns, which can change their ids (FEASIBILITY
        7); the trainer scores the sampled ids, so this keeps generation and training in the same context. The
        prompt is built by the trainer's own :func:`~medeyes.models.episodes.tokenize_episode`, left-padded.
        A conversation whose ids are unknown (``None``) has its earlier turns tokenised from their text.
        """
        episodes = []
        for messages, turn_ids in zip(batch_messages, turn_token_ids, strict=True):
            contents = [message for message in messages if message.get("role") == "assistant"]
            if turn_ids is None or len(turn_ids) != len(contents):
                turns = [TurnTokens(text=content_text(message)) for message in contents]
            else:
                turns = [
                    TurnTokens(text=content_text(message), token_ids=list(ids))
                    for message, ids in zip(contents, turn_ids, strict=True)
                ]
            episodes.append(tokenize_episode(messages, turns, self.processor, generation_prompt=True))
        batch = collate(episodes, int(self.tokenizer.pad_token_id))
        # collate pads on the right; generation continues every row from its last token, so move pads left.
        length = batch.input_ids.shape[1]
        shifts = [length - episode.length for episode in episodes]

        def to_left(tensor: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.roll(row, shift) for row, shift in zip(tensor, shifts, strict=True)])

        inputs = {"input_ids": to_left(batch.input_ids), "attention_mask": to_left(batch.attention_mask)}
        inputs.update({key: to_left(value) for key, value in batch.token_inputs.items()})
        inputs.update(batch.image_inputs)
        return {key: value.to(self.device) for key, value in inputs.items()}

    def _generation_config(self, sampling: SamplingConfig) -> GenerationConfig:
        return GenerationConfig(
            do_sample=not sampling.greedy,
            temperature=1.0,
            top_p=1.0,
            # top_k 0 disables it when sampling; when greedy the value is ignored and the default (50) keeps
            # generate from warning about an unused flag. Explicit neutral values, not None: None would be
            # filled in from the checkpoint's generation_config.json.
            top_k=0 if not sampling.greedy else 50,
            min_p=0.0,
            typical_p=1.0,
            repetition_penalty=1.0,
            num_beams=1,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
            return_dict_in_generate=True,
            output_scores=False,
            output_logits=False,
        )

    @torch.inference_mode()
    def generate(
        self,
        batch_messages: list[list[dict[str, Any]]],
        sampling: SamplingConfig,
        turn_token_ids: list[list[list[int]] | None] | None = None,
    ) -> list[TurnOutput]:
        """One :class:`TurnOutput` per conversation (contract in :mod:`medeyes.agents.policy`).

        ``turn_token_ids[i]`` holds the sampled ids of conversation ``i``'s earlier assistant turns (``None``:
        unknown): the prompt then spells them exactly (:meth:`encode_with_turns`).
        """
        if not batch_messages:
            return []
        first_turns = all(not any(m.get("role") == "assistant" for m in messages) for messages in batch_messages)
        if turn_token_ids is not None and not first_turns:
            inputs = self.encode_with_turns(batch_messages, turn_token_ids)
        else:
            inputs = self.encode(batch_messages)  # the same ids when no turn was taken yet, in one processor call
        prompt_len = inputs["input_ids"].shape[1]
        batch = inputs["input_ids"].shape[0]

        raw, processed = _RecordLogSoftmax(), _RecordLogSoftmax()
        processors: list[LogitsProcessor] = [raw]
        if self.suppressed_token_ids:  # after the raw record, so "raw" stays the model's own distribution
            processors.append(SuppressTokensLogitsProcessor(self.suppressed_token_ids, device=str(self.device)))
        if not sampling.greedy:
            if sampling.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k > 0:
                processors.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1.0:
                processors.append(TopPLogitsWarper(sampling.top_p))
        processors.append(processed)
        record = raw if sampling.logprobs_mode == "raw" else processed
        stopper = _GatherAndStop(
            record, self.tokenizer, sampling.stop, prompt_len, batch, self._stop_filter(list(sampling.stop))
        )

        call = self.next_call()
        rng = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])
        with rng, shared_image_encoding(self.model, self.dedupe_images):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed + call)
            out = self.model.generate(
                **inputs,
                generation_config=self._generation_config(sampling),
                logits_processor=LogitsProcessorList(processors),
                stopping_criteria=StoppingCriteriaList([stopper]),
            )
        generated = out.sequences[:, prompt_len:].cpu()
        logprobs = torch.stack(stopper.logprobs, dim=1) if stopper.logprobs else torch.zeros(batch, 0)
        return [self._turn(generated[row], logprobs[row], stopper.stopped_at[row], sampling) for row in range(batch)]

    def _turn(
        self, ids: torch.Tensor, logprobs: torch.Tensor, stopped_at: int | None, sampling: SamplingConfig
    ) -> TurnOutput:
        """Cut one row after its stop string or first end-of-turn token, decode, and pair ids with log-probs."""
        end, finish = ids.shape[0], "length"
        for position, token in enumerate(ids.tolist()):
            if token in self.eos_token_ids:
                end, finish = position + 1, "stop"
                break
        if stopped_at is not None and stopped_at <= end:
            end, finish = stopped_at, "stop"
        token_ids = ids[:end].tolist()
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        text, _ = truncate_at_stop(text, sampling.stop)
        if self.content_separator and text.startswith(self.content_separator):
            text = text[len(self.content_separator) :]
        return TurnOutput(text=text, token_ids=token_ids, logprobs=logprobs[:end].tolist(), finish_reason=finish)


def load_policy_agent(
    name_or_path: str | Path = "tiny",
    device: str = "cpu",
    sampling: SamplingConfig | None = None,
    dtype: str | torch.dtype | None = None,
    name: str = "policy",
) -> PolicyAgent:
    """A :class:`PolicyAgent` over a :class:`TransformersBackend` for ``name_or_path`` (default: tiny Idefics3)."""
    return PolicyAgent(TransformersBackend.from_pretrained(name_or_path, device=device, dtype=dtype), sampling, name)
