"""The trainer's stages, one module each, run in ``config.stages`` order by :class:`~medeyes.training.trainer.Trainer`.

Each stage is a class whose ``step(step)`` is one optimizer step, read top to bottom:

- :mod:`~medeyes.training.stages.ground`: pick pool examples -> NLL of their answers -> step; also the
  held-out grounding scores. Its examples (what a where- or what-question looks like) are rendered by
  :mod:`~medeyes.training.stages.ground_examples`.
- :mod:`~medeyes.training.stages.sft`: sample expert trajectories (plus ground examples) -> NLL of the
  expert's turns -> step.
- :mod:`~medeyes.training.stages.grpo`: collect (on-policy rollouts, expert trajectories) -> tokenise ->
  score (rewards, advantages) -> update (dual-stream loss) -> step.
- :mod:`~medeyes.training.stages._step`: what every stage's step shares (the forward pass under autocast,
  gradient accumulation over micro-batches, the ``train/`` metrics of a step).

The math they call is pure and lives beside them: :mod:`~medeyes.training.objective` (losses),
:mod:`~medeyes.training.advantages`, :mod:`~medeyes.training.logprobs`, :mod:`~medeyes.training.shaping`,
:mod:`~medeyes.training.mismatch` (truncated importance sampling); seeds come from
:mod:`~medeyes.training.schedule`.
"""
