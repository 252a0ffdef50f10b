"""What optimizer step ``s`` of a run uses, derived from the step alone: its seeds and its learning rate.

Every random choice of step ``s`` takes its seed from ``(config.seed, s, salt)``, so a resumed run repeats
exactly the steps it would have taken (no RNG state to juggle across a restart). Each random stream has its
own named salt below. Two pairs share a value, kept from before the streams were named so that every run
repeats bit for bit: ``GROUND_BATCH_SALT``/``GRPO_SAMPLING_SALT`` never meet (a step is in one stage), and
``GROUND_POOL_SALT``/``GRPO_ROLLOUT_SALT`` meet only when grpo is the first stage and a ground pool is built
(step 0 of both); a new stream takes a new value.
"""

from __future__ import annotations

import math

import numpy as np

from medeyes.training.stage_config import OptimConfig

SFT_BATCH_SALT = 1
"""sft: which expert trajectories (and co-trained ground examples) step ``s`` trains on."""
GRPO_EXPERT_SALT = 2
"""grpo: which expert trajectories join each case's group at step ``s``."""
GROUND_BATCH_SALT = 3
"""ground: which pool examples step ``s`` trains on."""
GRPO_SAMPLING_SALT = 3
"""grpo: the sampling seed of step ``s``'s on-policy rollouts (the generation backend's draws)."""
GRPO_ROLLOUT_SALT = 4
"""grpo: the rollout driver's seed of step ``s`` (the environment's draws)."""
GROUND_POOL_SALT = 4
"""ground: the jitter and task draws of the example pool, rendered once (step 0)."""
GROUND_EVAL_SALT = 5
"""ground: the held-out grounding examples, rendered once (step 0)."""


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A 31-bit seed for step ``step`` of a run seeded ``seed`` (distinct per ``salt``).

    >>> step_seed(0, 5) == step_seed(0, 5) != step_seed(0, 6)
    True
    """
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, step, salt]).generate_state(1)[0] & 0x7FFFFFFF)


def learning_rate(optim: OptimConfig, step: int, total: int) -> float:
    """Linear warmup to ``optim.lr``, then constant or cosine decay to ``min_lr_ratio * lr`` at ``total``.

    >>> cfg = OptimConfig(lr=1.0, warmup_steps=2, schedule="cosine", min_lr_ratio=0.0)
    >>> [round(learning_rate(cfg, s, 6), 3) for s in range(6)]
    [0.5, 1.0, 1.0, 0.854, 0.5, 0.146]
    """
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    span = max(1, total - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    floor = optim.min_lr_ratio
    return optim.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
