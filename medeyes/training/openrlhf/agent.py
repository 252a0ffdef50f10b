"""MedEyesEnv as an OpenRLHF 0.11.2 agent: the instance, the two-stream executor, :func:`make_agent_executor`.

:func:`make_agent_executor` makes the ``AgentExecutor`` class the exported agent file hands to OpenRLHF.

OpenRLHF's agent API (``openrlhf/utils/agent.py``): ``--train.agent_func_path FILE.py`` is imported by
``openrlhf.trainer.ray.vllm_engine._load_agent_executor``, which instantiates the file's ``AgentExecutor``
with no arguments once per vLLM engine actor. ``MultiTurnAgentExecutor(AgentInstanceCls).execute(prompt,
label, sampling_params, max_length, hf_tokenizer, llm_engine, images)`` runs one episode token in / token
out: a fresh ``AgentInstanceBase`` per episode, ``await reset({"observation": prompt, "label": label})``,
then generate with vLLM and ``await step({"observation_text", "action_text", "label", "sampling_params"})``,
which returns ``{"rewards", "scores", "environment_feedback", "environment_images", "done", "extra_logs"}``.

How the two streams share one prompt group: ``--rollout.n_samples_per_prompt = G_on + G_off``. OpenRLHF
runs all samples of a prompt as one ``asyncio.gather`` on one engine, so the executor numbers them in start
order (:meth:`MedEyesExecutorMixin.claim_slot`): the first ``G_on`` are policy episodes, the rest replay
stored expert trajectories (:mod:`medeyes.training.openrlhf.replay`). Only :func:`make_agent_executor`
imports openrlhf.

The argument list ``prompt, label, sampling_params, max_length, hf_tokenizer, llm_engine, images`` appears in
:meth:`MedEyesExecutorMixin.execute`, :meth:`~MedEyesExecutorMixin.run_policy_episode` and the parent call on
purpose: it is OpenRLHF's own ``execute`` signature, passed through unchanged so the seam tests replace
(``run_policy_episode``) stays call-compatible with ``MultiTurnAgentExecutor.execute``.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import os
import threading
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from medeyes.training.openrlhf.chat import ChatFormatter, FormatterCache
from medeyes.training.openrlhf.config import BackendConfig, CaseLabel
from medeyes.training.openrlhf.episode import AgentStep, EpisodeDriver
from medeyes.training.openrlhf.patches import require_patch_hook
from medeyes.training.openrlhf.replay import ExpertTrajectory, load_expert_file, replay_expert
from medeyes_env.errors import ConfigError


class _TurnEngine:
    """Wraps the vLLM engine OpenRLHF passes in: caps each turn's tokens and remembers the last turn's ids."""

    def __init__(self, engine: Any, max_turn_tokens: int | None) -> None:
        self.engine = engine
        self.max_turn_tokens = max_turn_tokens
        self.last_token_ids: list[int] = []

    async def generate(self, prompt_token_ids: list[int], sampling_params: Any, multi_modal_data: Any = None) -> Any:
        if self.max_turn_tokens is not None and getattr(sampling_params, "max_tokens", None) is not None:
            sampling_params.max_tokens = min(int(sampling_params.max_tokens), self.max_turn_tokens)
        output = await self.engine.generate(prompt_token_ids, sampling_params, multi_modal_data=multi_modal_data)
        self.last_token_ids = list(output.outputs[0].token_ids)
        return output

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


@dataclass
class _EpisodeContext:
    config: BackendConfig
    formatter: ChatFormatter | None
    engine: _TurnEngine | None = None
    is_expert: bool = False
    expert_missing: bool = False


_EPISODE: contextvars.ContextVar[_EpisodeContext | None] = contextvars.ContextVar("medeyes_episode", default=None)


class MedEyesAgentInstance:
    """OpenRLHF agent instance (``AgentInstanceBase`` API of 0.11.2) running one MedEyesEnv episode.

    OpenRLHF builds it with no arguments inside :class:`MedEyesExecutorMixin.execute`, which provides the
    config and chat format through a context variable; tests pass them directly. :func:`make_agent_executor`
    mixes in OpenRLHF's ``AgentInstanceBase``; this class itself does not need OpenRLHF.
    """

    def __init__(
        self, config: BackendConfig | None = None, formatter: ChatFormatter | None = None, engine: Any = None
    ) -> None:
        context = _EPISODE.get()
        if config is None:
            if context is None:
                raise ConfigError("MedEyesAgentInstance() needs a config, or must run inside MedEyesExecutorMixin")
            config, formatter, engine = context.config, context.formatter, context.engine
        self.driver = EpisodeDriver(config, formatter, is_expert=bool(context and context.is_expert))
        if context is not None and context.expert_missing:
            self.driver.flags["expert_missing"] = 1.0
        self.engine = engine

    async def reset(self, states: dict, **kwargs: Any) -> dict:
        """``{"observation": prompt, "label": label}`` -> ``{"observation": prompt}`` (the case's env is reset)."""
        observation = await asyncio.to_thread(self.driver.reset, states["observation"], states["label"])
        return {"observation": observation}

    async def step(self, states: dict, **kwargs: Any) -> dict:
        """Execute ``states["action_text"]`` in the env; return OpenRLHF's step dict (tensors for rewards/scores)."""
        ended = False
        formatter = self.driver.formatter
        last = getattr(self.engine, "last_token_ids", None)
        if formatter is not None and last:
            ended = last[-1] in formatter.eot_ids
        result = await asyncio.to_thread(self.driver.step, states["action_text"], ended)
        return step_dict(result)


def step_dict(result: AgentStep) -> dict[str, Any]:
    """An :class:`AgentStep` in the dict format ``MultiTurnAgentExecutor`` reads."""
    return {
        "rewards": torch.tensor(result.reward, dtype=torch.float32),
        "scores": torch.tensor(result.score, dtype=torch.float32),
        "environment_feedback": result.feedback,
        "environment_images": list(result.images) or None,
        "done": result.done,
        "extra_logs": dict(result.extra_logs),
    }


def with_protocol_stops(sampling_params: Any, config: BackendConfig) -> Any:
    """A copy of vLLM ``SamplingParams`` that also stops at the protocol's closing tags (kept in the text)."""
    params = copy.deepcopy(sampling_params)
    if config.stop:
        existing = list(getattr(params, "stop", None) or [])
        params.stop = existing + [s for s in config.stop if s not in existing]
        params.include_stop_str_in_output = True
    return params


class MedEyesExecutorMixin:
    """The MedEyes part of the OpenRLHF agent executor: stream slots, expert replay, protocol stops.

    :func:`make_agent_executor` combines it with OpenRLHF's ``MultiTurnAgentExecutor``, whose ``execute``
    runs the on-policy episodes (``super().execute``).
    """

    config: ClassVar[BackendConfig | None] = None

    def __init__(self, config: BackendConfig | None = None) -> None:
        self.backend = config or type(self).config
        if self.backend is None:
            raise ConfigError("MedEyesExecutorMixin needs a BackendConfig")
        self._slots: dict[str, int] = {}
        self.formatters = FormatterCache(self.backend.feedback_images)
        self._experts: dict[str, list[ExpertTrajectory]] | None = None
        self._reset_lock = threading.Lock()

    # -- pieces --------------------------------------------------------------------------------------

    def formatter_for(self, processor: Any) -> ChatFormatter:
        """The chat format of ``processor``: one per distinct processor, not per deserialised copy.

        OpenRLHF ships ``hf_tokenizer`` with every ``generate_responses`` call, so each call brings a new
        object; keying on ``id()`` kept one formatter (and the processor it holds) per call forever.
        """
        return self.formatters.get(processor)

    @property
    def experts(self) -> dict[str, list[ExpertTrajectory]]:
        """``case_id -> expert trajectories`` from the config's expert file (empty without one)."""
        if self._experts is None:
            path = self.backend.expert_file
            self._experts = load_expert_file(path) if path is not None else {}
        return self._experts

    def claim_slot(self, label: str) -> int:
        """Sample number of this call within its prompt group: 0, 1, ... n-1, then again from 0.

        Must be called before the first ``await`` of ``execute``: OpenRLHF starts the n calls of one prompt
        (``RolloutRayActor.generate_responses``: ``asyncio.gather`` of n ``execute`` coroutines) in order,
        and asyncio runs tasks in the order they were scheduled, so the i-th call to start gets slot i.
        """
        n = self.backend.n_samples_per_prompt
        slot = self._slots.get(label, 0)
        self._slots[label] = (slot + 1) % n
        return slot

    # -- the OpenRLHF entry point ------------------------------------------------------------------------

    async def execute(
        self,
        prompt: str,
        label: str,
        sampling_params: Any,
        max_length: int,
        hf_tokenizer: Any,
        llm_engine: Any,
        images: Any = None,
    ) -> dict[str, Any]:
        """Run one sample of a prompt group: an expert replay (slots >= G_on of train rows) or a policy episode."""
        formatter = self.formatter_for(hf_tokenizer)
        case = CaseLabel.parse(label)
        missing = False
        if case.expert and self.backend.expert_file is not None:
            slot = self.claim_slot(label)  # before any await: see claim_slot
            if slot >= self.backend.group_on:
                trajectories = self.experts.get(case.case_id, [])
                if trajectories:
                    trajectory = trajectories[(slot - self.backend.group_on) % len(trajectories)]
                    want_logprobs = getattr(sampling_params, "logprobs", None) is not None
                    return await replay_expert(
                        self.backend,
                        formatter,
                        hf_tokenizer,
                        prompt,
                        label,
                        trajectory,
                        max_length,
                        images,
                        want_logprobs,
                    )
                missing = True  # no stored trajectory for this case: the slot becomes on-policy
        engine = _TurnEngine(llm_engine, self.backend.max_turn_tokens)
        token = _EPISODE.set(_EpisodeContext(self.backend, formatter, engine, expert_missing=missing))
        try:
            params = with_protocol_stops(sampling_params, self.backend)
            return await self.run_policy_episode(prompt, label, params, max_length, hf_tokenizer, engine, images)
        finally:
            _EPISODE.reset(token)

    async def run_policy_episode(
        self,
        prompt: str,
        label: str,
        sampling_params: Any,
        max_length: int,
        hf_tokenizer: Any,
        llm_engine: Any,
        images: Any,
    ) -> dict[str, Any]:
        """The on-policy episode: OpenRLHF's ``MultiTurnAgentExecutor.execute`` (next in the MRO)."""
        parent = super()
        if not hasattr(parent, "execute"):
            raise ConfigError("MedEyesExecutorMixin must be combined with MultiTurnAgentExecutor (make_agent_executor)")
        return await parent.execute(prompt, label, sampling_params, max_length, hf_tokenizer, llm_engine, images)


def make_agent_executor(config_path: str | os.PathLike[str]) -> type:
    """The ``AgentExecutor`` class an OpenRLHF agent file exports (needs ``openrlhf`` installed).

    The export writes ``medeyes_agent.py`` with ``AgentExecutor = make_agent_executor("<config>.json")``;
    OpenRLHF instantiates it with no arguments in every vLLM engine actor.

    Raises:
        ConfigError: the config trains with the MedEyes objective (``medeyes_loss``) but this process did not
            run the MedEyes patch hook: the run was not started by ``medeyes openrlhf command`` (see
            :func:`~medeyes.training.openrlhf.patches.require_patch_hook`).

    """
    from openrlhf.utils.agent import AgentInstanceBase, MultiTurnAgentExecutor

    config = BackendConfig.load(config_path)
    if config.medeyes_loss:
        require_patch_hook(config_path)  # fail closed: never train a MedEyes export on OpenRLHF's stock loss
    instance_cls = type("MedEyesOpenRLHFInstance", (MedEyesAgentInstance, AgentInstanceBase), {"__module__": __name__})

    class AgentExecutor(MedEyesExecutorMixin, MultiTurnAgentExecutor):
        """MedEyes episodes for OpenRLHF: on-policy through ``MultiTurnAgentExecutor``, expert replays."""

        def __init__(self) -> None:
            MultiTurnAgentExecutor.__init__(self, instance_cls)
            MedEyesExecutorMixin.__init__(self, config)

    AgentExecutor.config = config
    return AgentExecutor
