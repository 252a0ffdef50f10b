"""The ``ground`` stage: teach a random-init VLM to see before it learns to act, one step read top to bottom.

A step draws ``ground.batch_size`` examples from a pool rendered once from the first ``ground.cases``
training cases (:func:`build_ground_pool`; what an example looks like is
:mod:`medeyes.training.stages.ground_examples`), and minimises the NLL of their answers, every example
weighing the same. The sft stage co-trains on the same pool (``sft.ground_examples``). At every evaluation
:class:`GroundingEval` scores greedy where- and what-answers on held-out cases in the taught shape.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from medeyes.models.chat import content_text
from medeyes.models.episodes import EpisodeTensors, TurnTokens, tokenize_episode
from medeyes.training.objective import sft_loss
from medeyes.training.schedule import GROUND_BATCH_SALT, GROUND_EVAL_SALT, GROUND_POOL_SALT, step_seed
from medeyes.training.stage_config import GroundConfig
from medeyes.training.stages._step import Learner, step_metrics
from medeyes.training.stages.ground_examples import grounding_scores, shaped_examples
from medeyes_env.cases import Case
from medeyes_env.env import EnvConfig
from medeyes_env.errors import ConfigError
from medeyes_env.sources import CaseSource

Example = tuple[list[dict[str, Any]], str]
"""A ground example: chat messages ending in the assistant's answer, and the answer text."""


class GroundStage:
    """One ground step: pick pool examples, NLL of their answers (each example weighs the same), optimizer step."""

    def __init__(self, config: GroundConfig, seed: int, pool: GroundPool, learner: Learner) -> None:
        """``seed``: the run's; ``pool``: the rendered examples (shared with the sft stage)."""
        self.config = config
        self.seed = seed
        self.pool = pool
        self.learner = learner

    def step(self, step: int) -> dict[str, float]:
        """One grounding step: NLL of the answers of ``ground.batch_size`` single-image examples."""
        if not self.pool:
            raise ConfigError("the ground stage has no examples: the first ground.cases training cases hold no region")
        learner = self.learner
        # pick
        rng = np.random.default_rng(step_seed(self.seed, step, GROUND_BATCH_SALT))
        picks = rng.integers(0, len(self.pool), size=self.config.batch_size)
        t0 = time.perf_counter()
        episodes = self.pool.episodes(picks)
        prep = time.perf_counter() - t0
        # loss: every example weighs the same, so a one-word what-answer is not drowned by a where-answer's boxes
        learner.model.train()
        lr = learner.optim.set_lr("ground", step)
        t1 = time.perf_counter()

        def answer_nll(rows: list[int], batch: Any, logprobs: Any, entropy: Any) -> Any:
            return sft_loss(logprobs, batch.loss_mask[:, 1:], aggregation="seq_mean_token_mean")

        losses, tokens = learner.accumulate(episodes, list(range(len(episodes))), 1, answer_nll)
        # step
        grad_norm = learner.optim.step("ground")
        return {
            **step_metrics(sum(losses), lr, grad_norm, tokens, time.perf_counter() - t1),
            "train/loss_tokens": float(sum(e.generated_tokens for e in episodes)),
            "train/prep_seconds": prep,
        }


# ================================================================================================ the pool


class GroundPool:
    """The ground stage's examples, each tokenised once per run.

    A pool example is drawn ~20 times in the default run, and its processor pass (chat template, image resize)
    was a third of a ground step.
    """

    def __init__(self, examples: list[Example], processor: Any) -> None:
        """``examples`` from :func:`build_ground_pool` (may be empty: then no stage may draw from it)."""
        self.examples = examples
        self.processor = processor
        self._tensors: dict[int, EpisodeTensors] = {}

    def __len__(self) -> int:
        """How many examples the pool holds."""
        return len(self.examples)

    def episodes(self, picks: Iterable[Any]) -> list[EpisodeTensors]:
        """The examples at indices ``picks``, tokenised (cached)."""
        picks = [int(i) for i in picks]
        for i in picks:
            if i not in self._tensors:
                self._tensors[i] = ground_episode(self.examples[i], self.processor)
        return [self._tensors[i] for i in picks]


def build_ground_pool(config: GroundConfig, env: EnvConfig, source: CaseSource, split: str, seed: int) -> list[Example]:
    """The ground stage's examples: the first ``ground.cases`` cases of ``split``, rendered once (seeded)."""
    rng = np.random.default_rng(step_seed(seed, 0, GROUND_POOL_SALT))
    size = source.size(split)  # type: ignore[arg-type]
    n = min(config.cases, size) if size is not None else config.cases
    tasks = tuple(config.tasks)
    pool = []
    for index in range(n):
        case = source.case(split, index)  # type: ignore[arg-type]
        pool += shaped_examples(
            case,
            env,
            config.shape,
            tasks,
            rng,
            config.jitter,
            config.what_share,
            config.system_prompt,
            config.empty_share,
            config.bilateral,
            config.what_pairs,
        )
    return pool


def ground_episode(example: Example, processor: Any) -> EpisodeTensors:
    """One pool example; only its last turn is a target (earlier turns of an episode-shaped one are context)."""
    messages, _ = example
    turns = [TurnTokens(content_text(m)) for m in messages if m["role"] == "assistant"]
    episode = tokenize_episode(messages, turns, processor, is_expert=True)
    start, _ = episode.turn_spans[-1]
    episode.loss_mask[:start] = False
    return episode


# ================================================================================================ held-out scores


class GroundingEval:
    """Greedy where- and what-answers on held-out cases, in the taught shape.

    The examples are drawn once (seeded) and reused at every evaluation.
    """

    def __init__(
        self, source: CaseSource, split: str, indices: Iterable[int], env: EnvConfig, config: GroundConfig, seed: int
    ) -> None:
        """Render the examples of the held-out cases ``indices`` of ``split`` (``ground.shape`` decides their form)."""
        rng = np.random.default_rng(step_seed(seed, 0, GROUND_EVAL_SALT))
        self.env = env
        self.examples: list[tuple[Case, list]] = []
        for index in indices:
            case = source.case(split, index)  # type: ignore[arg-type]
            # scored in the shape it was taught (experiments/episode_probe.py scores the transfer to episodes)
            made = shaped_examples(case, env, config.shape, ("where", "what"), rng, config.jitter)
            self.examples.append((case, made))

    def scores(self, backend: Any) -> dict[str, float]:
        """``eval/`` grounding scores of ``backend``'s greedy answers (hit, IoU, reads a crop)."""
        from medeyes.agents.policy import SamplingConfig

        greedy = SamplingConfig(temperature=0.0, max_new_tokens=64, stop=[])  # an episode-shaped scan turn: ~35
        cases = [case for case, made in self.examples if made]
        where = [made[0][0][:-1] for _, made in self.examples if made]  # the prompt: all but the answer
        what = [made[1] for _, made in self.examples if len(made) > 1]
        where_texts = [t.text for t in backend.generate(where, greedy)]
        what_texts = [t.text for t in backend.generate([m[:-1] for m, _ in what], greedy)]
        scores = grounding_scores(cases, where_texts, what_texts, [label for _, label in what], self.env)
        return {f"eval/{k}": v for k, v in scores.items()}
