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
keeps its meaning here. ``run()`` leaves the episode's outcome on the trace's state
(:class:`MedEyesState`); the task scores it the way verifiers scores any task, when the
interaction closes: reward ``medeyes`` (the episode total, weight 1), metrics ``medeyes/<component>``
and ``medeyes/finished`` (1 when the agent answered). An untouched trace (no episode played) scores 0.

``vf-validate medeyes-verifiers -n 8 --runtime.type subprocess`` checks each task without a model:
the gold check (:meth:`MedEyesTask.validate`) plays a one-turn episode answering the case's gold
answer and passes when it scores accuracy 1; the noop check scores an untouched trace (0).

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

__all__ = [
    "MedEyesData",
    "MedEyesState",
    "MedEyesTask",
    "MedEyesTaskset",
    "MedEyesTasksetConfig",
    "MedEyesVerifiersEnv",
]


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


class MedEyesState(vf.State):
    """What one played episode leaves on its trace for the task to score; the defaults are an untouched task."""

    reward: float = 0.0
    """The episode's total reward (0 until the agent answers)."""
    components: dict[str, float] = Field(default_factory=dict)
    """The reward's components (``info["reward_components"]``)."""
    finished: bool = False
    """Whether the agent answered (a seat that stops early, or runs out of turns, did not)."""


class MedEyesTask(vf.Task[MedEyesData, MedEyesState, vf.TaskConfig]):
    """A MedEyes case. The env's ``run()`` plays the episode; this scores what it left on the trace."""

    @vf.reward(weight=1.0)
    async def medeyes(self, trace: vf.Trace) -> float:
        """The episode total; 0 for a trace no episode was played on."""
        return float(trace.state.reward)

    @vf.metric
    async def medeyes_components(self, trace: vf.Trace) -> dict[str, float]:
        """``medeyes/finished`` and each reward component as ``medeyes/<name>``."""
        state = trace.state
        return {"medeyes/finished": float(state.finished)} | {
            f"medeyes/{name}": float(value) for name, value in state.components.items()
        }

    async def validate(self, runtime: Any) -> bool:
        """The gold check: a one-turn episode answering the case's gold answer must score accuracy 1."""
        state = play_gold(self.data)
        return state.finished and state.components.get("accuracy") == 1.0 and state.reward > 0.0


def make_env(data: MedEyesData | MedEyesTasksetConfig) -> MedEyesEnv:
    """The environment a task plays on."""
    if data.env_id not in ENV_IDS:
        raise ValueError(f"env_id {data.env_id!r} is not a MedEyes id; use one of: {', '.join(sorted(ENV_IDS))}")
    return MedEyesEnv(**{**ENV_IDS[data.env_id], "split": data.split}, **data.env_kwargs)


def outcome(reward: float, info: dict[str, Any], finished: bool) -> MedEyesState:
    """An episode's end as the state the task scores."""
    components = {name: float(value) for name, value in info.get("reward_components", {}).items()}
    return MedEyesState(reward=float(reward), components=components, finished=finished)


def play_gold(data: MedEyesData) -> MedEyesState:
    """Play the task's case answering its gold answer at once (MedEyes' tags, no tool turn)."""
    env = make_env(data)
    env.reset(options={"case_index": data.case_index})
    assert env.case is not None
    _, reward, terminated, _, info = env.step(f"<reasoning>gold</reasoning><answer>{env.case.answer}</answer>")
    return outcome(reward, info, terminated)


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
            # Left on the trace inside the interaction: leaving it closes the run, and the task scores the state then.
            played, state = outcome(reward, info, finished), interaction.trace.state
            state.reward, state.components, state.finished = played.reward, played.components, played.finished


def _user_turn(env: MedEyesEnv) -> list[dict[str, Any]]:
    """The environment's newest user message (image_url data-URL part and text), as verifiers wire dicts."""
    last = env.chat_messages(image_format="data_url")[-1]
    return [{"role": "user", "content": last["content"]}]
