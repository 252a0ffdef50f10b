"""MedEyes as a verifiers (0.4, ``verifiers.v1``) taskset and env, keeping MedEyes' own tag protocol.

Load it the way verifiers loads any taskset, by its import path::

    import verifiers.v1 as vf
    env = vf.load_environment(vf.EnvConfig(taskset={"id": "medeyes_env.integrations.verifiers_env"}))

or from the command line, ``--env.taskset.id medeyes_env.integrations.verifiers_env``. The module
exports exactly one ``Taskset`` and one ``Env`` (verifiers finds them through ``__all__``).

Each task is one case (``case_index`` of ``split``); its system prompt is MedEyes' protocol with
that image's size filled in. ``run()`` plays the episode host-side, the environment being the
user: the first user turn carries the overview, every later one the view the agent's last
turn asked for, both as ``image_url`` data-URL parts (the ones ``chat_messages(image_format="data_url")``
makes). The model's replies are parsed as MedEyes turns, tags and all, so the ``grammar`` reward
keeps its meaning here. The episode reward is recorded as ``medeyes``; its components and
metrics as ``medeyes/<name>`` metrics, with ``medeyes/finished`` (1 when the agent answered).

Needs ``pip install "medeyes[verifiers]"``, in its own environment: verifiers 0.4 pins
``mcp==2.0.0``, which openenv 0.10 (the ``serve`` extra) cannot share.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import verifiers.v1 as vf
from pydantic import Field

from medeyes_env.env import MedEyesEnv
from medeyes_env.registration import ENV_IDS

__all__ = ["MedEyesData", "MedEyesTask", "MedEyesTaskset", "MedEyesTasksetConfig", "MedEyesVerifiersEnv"]


class MedEyesTasksetConfig(vf.TasksetConfig):
    """Which cases become tasks."""

    env_id: str = "MedEyes/Phantom-v0"
    """Gymnasium id of the MedEyes environment (its source)."""
    split: str = "test"
    """Case split: train, validation or test."""
    num_cases: int = Field(default=64, ge=1)
    """Tasks to yield: cases 0 .. num_cases - 1 of the split."""
    env_kwargs: dict[str, Any] = Field(default_factory=dict)
    """EnvConfig fields, e.g. {"max_steps": 3}."""


class MedEyesData(vf.TaskData):
    """One case: what ``run()`` needs to rebuild the episode."""

    env_id: str
    split: str
    case_index: int
    env_kwargs: dict[str, Any] = Field(default_factory=dict)


class MedEyesTask(vf.Task[MedEyesData, vf.State, vf.TaskConfig]):
    """A MedEyes case; scoring happens in the env's ``run()``, where the episode is."""


def make_env(data: MedEyesData | MedEyesTasksetConfig) -> MedEyesEnv:
    """The environment a task plays on."""
    if data.env_id not in ENV_IDS:
        raise ValueError(f"env_id {data.env_id!r} is not a MedEyes id; use one of: {', '.join(sorted(ENV_IDS))}")
    return MedEyesEnv(**{**ENV_IDS[data.env_id], "split": data.split}, **data.env_kwargs)


class MedEyesTaskset(vf.Taskset[MedEyesTask, MedEyesTasksetConfig]):
    """Cases ``0 .. num_cases - 1`` of a MedEyes split, each with its own protocol prompt."""

    def load(self) -> Iterator[MedEyesTask]:
        """Yield one task per case (lazily: the system prompt needs the case's image size)."""
        config = self.config
        env = make_env(config)
        for index in range(config.num_cases):
            _, info = env.reset(options={"case_index": index})
            yield MedEyesTask(
                MedEyesData(
                    id=info["case_id"],
                    name=f"{config.env_id}#{config.split}/{index}",
                    prompt=None,  # the env opens the exchange: the first user turn carries the image
                    system_prompt=env.system_prompt() or None,
                    env_id=config.env_id,
                    split=config.split,
                    case_index=index,
                    env_kwargs=config.env_kwargs,
                ),
                config.task,
            )


class MedEyesVerifiersEnv(vf.Env[vf.SingleAgentEnvConfig]):
    """Plays a MedEyes episode with the ``agent`` seat (``--env.agent.*``); the environment is the user."""

    async def run(self, task: MedEyesTask, agents: Any) -> None:
        """One episode: overview and question, then one view per tool turn, until the answer or the budget."""
        env = make_env(task.data)
        env.reset(options={"case_index": task.data.case_index})
        reward, info, finished = 0.0, {}, False
        async with agents.agent.interaction(task) as interaction:
            segment = await interaction.turn(_user_turn(env))
            while not segment.terminated:
                _, reward, terminated, truncated, info = env.step(segment.last_reply)
                if terminated or truncated:
                    finished = terminated
                    break
                segment = await interaction.turn(_user_turn(env))
        trace = interaction.trace
        trace.record_reward("medeyes", float(reward), 1.0)
        trace.record_metric("medeyes/finished", float(finished))
        for name, value in info.get("reward_components", {}).items():
            trace.record_metric(f"medeyes/{name}", float(value))


def _user_turn(env: MedEyesEnv) -> list[dict[str, Any]]:
    """The environment's newest user message (image_url data-URL part and text), as verifiers wire dicts."""
    last = env.chat_messages(image_format="data_url")[-1]
    return [{"role": "user", "content": last["content"]}]
