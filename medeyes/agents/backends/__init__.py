"""Who generates a policy's turns: every :class:`~medeyes.agents.policy.GenerationBackend`, one module each.

The backends live under ``agents`` because they are the policy agent's half: they implement
:mod:`medeyes.agents.policy`'s contract and return :class:`~medeyes.agents.base.TurnOutput`, and the expert's
VLM oracle asks a server through :mod:`~medeyes.agents.backends.openai`. Import the pieces from their modules:

- :mod:`medeyes.agents.backends.factory`: ``make_backend(name, model, ...)``, the CLI's way to pick one by name;
- :mod:`medeyes.agents.backends.transformers`: ``TransformersBackend``, ``model.generate`` in this process;
- :mod:`medeyes.agents.backends.openai`: ``OpenAIBackend`` against any OpenAI-compatible server (``vllm serve``),
  the ``BackendError`` family, ``yes_probability``;
- :mod:`medeyes.agents.backends.vllm`: ``VLLMBackend``, ``vllm.LLM`` in this process;
- :mod:`medeyes.agents.backends.vllm_server`: ``VLLMServer``, a ``vllm serve`` this process starts and checks;
- :mod:`medeyes.agents.backends.vllm_weights`: loading the trainer's weights into a running vLLM (in process or
  server), and the vLLM version check;
- :mod:`medeyes.agents.backends.seeds`: the per-call counter every backend seeds its sampling from
  (``SeededCalls``, reset by the trainer each step) and ``request_seed``;
- :mod:`medeyes.agents.backends.http_client`: the one way MedEyes opens a URL (no proxy for loopback).

Heavy imports (torch, transformers, vLLM) happen only in the module of the backend asked for.
"""
