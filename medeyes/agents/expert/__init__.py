"""The expert: GRN + CVS over a region oracle (METHOD.md sections 3-4).

Import the pieces from their modules:

- :mod:`medeyes.agents.expert.agent`: ``ExpertAgent`` (one GRN turn at a time, CVS choices) and ``make_expert``;
- :mod:`medeyes.agents.expert.config`: ``ExpertConfig`` and the ablation ``EXPERT_MODES``;
- :mod:`medeyes.agents.expert.answers`: how the expert answers from what it looked at, one rule per question
  family (``derive_answer``, ``question_family``);
- :mod:`medeyes.agents.expert.narration`: the clinician-style notes it writes about what the oracle saw;
- :mod:`medeyes.agents.expert.oracles`: the region oracles it asks (annotation, image, VLM) and ``make_oracle``.

Imports run one way: agent -> narration -> answers -> config, oracles.
"""
