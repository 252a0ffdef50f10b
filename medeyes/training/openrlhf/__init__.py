"""The OpenRLHF backend: MedEyesEnv as an OpenRLHF 0.11.2 agent and the dual-stream loss in its PPO actor.

One concern per module:

- :mod:`~medeyes.training.openrlhf.config`: the worker config, prompt labels, the pinned release, log keys;
- :mod:`~medeyes.training.openrlhf.chat`: the chat template as turn markers, tokenisation, the formatter cache;
- :mod:`~medeyes.training.openrlhf.episode`: one env episode behind reset/step;
- :mod:`~medeyes.training.openrlhf.agent`: the OpenRLHF agent instance and executor (the two streams);
- :mod:`~medeyes.training.openrlhf.replay`: stored expert trajectories and their replay;
- :mod:`~medeyes.training.openrlhf.loss`: the policy loss, KL/entropy reduction and advantages in OpenRLHF terms;
- :mod:`~medeyes.training.openrlhf.patches`: the Ray setup hook that installs them, fail closed;
- :mod:`~medeyes.training.openrlhf.export` and :mod:`~medeyes.training.openrlhf.launch`: the user side.

Importing this package imports none of openrlhf, ray, vllm or deepspeed; only
:func:`~medeyes.training.openrlhf.agent.make_agent_executor` and the patches touch openrlhf.
"""

from medeyes.training.openrlhf.agent import (
    MedEyesAgentInstance,
    MedEyesExecutorMixin,
    make_agent_executor,
    step_dict,
    with_protocol_stops,
)
from medeyes.training.openrlhf.chat import (
    ChatFormatter,
    FormatterCache,
    encode_segment,
    processor_identity,
    render_prompt_row,
)
from medeyes.training.openrlhf.config import (
    ADVANTAGE_LOG_KEYS,
    ALLOW_UNTESTED_ENV,
    CONFIG_ENV,
    EPISODE_LOG_KEYS,
    LOG_PREFIX,
    LOSS_LOG_KEYS,
    OPENRLHF_VERSION,
    SETUP_HOOK,
    BackendConfig,
    CaseLabel,
)
from medeyes.training.openrlhf.episode import AgentStep, EpisodeDriver, open_case_source
from medeyes.training.openrlhf.loss import (
    DualStreamPolicyLoss,
    assign_dual_stream_advantages,
    expert_flags,
    reduce_like_medeyes,
    row_advantages,
    stream_advantages,
)
from medeyes.training.openrlhf.patches import install_openrlhf_patches, require_patch_hook
from medeyes.training.openrlhf.replay import ExpertCase, ExpertTrajectory, load_expert_file, replay_expert

__all__ = [
    "ADVANTAGE_LOG_KEYS",
    "ALLOW_UNTESTED_ENV",
    "CONFIG_ENV",
    "EPISODE_LOG_KEYS",
    "LOG_PREFIX",
    "LOSS_LOG_KEYS",
    "OPENRLHF_VERSION",
    "SETUP_HOOK",
    "AgentStep",
    "BackendConfig",
    "CaseLabel",
    "ChatFormatter",
    "DualStreamPolicyLoss",
    "EpisodeDriver",
    "ExpertCase",
    "ExpertTrajectory",
    "FormatterCache",
    "MedEyesAgentInstance",
    "MedEyesExecutorMixin",
    "assign_dual_stream_advantages",
    "encode_segment",
    "expert_flags",
    "install_openrlhf_patches",
    "load_expert_file",
    "make_agent_executor",
    "open_case_source",
    "processor_identity",
    "reduce_like_medeyes",
    "render_prompt_row",
    "replay_expert",
    "require_patch_hook",
    "row_advantages",
    "step_dict",
    "stream_advantages",
    "with_protocol_stops",
]
