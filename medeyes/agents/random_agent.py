"""A random agent: a format-perfect baseline that looks at random places and guesses.

Every turn is well formed (so it earns the grammar reward), boxes are uniformly random, and the final
answer is a uniformly random option (CHOICE), yes or no (CLOSED), or a fixed guess (OPEN). It sees no
oracle and no label: any accuracy above chance measured with it is a bug in the benchmark.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from medeyes.agents.base import EpisodeContext, TurnOutput
from medeyes_env.cases import AnswerType, Box
from medeyes_env.protocol import Action, render_turn


class RandomAgentConfig(BaseModel):
    """How the random agent behaves."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(default=0, description="Base seed, mixed with each episode's seed.")
    min_steps: int = Field(default=0, ge=0, description="Fewest tool turns before answering.")
    max_steps: int = Field(default=4, ge=0, description="Most tool turns before answering (capped by the env).")
    scan_probability: float = Field(default=0.5, ge=0.0, le=1.0, description="Chance a tool turn is a scan.")
    max_scan_boxes: int = Field(default=5, ge=1, le=5, description="Most boxes in one scan.")
    box_range: tuple[float, float] = Field(
        default=(0.02, 0.3), description="Box side range as a fraction of the image's shorter side (log-uniform)."
    )
    open_guess: str = Field(default="yes", description="Answer to OPEN questions.")


class RandomAgent:
    """Random boxes, random answers, perfect grammar."""

    def __init__(self, config: RandomAgentConfig | None = None) -> None:
        self.config = config or RandomAgentConfig()
        self.name = "random"

    def describe(self) -> dict[str, Any]:
        """Producer description."""
        return {"kind": "random", "name": self.name, "config": self.config.model_dump()}

    def act(self, batch: list[EpisodeContext]) -> list[TurnOutput]:
        """One random turn per episode."""
        return [TurnOutput(text=self._turn(context), finish_reason="stop") for context in batch]

    def _turn(self, context: EpisodeContext) -> str:
        cfg = self.config
        state = context.state
        if "rng" not in state:
            state["rng"] = np.random.default_rng([cfg.seed, int(state.get("seed", context.episode_id)) & 0xFFFFFFFF, 7])
            low, high = min(cfg.min_steps, context.max_steps), min(cfg.max_steps, context.max_steps)
            state["length"] = int(state["rng"].integers(low, max(low, high) + 1))
        rng: np.random.Generator = state["rng"]
        if context.step >= state["length"]:
            return render_turn(Action.final_answer(self._guess(context, rng)), "Answering without further looks.")
        if rng.random() < cfg.scan_probability:
            boxes = [self._box(context, rng) for _ in range(int(rng.integers(1, cfg.max_scan_boxes + 1)))]
            return render_turn(
                Action.scan(*boxes), "Scanning a few places chosen at random.", context.box_format, context.image.size
            )
        return render_turn(
            Action.drill(self._box(context, rng)),
            "Zooming into a place chosen at random.",
            context.box_format,
            context.image.size,
        )

    def _box(self, context: EpisodeContext, rng: np.random.Generator) -> Box:
        width, height = context.image.size
        low, high = self.config.box_range
        side = min(width, height) * math.exp(rng.uniform(math.log(low), math.log(high)))
        side = max(1.0, min(side, width, height))
        x = math.floor(rng.uniform(0, width - side))
        y = math.floor(rng.uniform(0, height - side))
        return (float(x), float(y), float(min(width, math.ceil(x + side))), float(min(height, math.ceil(y + side))))

    def _guess(self, context: EpisodeContext, rng: np.random.Generator) -> str:
        case = context.case
        if case.answer_type is AnswerType.CHOICE:
            return case.options[int(rng.integers(len(case.options)))]
        if case.answer_type is AnswerType.CLOSED:
            return "yes" if rng.random() < 0.5 else "no"
        return self.config.open_guess
