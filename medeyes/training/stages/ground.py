"""The ground stage's examples: single questions about what a view shows and where, answered in one turn.

:func:`build_ground_pool` renders them once per run from the first ``ground.cases`` training cases (the
question forms are in :mod:`medeyes.training.grounding`); :func:`ground_episode` tokenises one for the loss.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medeyes.models.chat import content_text
from medeyes.models.episodes import EpisodeTensors, TurnTokens, tokenize_episode
from medeyes.training.config import TrainConfig
from medeyes.training.schedule import step_seed
from medeyes_env.sources import CaseSource


def build_ground_pool(config: TrainConfig, source: CaseSource) -> list[tuple[list[dict[str, Any]], str]]:
    """The ground stage's examples: the first ``ground.cases`` training cases, rendered once (seeded)."""
    from medeyes.training.grounding import shaped_examples

    rng = np.random.default_rng(step_seed(config.seed, 0, 4))
    size = source.size(config.train_split)
    n = min(config.ground.cases, size) if size is not None else config.ground.cases
    tasks = tuple(config.ground.tasks)
    pool = []
    for index in range(n):
        case = source.case(config.train_split, index)
        pool += shaped_examples(
            case,
            config.env,
            config.ground.shape,
            tasks,
            rng,
            config.ground.jitter,
            config.ground.what_share,
            config.ground.system_prompt,
            config.ground.empty_share,
            config.ground.bilateral,
            config.ground.what_pairs,
        )
    return pool


def ground_episode(example: tuple[list[dict[str, Any]], str], processor: Any) -> EpisodeTensors:
    """One pool example; only its last turn is a target (earlier turns of an episode-shaped one are context)."""
    messages, _ = example
    turns = [TurnTokens(content_text(m)) for m in messages if m["role"] == "assistant"]
    episode = tokenize_episode(messages, turns, processor, is_expert=True)
    start, _ = episode.turn_spans[-1]
    episode.loss_mask[:start] = False
    return episode
