"""Benchmark evaluation (``medeyes eval``): run an agent on datasets, score it the way the rewards do.

A map, not an API: import each name from the module that defines it.

- :mod:`~medeyes.evaluation.run`: :func:`~medeyes.evaluation.run.evaluate` and its settings,
  :class:`~medeyes.evaluation.run.EvalConfig` (training's held-out evaluation is
  :class:`~medeyes.training.stage_config.HeldOutEvalConfig`), the resumable store, the report;
- :mod:`~medeyes.evaluation.scores`: accuracy per answer type with bootstrap CIs, grounding, steps, the paper's
  figures;
- :mod:`~medeyes.evaluation.counterfactual`: image counterfactual arms (does the answer follow the image);
- :mod:`~medeyes.evaluation.blind`: the blind majority-answer baseline (training logs it too);
- :mod:`~medeyes.evaluation.audit`: checks of a dataset before scoring on it.
"""
