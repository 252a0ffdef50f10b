"""The verifiers (0.4, ``verifiers.v1``) taskset: found by ``load_environment``, episodes scored as in-process.

Runs in its own environment (verifiers 0.4 pins mcp 2.0, which the serve extra's openenv cannot share)::

    python -m venv .venv-verifiers && .venv-verifiers/bin/pip install -e ".[verifiers]" pytest
    .venv-verifiers/bin/python -m pytest tests/test_verifiers_env.py
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

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


def fresh_trace(task) -> vf.Trace:
    """An untouched trace of ``task``, built the way verifiers' validator builds one."""
    from verifiers.v1.state import state_cls
    from verifiers.v1.trace import Trace, TraceTask

    return Trace(
        task=TraceTask(type=type(task).__name__, data=task.data, key=task.key, hash=task.hash),
        state=state_cls(type(task))(),
        agent=vf.AgentInfo(config=vf.AgentConfig(), name="scripted", trainable=False),
    )


class ScriptedSeat:
    """The agent seat with scripted replies and a real verifiers trace, scored by the task when the
    interaction closes (as ``Rollout.close`` does); every user turn is checked as verifiers' own message type."""

    def __init__(self, replies):
        self.replies, self.turns, self.trace = list(replies), [], None

    @contextlib.asynccontextmanager
    async def interaction(self, task):
        self.trace = fresh_trace(task)
        yield self
        await task.score(self.trace)

    async def turn(self, messages):
        from verifiers.v1.dialects import parse_message

        self.turns.append([parse_message(m) for m in messages])  # raises if verifiers cannot read the turn
        return Segment(self.replies.pop(0)) if self.replies else Segment("", terminated=True)


def rewards(trace) -> dict:
    return {name: (reward.score, reward.weight) for name, reward in trace.rewards.items()}


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
    assert rewards(seat.trace) == {"medeyes": (reward, 1.0)} and seat.trace.reward == reward
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
    assert rewards(seat.trace) == {"medeyes": (0.0, 1.0)}
    assert seat.trace.metrics["medeyes/finished"] == 0.0


def test_the_gold_check_scores_and_an_untouched_trace_scores_zero():
    """What ``vf-validate`` checks per task: the gold answer scores, and scoring an untouched task gives 0."""
    for task in load(num_cases=4).taskset:
        assert asyncio.run(task.validate(None)) is True
        untouched = fresh_trace(task)
        asyncio.run(task.score(untouched))
        assert rewards(untouched) == {"medeyes": (0.0, 1.0)} and untouched.reward == 0.0
        assert untouched.metrics["medeyes/finished"] == 0.0


def test_the_gold_check_fails_when_the_gold_answer_does_not_score(monkeypatch):
    """A check that passes whatever happens checks nothing: a wrong "gold" answer must fail it."""
    from medeyes_env.integrations import verifiers_env

    task = next(iter(load(num_cases=1).taskset))
    monkeypatch.setattr(verifiers_env, "play_gold", lambda data: verifiers_env.MedEyesState(reward=0.2, finished=True))
    assert asyncio.run(task.validate(None)) is False


def test_vf_validate_reports_every_task_valid(tmp_path):
    """verifiers' own validator, as a user runs it (the subprocess runtime: no container, no model)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    vf_validate = Path(sys.executable).with_name("vf-validate")
    args = [str(vf_validate), "medeyes-verifiers", "-n", "8", "--runtime.type", "subprocess", "--rich", "false"]
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (summary_path,) = tmp_path.glob("outputs/*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["outcomes"]["valid"] == 8 and summary["valid_rate"] == 1.0, summary
    assert summary["checks"]["gold"]["valid"] == summary["checks"]["noop"]["valid"] == 8, summary
