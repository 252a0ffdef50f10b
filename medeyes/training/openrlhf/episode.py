"""One MedEyes episode behind OpenRLHF's reset/step: the case, the env, the chat format and the logs.

Nothing here imports openrlhf; :mod:`medeyes.training.openrlhf.agent` wraps :class:`EpisodeDriver` in
OpenRLHF's agent-instance API and :mod:`medeyes.training.openrlhf.replay` replays expert turns through it.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from medeyes.training.openrlhf.chat import ChatFormatter
from medeyes.training.openrlhf.config import EPISODE_LOG_KEYS, LOG_PREFIX, BackendConfig, CaseLabel
from medeyes_env.env import MedEyesEnv
from medeyes_env.errors import RecordError
from medeyes_env.rewards import METRIC_COMPONENTS, REWARD_COMPONENTS
from medeyes_env.sources import CaseSource, open_source

_SOURCES: dict[str, CaseSource] = {}
_SOURCES_LOCK = threading.Lock()


def open_case_source(spec: str, options: dict[str, Any] | None = None) -> CaseSource:
    """Open (once per process) the case source named by ``spec`` with phantom ``options``."""
    key = json.dumps([spec, options or {}], sort_keys=True)
    with _SOURCES_LOCK:
        if key not in _SOURCES:
            if options:
                from medeyes_env.sources import open_cases

                _SOURCES[key] = open_cases(spec, options)
            else:
                _SOURCES[key] = open_source(spec)
        return _SOURCES[key]


@dataclass
class AgentStep:
    """What one environment step gives back to OpenRLHF."""

    reward: float
    feedback: str
    images: list[Image.Image]
    done: bool
    score: float
    extra_logs: dict[str, float]
    env_action: str = ""


class EpisodeDriver:
    """One MedEyes episode behind OpenRLHF's reset/step: the env, the chat format, the per-episode logs.

    Args:
        config: The backend configuration (source, env settings).
        formatter: The model's chat format; None gives raw feedback text (tests, models without a template).
        is_expert: Stream flag reported in the logs.

    """

    def __init__(self, config: BackendConfig, formatter: ChatFormatter | None = None, is_expert: bool = False):
        self.config = config
        self.formatter = formatter
        self.flags = {"is_expert": float(is_expert), "expert_missing": 0.0, "error": 0.0}
        self.env: MedEyesEnv | None = None
        self.label: CaseLabel | None = None
        self.reward_total = 0.0
        self.env_truncated = False
        self._components: dict[str, float] = {}

    def reset(self, prompt: str, label: Any) -> str:
        """Start the episode of ``label``; returns the observation OpenRLHF tokenises (the prompt, unchanged).

        Raises:
            RecordError: the label is malformed, names another source than the config, or the case at its
                index is not the one it names, or the prompt is not that case's question: a stale export.

        """
        case_label = CaseLabel.parse(label)
        if case_label.source != self.config.data:
            raise RecordError(
                f"prompt label names source {case_label.source!r} but the MedEyes OpenRLHF config uses "
                f"{self.config.data!r}; export prompts and config together"
            )
        source = open_case_source(self.config.data, self.config.data_options)
        env = MedEyesEnv(source, split=case_label.split, config=self.config.env)
        env.reset(options={"case_index": case_label.index})
        if env.case is None or env.case.id != case_label.case_id:
            found = env.case.id if env.case is not None else None
            raise RecordError(
                f"label names case {case_label.case_id!r} at {case_label.split}[{case_label.index}] of "
                f"{case_label.source!r}, but the source gives {found!r} there; the export is stale, export again"
            )
        question = next(m for m in env.chat_messages() if m["role"] == "user")["content"][1]["text"]
        if question not in prompt:
            raise RecordError(
                f"the prompt of case {case_label.case_id!r} does not contain the environment's question text; "
                "the prompt file and the environment settings disagree, export again"
            )
        self.env, self.label = env, case_label
        self.reward_total, self.env_truncated, self._components = 0.0, False, {}
        return prompt

    def step(self, action_text: str, ended_with_eot: bool = False) -> AgentStep:
        """Execute one model turn; never raises on model output (a failure is reported in the logs)."""
        if self.env is None:
            raise RecordError("EpisodeDriver.step() before reset()")
        ended = ended_with_eot
        text = action_text
        if self.formatter is not None:
            text, had_eot = self.formatter.clean_action(action_text)
            ended = ended or had_eot
        try:
            obs, reward, terminated, truncated, info = self.env.step(text)
        except Exception as exc:  # a bad rollout is data, not a crash
            self.flags["error"] = 1.0
            return AgentStep(0.0, "", [], True, self.score(), self.episode_logs(), env_action=f"<{type(exc).__name__}>")
        self.reward_total += float(reward)
        self._components = dict(info.get("reward_components", {}))
        self.env_truncated = bool(truncated)
        done = bool(terminated or truncated)
        feedback, images = "", []
        if not done:
            send_images = self.formatter is None or self.formatter.images
            images = [Image.fromarray(np.asarray(obs["image"], dtype=np.uint8))] if send_images else []
            if self.formatter is not None:
                feedback = self.formatter.feedback_segment(obs["text"], len(images), ended_with_eot=ended)
            else:
                feedback = obs["text"]
        return AgentStep(float(reward), feedback, images, done, self.score(), self.episode_logs(), env_action=text)

    def score(self) -> float:
        """OpenRLHF's ``scores`` of the episode so far: the accuracy component (what eval ``pass1`` averages)."""
        return float(self._components.get("accuracy", 0.0))

    def episode_logs(self) -> dict[str, float]:
        """The fixed set of :data:`EPISODE_LOG_KEYS` (prefixed ``medeyes/``) for the episode so far."""
        env = self.env
        turns = env.turns if env is not None else []
        executed = [t for t in turns if t.parsed.ok and t.shown_boxes]
        logs = {
            **self.flags,
            "turns": float(len(turns)),
            "tool_turns": float(len(executed)),
            "used_scan": float(any(t.parsed.action.name == "scan" for t in executed)),
            "used_drill": float(any(t.parsed.action.name == "drill" for t in executed)),
            "malformed_turns": float(sum(1 for t in turns if not t.parsed.ok)),
            "answered": float(any(t.parsed.ok and t.parsed.action.name == "answer" for t in turns)),
            "env_truncated": float(self.env_truncated),
            "reward_total": self.reward_total,
        }
        for name in REWARD_COMPONENTS:
            logs[f"r_{name}"] = float(self._components.get(name, 0.0))
        for name in METRIC_COMPONENTS:
            logs[f"m_{name}"] = float(self._components.get(name, 0.0))
        return {LOG_PREFIX + key: logs[key] for key in EPISODE_LOG_KEYS}
