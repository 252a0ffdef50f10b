"""The verifiers (0.4, ``verifiers.v1``) taskset: found by ``load_environment``, episodes scored as in-process.

Runs in its own environment (verifiers 0.4 pins mcp 2.0, which the serve extra's openenv cannot share)::

    python -m venv .venv-verifiers && .venv-verifiers/bin/pip install -e ".[verifiers]" pytest
    .venv-verifiers/bin/python -m pytest tests/test_verifiers_env.py
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import gymnasium as gym
import pytest

vf = pytest.importorskip("verifiers.v1", reason="needs the verifiers extra (its own venv: see the module docstring)")

import medeyes_env  # noqa: E402, F401  (registers the ids)
from medeyes_env.integrations.verifiers_env import MedEyesVerifiersEnv  # noqa: E402

DRILL = '<reasoning>the centre</reasoning><action>{"name": "drill", "box": [400, 400, 600, 600]}</action>'


def load(num_cases: int = 2):
    config = vf.SingleAgentEnvConfig(taskset={"id": "medeyes-verifiers", "num_cases": num_cases})
    return vf.load_environment(config)


def test_load_environment_finds_the_taskset_and_env():
    env = load()
    assert isinstance(env, MedEyesVerifiersEnv)
    tasks = list(env.taskset)
    assert [t.data.name for t in tasks] == ["MedEyes/Phantom-v0#test/0", "MedEyes/Phantom-v0#test/1"]
    assert tasks[0].data.id == "phantom/test/000000" and tasks[0].data.prompt is None
    assert "<reasoning>" in tasks[0].data.system_prompt and "1024" in tasks[0].data.system_prompt


@dataclass
class Segment:
    last_reply: str
    terminated: bool = False


@dataclass
class Trace:
    rewards: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    def record_reward(self, name, value, weight):
        self.rewards[name] = (value, weight)

    def record_metric(self, name, value):
        self.metrics[name] = value


class ScriptedSeat:
    """The agent seat with scripted replies; every user turn is checked as verifiers' own message type."""

    def __init__(self, replies):
        self.replies, self.turns, self.trace = list(replies), [], Trace()

    @contextlib.asynccontextmanager
    async def interaction(self, task):
        yield self

    async def turn(self, messages):
        from verifiers.v1.dialects import parse_message

        self.turns.append([parse_message(m) for m in messages])  # raises if verifiers cannot read the turn
        return Segment(self.replies.pop(0)) if self.replies else Segment("", terminated=True)


def test_an_episode_keeps_the_tag_protocol_sends_data_url_images_and_scores_as_in_process():
    env = load(num_cases=1)
    task = next(iter(env.taskset))
    local = gym.make("MedEyes/Phantom-v0", split="test").unwrapped
    local.reset(options={"case_index": 0})
    answer = f"<reasoning>seen</reasoning><answer>{local.case.answer}</answer>"
    seat = ScriptedSeat([DRILL, answer])
    asyncio.run(env.run(task, type("Agents", (), {"agent": seat})()))

    local.step(DRILL)
    _, reward, *_, info = local.step(answer)
    assert seat.trace.rewards == {"medeyes": (reward, 1.0)}
    assert seat.trace.metrics["medeyes/finished"] == 1.0
    assert seat.trace.metrics["medeyes/accuracy"] == info["reward_components"]["accuracy"] == 1.0
    assert seat.trace.metrics["medeyes/grammar"] == 1.0  # the model wrote the tags: grammar keeps its meaning
    first, second = seat.turns
    assert [part.type for part in first[0].content] == ["image_url", "text"]
    assert first[0].content[0].image_url.url.startswith("data:image/png;base64,")
    assert "Zoomed into region [400, 400, 600, 600]" in second[0].content[1].text


def test_a_seat_that_stops_early_earns_nothing_and_is_marked_unfinished():
    env = load(num_cases=1)
    seat = ScriptedSeat([DRILL])
    asyncio.run(env.run(next(iter(env.taskset)), type("Agents", (), {"agent": seat})()))
    assert seat.trace.rewards == {"medeyes": (0.0, 1.0)}
    assert seat.trace.metrics["medeyes/finished"] == 0.0
