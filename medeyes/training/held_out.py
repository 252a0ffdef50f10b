"""Held-out evaluation during training: greedy episodes on the eval split, and the ground stage's own tasks.

The trainer puts the policy in eval mode and seeds it; these functions only play and score.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medeyes.agents.policy import PolicyAgent, SamplingConfig
from medeyes.rollout import RolloutConfig, run_rollout, summarize
from medeyes.training.config import TrainConfig
from medeyes.training.metrics import tool_use_accuracy
from medeyes.training.schedule import step_seed
from medeyes_env.cases import Case
from medeyes_env.sources import CaseSource


def held_out_metrics(policy: PolicyAgent, source: CaseSource, cfg: TrainConfig) -> dict[str, float]:
    """``eval/`` metrics of one episode on each of the eval split's ``eval.cases`` cases from ``eval.start``."""
    rollout = RolloutConfig(
        split=cfg.eval_split,
        start=cfg.eval.start,
        n=cfg.eval.cases,
        samples_per_case=1,
        batch_size=cfg.eval.batch_size,
        seed=cfg.seed,
        env=cfg.env,
    )
    result = run_rollout(policy, source, rollout, store=None)
    summary = summarize(result.records, result.seconds)
    out = {
        "eval/accuracy": summary.accuracy,
        "eval/iou": summary.mean_best_iou,
        "eval/steps": summary.mean_steps,
        "eval/turns": summary.mean_turns,
        "eval/reward": summary.mean_reward,
        "eval/parse_rate": summary.parse_rate,
        "eval/scan_share": summary.scan_share,
        "eval/drill_share": summary.drill_share,
        "eval/seconds": result.seconds,
        **tool_use_accuracy(result.records, "eval/"),
    }
    for family, accuracy in summary.accuracy_by_family.items():
        out[f"eval/accuracy/{family}"] = accuracy
    for family, iou in summary.mean_best_iou_by_family.items():
        out[f"eval/iou/{family}"] = iou
    looking = {
        "eval/looking/first_drill_hit": summary.first_drill_hit_share,
        "eval/looking/steps_first_hit": summary.tool_steps_first_hit,
        "eval/looking/steps_first_miss": summary.tool_steps_first_miss,
        "eval/looking/redrill_after_miss": summary.redrill_after_miss,
    }
    out.update({name: value for name, value in looking.items() if value is not None})
    return out


class GroundingEval:
    """Greedy where- and what-answers on the eval split's ``eval.cases`` cases from ``eval.start``, in the taught shape.

    The examples are drawn once (seeded) and reused at every evaluation.
    """

    def __init__(self, source: CaseSource, cfg: TrainConfig) -> None:
        """Render the examples of ``cfg.eval.cases`` held-out cases (``ground.shape`` decides their form)."""
        from medeyes.training.grounding import shaped_examples

        rng = np.random.default_rng(step_seed(cfg.seed, 0, 5))
        self.env = cfg.env
        self.examples: list[tuple[Case, list]] = []
        for index in cfg.eval.indices(source.size(cfg.eval_split)):
            case = source.case(cfg.eval_split, index)
            # scored in the shape it was taught (experiments/episode_probe.py scores the transfer to episodes)
            made = shaped_examples(case, cfg.env, cfg.ground.shape, ("where", "what"), rng, cfg.ground.jitter)
            self.examples.append((case, made))

    def scores(self, backend: Any) -> dict[str, float]:
        """``eval/`` grounding scores of ``backend``'s greedy answers (hit, IoU, reads a crop)."""
        from medeyes.training.grounding import grounding_scores

        greedy = SamplingConfig(temperature=0.0, max_new_tokens=64, stop=[])  # an episode-shaped scan turn: ~35
        cases = [case for case, made in self.examples if made]
        where = [made[0][0][:-1] for _, made in self.examples if made]  # the prompt: all but the answer
        what = [made[1] for _, made in self.examples if len(made) > 1]
        where_texts = [t.text for t in backend.generate(where, greedy)]
        what_texts = [t.text for t in backend.generate([m[:-1] for m, _ in what], greedy)]
        scores = grounding_scores(cases, where_texts, what_texts, [label for _, label in what], self.env)
        return {f"eval/{k}": v for k, v in scores.items()}
