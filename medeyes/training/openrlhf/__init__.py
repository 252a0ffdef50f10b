"""The OpenRLHF backend: MedEyesEnv as an OpenRLHF 0.11.2 agent and the dual-stream loss in its PPO actor.

A map, not an API: import each name from the module that defines it.

- :mod:`~medeyes.training.openrlhf.config`: every config of the backend (the run's :class:`OpenRLHFConfig` with
  the settings it refuses, the workers' :class:`BackendConfig`, prompt labels), the export's file names, the
  pinned release, log keys;
- :mod:`~medeyes.training.openrlhf.chat`: the chat template as turn markers, tokenisation, the formatter cache;
- :mod:`~medeyes.training.openrlhf.episode`: one env episode behind reset/step;
- :mod:`~medeyes.training.openrlhf.agent`: the OpenRLHF agent instance and executor (the two streams);
- :mod:`~medeyes.training.openrlhf.replay`: stored expert trajectories and their replay;
- :mod:`~medeyes.training.openrlhf.loss`: the policy loss, KL/entropy reduction and advantages in OpenRLHF terms;
- :mod:`~medeyes.training.openrlhf.patches`: the Ray setup hook that installs them, fail closed;
- :mod:`~medeyes.training.openrlhf.export` and :mod:`~medeyes.training.openrlhf.launch`: the user side
  (``python -m medeyes.training.openrlhf.launch`` is the head-node entry point).

Importing this package imports none of openrlhf, ray, vllm or deepspeed; only
:func:`~medeyes.training.openrlhf.agent.make_agent_executor` and the patches touch openrlhf.
"""
