"""The off-policy stream: stored expert trajectories, and their replay through the env as OpenRLHF samples.

An expert sample's tokens are the expert's turn texts with the environment's real feedback between them,
built exactly like an on-policy sample (:func:`replay_expert`), with rollout log-probs 0 (pi_expert := 1).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medeyes.training.openrlhf.chat import ChatFormatter, accumulate_mm, encode_segment
from medeyes.training.openrlhf.config import BackendConfig, CaseLabel
from medeyes.training.openrlhf.episode import AgentStep, EpisodeDriver
from medeyes_env.errors import ConfigError, RecordError


class ExpertTrajectory(BaseModel):
    """One stored expert trajectory, as the text turns the environment executes again at replay."""

    model_config = ConfigDict(extra="forbid")

    trajectory_id: str = Field(description="Id in the trajectory store.")
    turns: list[str] = Field(min_length=1, description="The expert's turn texts, in order.")
    reward: float = Field(description="Total reward recorded when the trajectory was made.")


class ExpertCase(BaseModel):
    """One line of ``expert.jsonl``: the expert trajectories of one case."""

    model_config = ConfigDict(extra="forbid")

    case_id: str = Field(description="Case.id the trajectories were made on.")
    source: str = Field(description="Case source spec.")
    split: str = Field(description="Split of the case.")
    index: int = Field(ge=0, description="Index of the case in its split.")
    trajectories: list[ExpertTrajectory] = Field(min_length=1, description="Trajectories, replayed in this order.")


def load_expert_file(path: str | os.PathLike[str]) -> dict[str, list[ExpertTrajectory]]:
    """Read ``expert.jsonl`` into ``case_id -> trajectories``; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"expert file {path} not found; run `medeyes openrlhf export` again")
    out: dict[str, list[ExpertTrajectory]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = ExpertCase.model_validate_json(line)
        except ValidationError as exc:
            raise RecordError(f"line {number} of {path} is not an expert case: {exc.errors()[0]['msg']}") from None
        out.setdefault(row.case_id, []).extend(row.trajectories)
    return out


async def replay_expert(
    config: BackendConfig,
    formatter: ChatFormatter,
    processor: Any,
    prompt: str,
    label: str,
    trajectory: ExpertTrajectory,
    max_length: int,
    images: Any = None,
    want_logprobs: bool = False,
) -> dict[str, Any]:
    """Replay one expert trajectory through the env into OpenRLHF's response dict (token in, token out).

    The token stream is built like the on-policy one: the prompt (with its images), then per turn the
    expert's text as action tokens (``sep + text``, as :func:`medeyes.models.episodes.tokenize_episode`
    tokenises expert turns; action range = loss tokens) and the environment's feedback segment with its view
    image. Rewards come from the environment, not from the store. Rollout log-probs are 0 (pi_expert := 1).
    Environment work runs in a thread; the processor is only called from the event loop's thread (fast
    tokenizers must not be used from two threads at once).

    Returns:
        The dict ``MultiTurnAgentExecutor.execute`` returns: prompt, label, images, mm_train_inputs, reward,
        scores, observation_tokens, action_ranges, rollout_log_probs, truncated, extra_logs.

    """
    driver = EpisodeDriver(config, formatter, is_expert=True)
    observation = await asyncio.to_thread(driver.reset, prompt, label)
    prompt_images = _as_pil_list(images) if (images and hasattr(processor, "image_processor")) else []
    tokens, mm_inputs = encode_segment(processor, observation, prompt_images)
    if len(tokens) >= max_length:
        raise ConfigError(
            f"the prompt of {CaseLabel.parse(label).case_id!r} takes {len(tokens)} tokens, not below "
            f"--data.max_len {max_length}; raise --data.max_len"
        )
    stream = _TokenStream(tokens, mm_inputs)
    for text in trajectory.turns:
        if not await _replay_turn(driver, formatter, processor, text, stream, max_length):
            break
    return {
        "prompt": prompt,
        "label": label,
        "images": images,
        "mm_train_inputs": stream.mm_inputs,
        "reward": stream.reward,
        "scores": driver.score(),
        "observation_tokens": stream.tokens,
        "action_ranges": stream.action_ranges,
        "rollout_log_probs": [0.0] * len(stream.tokens) if want_logprobs else None,
        "truncated": stream.truncated,
        "extra_logs": driver.episode_logs(),
    }


@dataclass
class _TokenStream:
    """A replayed sample as it grows: token ids, multimodal tensors, loss spans, reward, truncation."""

    tokens: list[int]
    mm_inputs: dict | None
    action_ranges: list[tuple[int, int]] = field(default_factory=list)
    reward: float = 0.0
    truncated: bool = False


async def _replay_turn(
    driver: EpisodeDriver, formatter: ChatFormatter, processor: Any, text: str, stream: _TokenStream, max_length: int
) -> bool:
    """Append one expert turn (action tokens, then the env's feedback); False when the sample ends here."""
    action_ids = processor(text=formatter.sep + text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    action_ids = action_ids.tolist()
    budget = max_length - len(stream.tokens)
    if len(action_ids) > budget:
        action_ids, stream.truncated = action_ids[:budget], True
    stream.action_ranges.append((len(stream.tokens), len(stream.tokens) + len(action_ids)))
    stream.tokens = stream.tokens + action_ids
    if stream.truncated:
        return False
    result: AgentStep = await asyncio.to_thread(driver.step, text)
    stream.reward += result.reward
    if result.done:
        return False
    feedback_ids, new_mm = encode_segment(processor, result.feedback, result.images)
    if len(stream.tokens) + len(feedback_ids) >= max_length:
        stream.truncated = True  # no room for another turn; the sequence ends after the action
        return False
    stream.mm_inputs = accumulate_mm(stream.mm_inputs, new_mm)
    stream.tokens = stream.tokens + feedback_ids
    return True


def _as_pil_list(images: Any) -> list[Image.Image]:
    refs = images if isinstance(images, list) else [images]
    out = []
    for ref in refs:
        if ref is None:
            continue
        if isinstance(ref, Image.Image):
            out.append(ref)
        else:
            with Image.open(ref) as image:
                out.append(image.convert("RGB"))
    return out
