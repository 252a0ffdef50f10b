"""Adapters that put MedEyes inside other agent-RL frameworks; each needs that framework's extra.

- :mod:`medeyes_env.integrations.trl_env`: a TRL ``environment_factory`` class (tools ``scan``, ``drill``, ``answer``);
- :mod:`medeyes_env.integrations.verifiers_env`: a verifiers ``v1`` taskset that keeps MedEyes' tag protocol.
"""
