"""Agents that play MedEyesEnv.

Import the pieces from their modules:

- :mod:`medeyes.agents.base`: the one interface every agent implements (``Agent``), what it sees each turn
  (``EpisodeContext``) and what it returns (``TurnOutput``);
- :mod:`medeyes.agents.policy`: ``PolicyAgent`` over any ``GenerationBackend``, ``SamplingConfig``;
- :mod:`medeyes.agents.random_agent`: ``RandomAgent``, a protocol-valid baseline;
- :mod:`medeyes.agents.expert`: the expert (GRN + CVS over a region oracle), its answers and its narration;
- :mod:`medeyes.agents.backends`: who generates a policy's turns (transformers, an OpenAI-compatible server,
  vLLM in process, the vLLM server and its weight sync).

Imports run one way: expert -> backends (the VLM oracle asks a server) -> policy -> base.
"""
